"""Per-user metrics and slices: RecBole's own per-user values, which partition into slices whose
user-weighted means are the overall metrics."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from recbole_ext.evaluation import PROTOCOLS, history_slices, item_count_slices
from recbole_ext.pipeline import Stage
from recbole_ext.analysis.popularity import Popularity

ROUNDING = 0.5e-4 + 1e-12  # RecBole rounds its metrics to 4 decimals (metric_decimal_place)


@pytest.fixture(scope="module")
def stage(tmp_path_factory, features):
    cfg = tiny_config("stage3.yaml", tmp_path_factory.mktemp("slices") / "run", features,
                      ["load=[]", "model.gating_init=0.3", "data.max_users=120"])
    return Stage(cfg, "t")


@pytest.fixture(scope="module", params=["popularity", "untrained stage 3"])
def model(request, stage):
    if request.param == "popularity":
        import torch
        return Popularity(torch.from_numpy(stage.evaluator.item_counts))
    return stage.model


@pytest.mark.parametrize("split", ["valid", "test"])
def test_per_user_means_are_recboles_numbers(stage, model, split):
    result = stage.evaluator.evaluate_users(model, split)
    assert result.names == [f"{m}@{k}" for m in ("hit", "ndcg", "mrr") for k in (5, 10, 20)]
    assert len(result.users) == len(set(result.users.tolist())) == 120
    for p in PROTOCOLS:
        assert set(result.metrics[p]) == set(result.names)
        means = result.values[p].mean(axis=0)
        for name, mean in zip(result.names, means):
            assert abs(mean - result.metrics[p][name]) <= ROUNDING, (p, name)
    assert result.metrics == stage.evaluator.evaluate(model, split)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_slices_partition_the_users_and_reproduce_the_overall_metric(stage, model, split):
    result = stage.evaluator.evaluate_users(model, split)
    slices = result.slices()
    assert set(slices) == set(PROTOCOLS)
    assert any(result.values["full"][:, result.names.index("hit@20")]), "the check needs some hits"
    for p in PROTOCOLS:
        for prefix in ("item ", "hist "):
            members = {label: s for label, s in slices[p].items() if label.startswith(prefix)}
            assert len(members) >= 2 and sum(s["users"] for s in members.values()) == len(result.users)
            for i, name in enumerate(result.names):
                weighted = sum(s["users"] * s["metrics"][name] for s in members.values()) / len(result.users)
                assert weighted == pytest.approx(result.values[p][:, i].mean(), abs=1e-12), (p, prefix, name)
                assert abs(weighted - result.metrics[p][name]) <= ROUNDING, (p, prefix, name)


def test_slices_count_the_training_interactions_only(stage):
    """The counts the slices use are those of the training windows the model trains on."""
    result = stage.evaluator.evaluate_users(stage.model, "test")
    history = stage.windows.history
    trained = np.bincount(np.concatenate(history), minlength=stage.dataset.item_num)
    assert np.array_equal(result.item_counts, trained[result.targets])
    assert np.array_equal(result.history, [len(history[u]) for u in result.users])
    index, labels = result.slicings()[1]
    assert labels[0].startswith("hist ") and len(labels) == 4
    quarter = np.bincount(index) / len(index)
    assert np.all(quarter > 0.1), quarter  # quartiles, up to ties


def test_item_count_bins_and_their_labels():
    index, labels = item_count_slices(np.array([0, 1, 4, 5, 9, 10, 49, 50, 3000]), (1, 5, 10, 50))
    assert labels == ["item 0", "item 1-4", "item 5-9", "item 10-49", "item 50+"]
    assert index.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert item_count_slices(np.array([0, 1, 2]), (1, 2))[1] == ["item 0", "item 1", "item 2+"]
    assert item_count_slices(np.array([0, 7]), ())[1] == ["item 0+"]


def test_history_quantiles_state_their_length_ranges():
    index, labels = history_slices(np.arange(3, 11), 4)  # lengths 3..10, two users per quarter
    assert labels == ["hist 3-4", "hist 5-6", "hist 7-8", "hist 9-10"]
    assert np.bincount(index).tolist() == [2, 2, 2, 2]
    index, labels = history_slices(np.array([5, 5, 5, 9, 9, 9]), 4)  # ties merge quantiles
    assert labels == ["hist 5-8", "hist 9"] and index.tolist() == [0, 0, 0, 1, 1, 1]
    assert history_slices(np.array([4, 4]), 4)[1] == ["hist 4"]
