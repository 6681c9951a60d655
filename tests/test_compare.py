"""`run.py compare`: two real (tiny) run folders compared user by user."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import run as run_py
from conftest import tiny_config
from recbole_ext.analysis.baseline import popularity_run
from recbole_ext.analysis.compare import compare, load, paired
from recbole_ext.errors import UserError
from recbole_ext.evaluation import PROTOCOLS
from recbole_ext.pipeline import Stage

ROUNDING = 0.5e-4 + 1e-6  # summaries hold RecBole's numbers, rounded to 4 decimals; per-user files float32


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-round stage-1 run and popularity on the same 30 users, and a stage-1 run on 20 of them."""
    root = tmp_path_factory.mktemp("compare")
    Stage(tiny_config("smoke.yaml", root / "stage1"), "t").run(show_progress=False)
    popularity_run(tiny_config("smoke.yaml", root / "pop", sets=["name=pop"]), "t")
    Stage(tiny_config("smoke.yaml", root / "fewer", sets=["data.max_users=20", "federated.rounds=1"]), "t").run(
        show_progress=False)
    return root


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_run_writes_its_per_user_values(runs):
    for split in ("valid", "test"):
        values = load(runs / "stage1", split)
        assert len(values.users) == 30 and values.targets.dtype == np.int64
        assert all(v.dtype == np.float32 and v.shape == (30, 9) for v in values.values.values())
        for p in PROTOCOLS:
            for name in values.names:
                assert abs(values.metrics[p][name] - summary(runs / "stage1")[split][p][name]) <= ROUNDING


def test_a_run_against_itself_differs_by_nothing(runs, capsys):
    a = load(runs / "stage1", "test")
    rows = compare(*paired(a, a, "x", "x"), resamples=200)
    assert {r["slice"] for r in rows} >= {"overall", "item 0"} and any(r["slice"].startswith("hist ") for r in rows)
    for r in rows:
        assert r["difference"] == r["ci_low"] == r["ci_high"] == 0.0 and r["p_wilcoxon"] == 1.0
    assert run_py.main(["compare", str(runs / "stage1"), str(runs / "stage1"), "--bootstrap", "100"]) == 0
    assert "| overall | 30 | full HR@10 |" in capsys.readouterr().out


def test_two_runs_report_the_means_of_their_summaries(runs, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert run_py.main(["compare", str(runs / "stage1"), str(runs / "pop"), "--bootstrap", "500",
                        "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    a, b = summary(runs / "stage1"), summary(runs / "pop")
    for r in rows:
        if r["slice"] == "overall":
            assert abs(r["mean_a"] - a["test"][r["protocol"]][r["metric"]]) <= ROUNDING
            assert abs(r["mean_b"] - b["test"][r["protocol"]][r["metric"]]) <= ROUNDING
        else:
            assert r["users"] == a["slices"]["test"][r["protocol"]][r["slice"]]["users"]
            assert r["mean_a"] == pytest.approx(a["slices"]["test"][r["protocol"]][r["slice"]]["metrics"][r["metric"]],
                                                abs=1e-6)
        assert r["difference"] == pytest.approx(r["mean_b"] - r["mean_a"], abs=1e-12)
        assert r["ci_low"] <= r["ci_high"] and 0 <= r["p_wilcoxon"] <= 1
    assert len({(r["slice"], r["protocol"], r["metric"]) for r in rows}) == len(rows)
    assert any(r["difference"] != 0 for r in rows)
    full = next(r for r in rows if (r["slice"], r["protocol"], r["metric"]) == ("overall", "full", "ndcg@10"))
    assert f"| overall | 30 | full NDCG@10 | {full['mean_a']:.4f} | {full['mean_b']:.4f} |" in table


def test_runs_of_other_users_or_slices_are_refused(runs, tmp_path):
    with pytest.raises(UserError, match=r"stage1 and .*fewer did not evaluate the same users \(30 and 20 users"):
        paired(load(runs / "stage1", "test"), load(runs / "fewer", "test"), runs / "stage1", runs / "fewer")
    with pytest.raises(UserError, match="other targets for 30 of 30 users"):
        paired(load(runs / "stage1", "valid"), load(runs / "stage1", "test"), "A", "B")


def test_a_run_without_per_user_values_is_named(runs, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(runs / "stage1", old)
    (old / "per_user_test.npz").unlink()
    assert run_py.main(["compare", str(old), str(runs / "stage1")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{old}: no per_user_test.npz: the run predates per-user values or is unfinished" in err


def test_the_targets_can_be_sliced_at_other_edges(runs, tmp_path):
    out = tmp_path / "cmp.json"
    assert run_py.main(["compare", str(runs / "stage1"), str(runs / "pop"), "--bootstrap", "50",
                        "--item-count-bins", "10", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    items = [r for r in rows if r["slice"].startswith("item ")]
    assert {r["slice"] for r in items} <= {"item 0-9", "item 10+"}
    a = load(runs / "stage1", "test")
    below = (a.item_counts < 10).sum()
    assert all(r["users"] == (below if r["slice"] == "item 0-9" else 30 - below) for r in items)
    assert run_py.main(["compare", str(runs / "stage1"), str(runs / "pop"), "--item-count-bins", "10,5"]) == 2


def test_a_sampled_evaluation_is_compared_on_the_users_both_scored(runs, tmp_path):
    """eval.sample_users: one fixed sample of users in every run; compare --common-users pairs it with a
    run that scored everyone."""
    stage = Stage(tiny_config("smoke.yaml", tmp_path / "sampled", sets=["eval.sample_users=12"]), "t")
    full = Stage(tiny_config("smoke.yaml", tmp_path / "unused"), "t")
    # a sample changes whom is scored, not what counts as a training interaction
    assert np.array_equal(stage.evaluator.item_counts, full.evaluator.item_counts)
    assert np.array_equal(stage.evaluator.history, full.evaluator.history)
    stage.run(show_progress=False)
    sampled, whole = load(tmp_path / "sampled", "test"), load(runs / "stage1", "test")
    assert len(sampled.users) == 12 and set(sampled.users) < set(whole.users)
    assert np.array_equal(np.sort(load(tmp_path / "sampled", "valid").users), np.sort(sampled.users))
    with pytest.raises(UserError, match="--common-users"):
        paired(whole, sampled, "A", "B")
    a, b = paired(whole, sampled, "A", "B", common_users=True)
    assert np.array_equal(a.users, b.users) and len(a.users) == 12
    # the item counts and history lengths of a user do not depend on which users were scored
    assert np.array_equal(a.item_counts, b.item_counts) and np.array_equal(a.history, b.history)
