"""`run.py items`: a trained run's item vectors by the item's training interactions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import run
from conftest import tiny_config
from recbole_ext.analysis.item_vectors import item_vectors, slice_table
from recbole_ext.pipeline import Stage


def test_the_slice_table_holds_each_slices_items_norms_and_cosines():
    ids = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    content = np.array([[-3.0, -4.0], [0.0, 1.0], [0.0, 1.0], [2.0, 2.0]])
    result = slice_table(ids, content, np.array([0, 3, 7, 12]), (1, 10))
    assert list(result) == ["item 0", "item 1-9", "item 10+"]
    assert result["item 0"] == {"items": 1, "id_norm": 5.0, "content_norm": 5.0, "vector_norm": 0.0,
                                "cosine": -1.0}
    assert result["item 1-9"]["items"] == 2
    assert result["item 1-9"]["id_norm"] == pytest.approx(1.5)
    assert result["item 1-9"]["cosine"] == pytest.approx(0.5)  # orthogonal and parallel
    assert result["item 1-9"]["vector_norm"] == pytest.approx((np.sqrt(2) + 3.0) / 2)
    assert result["item 10+"]["cosine"] == pytest.approx(1.0)
    assert set(slice_table(ids, None, np.array([0, 3, 7, 12]), (10,))["item 0-9"]) == {"items", "id_norm"}


@pytest.fixture(scope="module")
def content_run(tmp_path_factory, features):
    run_dir = tmp_path_factory.mktemp("items") / "run"
    cfg = tiny_config("stage1.yaml", run_dir, features,
                      ["model.item_content=true", "federated.rounds=1",
                       "trainable=[item_embedding.*, position_embedding.*, trm_encoder.*, LayerNorm.*, text_proj.*]"])
    stage = Stage(cfg, "stage1.yaml")
    stage.run(show_progress=False)
    return run_dir, stage


def test_items_reads_the_best_checkpoint_and_covers_every_real_item_once(content_run):
    run_dir, stage = content_run  # the stage's model holds best.pt after run()
    result = item_vectors(str(run_dir), (5,))
    counts = stage.evaluator.item_counts[1:]
    assert sum(entry["items"] for entry in result.values()) == len(stage.item_tokens) - 1
    assert result["item 0-4"]["items"] == int((counts < 5).sum())
    with torch.no_grad():
        ids = stage.model.item_embedding.weight[1:].numpy()
        content = stage.model.content_vectors()[1:].numpy()
    frequent = counts >= 5
    assert result["item 5+"]["id_norm"] == pytest.approx(np.linalg.norm(ids[frequent], axis=1).mean(), rel=1e-5)
    assert result["item 5+"]["content_norm"] == pytest.approx(
        np.linalg.norm(content[frequent], axis=1).mean(), rel=1e-5)


def test_the_command_prints_the_table_and_writes_the_json(content_run, tmp_path, capsys):
    run_dir, _ = content_run
    out = tmp_path / "items.json"
    assert run.main(["items", str(run_dir), "--item-count-bins", "3,20", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| item 3-19 |" in printed and "cosine" in printed
    written = json.loads(out.read_text())
    assert written["run"] == str(run_dir)
    assert set(written["slices"]) <= {"item 0-2", "item 3-19", "item 20+"}
    assert written["slices"]["item 3-19"] == item_vectors(str(run_dir), (3, 20))["item 3-19"]


def test_a_folder_without_a_checkpoint_is_an_error_naming_it(tmp_path, capsys):
    assert run.main(["items", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
