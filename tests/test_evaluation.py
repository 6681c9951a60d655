"""Both protocols from one full-ranking pass, with RecBole's own metric code."""
from __future__ import annotations

import torch
from recbole.data.interaction import Interaction

from conftest import tiny_config
from recbole_ext import compat
from recbole_ext.evaluation import SAMPLED_NEGATIVES
from recbole_ext.pipeline import Stage


def test_full_protocol_equals_recbole_trainer_evaluate(tmp_path, features):
    from recbole.trainer import Trainer

    stage = Stage(tiny_config("stage3.yaml", tmp_path / "run", features, ["load=[]", "model.gating_init=0.3"]), "t")
    with compat.writes_into(tmp_path / "rb"):
        stock = Trainer(stage.rb_config, stage.model)
    for split in ("valid", "test"):
        ours = stage.evaluator.evaluate(stage.model, split)["full"]
        theirs = stock.evaluate(stage.evaluator.loaders[split], load_best_model=False)
        assert set(theirs) == set(ours)
        for key, value in theirs.items():
            assert abs(ours[key] - float(value)) < 1e-9, key


def test_sampled_negatives_exclude_everything_the_user_saw_and_stay_fixed(tmp_path):
    stage = Stage(tiny_config("stage1.yaml", tmp_path / "run", None, ["load=[]"]), "t")
    ev, ds = stage.evaluator, stage.dataset
    assert ev.negatives.shape == (ds.user_num, SAMPLED_NEGATIVES)
    for u in range(1, 31):
        seen = set(ds.sequence_items[ds.sequence_offsets[u]:ds.sequence_offsets[u + 1]].tolist())
        assert seen and not seen & set(ev.negatives[u].tolist())
        assert 0 not in ev.negatives[u].tolist()
    again = Stage(tiny_config("stage1.yaml", tmp_path / "run2", None, ["load=[]"]), "t").evaluator
    assert torch.equal(ev.negatives, again.negatives)


def test_sampled_scores_are_the_models_predict_scores(tmp_path, features):
    """Gathering columns from full ranking gives what `predict` gives for those candidates."""
    stage = Stage(tiny_config("stage3.yaml", tmp_path / "run", features, ["load=[]", "model.gating_init=0.3"]), "t")
    model = stage.model.eval()
    interaction = next(iter(stage.evaluator.loaders["valid"]))[0]
    users = interaction["user_id"]
    with torch.no_grad():
        full = model.full_sort_predict(interaction)
        negative = stage.evaluator.negatives[users][:, 3]
        interaction.update(Interaction({"item_id": negative}))
        torch.testing.assert_close(model.predict(interaction), full.gather(1, negative.unsqueeze(1)).squeeze(1),
                                   rtol=1e-5, atol=1e-5)
