"""`run.py ablate`: each score term switched off in turn, the model restored after."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from recbole_ext.analysis.ablate import ablate, switched_off, terms_of
from recbole_ext.errors import UserError
from recbole_ext.pipeline import Stage


@pytest.fixture(scope="module")
def stage3_run(tmp_path_factory, features):
    run_dir = tmp_path_factory.mktemp("ablate") / "run"
    cfg = tiny_config("stage3.yaml", run_dir, features, ["load=[]", "model.gating_init=0.5",
                                                         "model.item_content=true", "federated.rounds=1"])
    stage = Stage(cfg, "stage3.yaml")
    stage.run(show_progress=False)
    return run_dir, stage


@pytest.mark.parametrize("term", ["experts", "align", "content"])
def test_a_switched_off_term_changes_the_scores_and_comes_back(stage3_run, term):
    _, stage = stage3_run
    model = stage.model.eval()
    interaction = next(iter(stage.evaluator.loaders["valid"]))[0]
    with torch.no_grad():
        before = model.full_sort_predict(interaction)
        with switched_off(model, term):
            off = model.full_sort_predict(interaction)
        after = model.full_sort_predict(interaction)
    assert not torch.allclose(off, before)
    assert torch.equal(after, before)


def test_ablate_scores_the_best_checkpoint_with_each_term_off(stage3_run):
    run_dir, stage = stage3_run
    results = ablate(str(run_dir))
    assert list(results) == ["all terms", "experts off", "align off", "content off"]
    summary_valid = stage.evaluator.evaluate(stage.model, "valid")  # the stage's model holds best.pt after run()
    assert results["all terms"] == summary_valid


def test_an_id_only_run_has_nothing_to_switch_off(tmp_path):
    cfg = tiny_config("stage1.yaml", tmp_path / "run", None, ["federated.rounds=1"])
    Stage(cfg, "stage1.yaml").run(show_progress=False)
    with pytest.raises(UserError, match="no term to switch off"):
        ablate(str(tmp_path / "run"))
    assert terms_of(Stage(cfg, "stage1.yaml").model) == []
