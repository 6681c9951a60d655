"""`run.py baseline --model Pop`: items ranked by their training interactions, on a stage's split,
scored by our evaluator.

The toy data set is built so that the popularity ranking is known by hand: item i (1..30) is in the
training part of users 1..i, so it has i training interactions and rank 30 - i; items 31..35 open one
sequence in five (6 each, below the top 20). Every validation target is item 36, which no training
sequence holds, so a popularity that counted held-out targets would lift it to the top.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from recbole_ext.config import load_config
from recbole_ext.pipeline import Split, recbole_settings
from recbole_ext.analysis.popularity import Popularity, training_counts
from recbole_ext.analysis.report import read_summary, record, table

USERS = range(1, 31)
HELD_OUT = 36  # every user's validation target, and users 1-10's test target


def sequence(user: int) -> list[int]:
    test = HELD_OUT if user <= 10 else 7 * user % 30 + 1
    return [31 + user % 5, *range(user, 31), HELD_OUT, test]


def training_count(item: int) -> int:
    return item if item <= 30 else 6 if item <= 35 else 0


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "toy").mkdir()
    lines, stamp = ["user_id:token\titem_id:token\ttimestamp:float"], 0
    for user in USERS:
        for item in sequence(user):
            stamp += 1
            lines.append(f"{user}\t{item}\t{stamp}")
    (folder / "toy" / "toy.inter").write_text("\n".join(lines) + "\n")
    return load_config(ROOT / "yamls" / "stage1.yaml", [f"data.path={folder}", "data.dataset=toy",
                                                         f"run_dir={folder / 'pop'}"])


def run_main(*argv) -> int:
    import run
    return run.main(list(argv))


def test_scores_are_the_training_counts_without_validation_or_test_targets(cfg):
    from recbole_ext.model.ur4rec_moe import UR4RecMoE

    split = Split.load(cfg, "t", UR4RecMoE, recbole_settings(cfg))
    counts = training_counts(split)
    assert {token: int(counts[i]) for i, token in enumerate(split.item_tokens) if i} == \
        {str(item): training_count(item) for item in range(1, 37)}
    users = next(iter(split.test))[0]
    scores = Popularity(counts).full_sort_predict(users)
    assert torch.equal(scores, counts.float().expand(len(users), -1))


def test_metrics_are_the_evaluators_on_the_hand_ranking(cfg, capsys):
    assert run_main("baseline", "--config", str(ROOT / "yamls" / "stage1.yaml"), "--model", "pop",
                    "--set", f"data.path={cfg['data']['path']}", "--set", "data.dataset=toy",
                    "--set", f"run_dir={cfg['run_dir']}") == 0
    assert "test (baseline-pop):" in capsys.readouterr().out
    summary = json.loads(Path(cfg["run_dir"], "summary.json").read_text())
    # Full ranking scores every item (RecBole masks no history for sequential models), so the rank of a
    # target is the number of items with more training interactions; no tie reaches the top 20.
    ranks = []
    for user in USERS:
        target = sequence(user)[-1]
        ranks.append(sum(training_count(item) > training_count(target) for item in range(1, 37)))
    expected = {"hit@10": sum(r < 10 for r in ranks), "hit@20": sum(r < 20 for r in ranks),
                "ndcg@10": sum(1 / math.log2(r + 2) for r in ranks if r < 10),
                "mrr@10": sum(1 / (r + 1) for r in ranks if r < 10)}
    assert expected["hit@10"] == 7  # the data set does what the docstring says
    for metric, total in expected.items():
        assert summary["test"]["full"][metric] == round(total / len(USERS), 4), metric
    assert summary["valid"]["full"]["hit@20"] == 0.0  # item 36 has no training interaction
    assert 0 < summary["test"]["uni100"]["hit@10"] <= 1
    assert (summary["model"], summary["trainable_params"], summary["best_round"]) == ("Pop", 0, None)
    assert table([record(read_summary(cfg["run_dir"]))]).splitlines()[2].split()[:3] == ["baseline-pop", "-", "0.2333"]  # under the heading


@pytest.mark.parametrize("flags, message", [
    (["--model", "Pop", "--epochs", "3"], "--model Pop trains nothing: drop --epochs"),
    (["--model", "SASRec"], "--model SASRec needs --epochs"),
])
def test_training_options_go_with_trained_models_only(capsys, tmp_path, flags, message):
    code = run_main("baseline", "--config", str(ROOT / "yamls" / "stage1.yaml"), *flags,
                    "--set", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
