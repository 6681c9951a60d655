"""The item-content option: an item's projected features add to its own score vector."""
from __future__ import annotations

import torch

from conftest import tiny_config, write_features
from recbole_ext.pipeline import Stage
from test_backends import EQUAL_SETS, assert_same_update, one_round


def content_stage(tmp_path, stage_file="stage2.yaml", sets=()):
    # Text for items 1-1000 only, so some items of the catalogue have no content.
    text = write_features(tmp_path / "text.npz", 384, 3, n_items=1000)
    cfg = tiny_config(stage_file, tmp_path / "run", None,
                      ["load=[]", f"data.text_features={text}", "model.item_content=true", *sets])
    return Stage(cfg, stage_file)


def test_an_items_score_adds_its_own_projected_text_and_nothing_without_text(tmp_path):
    stage = content_stage(tmp_path, sets=["model.align=false"])
    model = stage.model.eval()
    interaction = next(iter(stage.evaluator.loaders["test"]))[0]
    with torch.no_grad():
        state = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
        scores = model.full_sort_predict(interaction)
        has_text = model.available[:, 1]
        content = model.text_proj(model.text_feat) * has_text.unsqueeze(1)
        torch.testing.assert_close(scores, state @ (model.item_embedding.weight + content).T)
        id_only = state @ model.item_embedding.weight.T
    assert (~has_text[1:]).any() and has_text.any()
    assert torch.equal(scores[:, ~has_text], id_only[:, ~has_text])
    assert not torch.allclose(scores[:, has_text], id_only[:, has_text])


def test_stage2_with_item_content_trains_the_projector_within_budget(tmp_path):
    # At the shipped width: stage2.yaml's expect.max_trainable_params (200K) is checked when the stage is built.
    stage = content_stage(tmp_path, sets=["model.align=false", "model.hidden_size=128", "model.inner_size=256"])
    assert "text_proj" in stage.trainable and sum(stage.trainable.values()) <= 200_000
    model = stage.model.train()
    interaction = next(iter(stage.evaluator.loaders["valid"]))[0]
    model.zero_grad()
    state = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    model.score(state, torch.arange(model.n_items).unsqueeze(0), model.memory_ids(None, len(state)))[0].sum().backward()
    # Without align, the content term is the projector's only path to the score.
    assert model.text_proj.weight.grad.abs().sum() > 0
    assert model.item_embedding.weight.grad is None


def test_backends_agree_with_item_content(tmp_path):
    stage = content_stage(tmp_path, "stage3.yaml", EQUAL_SETS)
    initial = {k: v.clone() for k, v in stage.model.state_dict().items()}
    clients = stage.windows.clients[:6]
    assert_same_update(one_round(stage, initial, "sequential", stage.cfg, clients),
                       one_round(stage, initial, "vectorized", stage.cfg, clients))
