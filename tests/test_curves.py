"""`run.py curves`: validation against passes over the users and wall time, from real tiny runs."""
from __future__ import annotations

import json

import pytest

import run as run_py
from conftest import tiny_config
from recbole_ext.pipeline import Stage


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    # 30 users: 6 clients a round is a fifth of a pass; the centralized epoch is a whole one.
    fed = tiny_config("stage1.yaml", root / "fed", None, ["federated.rounds=5", "federated.clients_per_round=6",
                                                           "eval.every=2"])
    central = tiny_config("stage1_centralized.yaml", root / "central", None, ["centralized.epochs=2"])
    for cfg in (fed, central):
        Stage(cfg, "tiny").run(show_progress=False)
    return root


def test_curves_put_runs_on_passes_and_cumulative_wall_time(runs, tmp_path, capsys):
    out, records = tmp_path / "curves.png", tmp_path / "curves.json"
    assert run_py.main(["curves", str(runs / "fed"), str(runs / "central"), "--out", str(out),
                        "--json", str(records)]) == 0
    assert out.stat().st_size > 0
    fed, central = json.loads(records.read_text())
    lines = [json.loads(line) for line in (runs / "fed" / "metrics.jsonl").read_text().splitlines()]
    assert [p["round"] for p in fed["points"]] == [2, 4, 5]  # every 2nd round and the last
    assert [p["passes"] for p in fed["points"]] == pytest.approx([0.4, 0.8, 1.0])
    assert fed["points"][1]["seconds"] == pytest.approx(sum(line["seconds"] for line in lines[:4]), abs=0.1)
    assert [p["value"] for p in fed["points"]] == [lines[i]["valid"]["full"]["ndcg@10"] for i in (1, 3, 4)]
    assert fed["setting"]["clients_per_round"] == 6 and central["setting"] == {}
    assert fed["points"][0]["update_abs"] == lines[1]["update_abs"] and "update_abs" not in central["points"][0]
    assert [p["passes"] for p in central["points"]] == [1.0, 2.0]
    assert fed["best"]["value"] == max(p["value"] for p in fed["points"])
    assert "| fed | federated |" in capsys.readouterr().out


def test_a_run_from_before_passes_were_recorded_is_refused_by_name(runs, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.yaml", "summary.json"):
        (old / name).write_text((runs / "fed" / name).read_text())
    lines = [json.loads(line) for line in (runs / "fed" / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in line.items() if k != "passes"}) + "\n"
                                               for line in lines))
    assert run_py.main(["curves", str(old), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert str(old) in err and "passes" in err
    assert not (tmp_path / "x.png").exists()


def test_a_committed_record_draws_beside_new_runs_and_a_bad_one_is_named(runs, tmp_path, capsys):
    first = tmp_path / "first.json"
    assert run_py.main(["curves", str(runs / "fed"), str(runs / "central"), "--out", str(tmp_path / "a.png"),
                        "--json", str(first)]) == 0
    fed, central = json.loads(first.read_text())
    again = tmp_path / "again.json"
    assert run_py.main(["curves", str(runs / "central"), "--record", f"{first}#{fed['run']}",
                        "--out", str(tmp_path / "b.png"), "--json", str(again)]) == 0
    assert json.loads(again.read_text()) == [fed, central]  # the record's curve as it was, then the run's
    capsys.readouterr()
    assert run_py.main(["curves", "--record", f"{first}#nope", "--out", str(tmp_path / "c.png")]) == 2
    assert "nope" in capsys.readouterr().err
    assert run_py.main(["curves", "--record", str(first), "--metric", "hit@10", "--out", str(tmp_path / "d.png")]) == 2
    assert "not full hit@10" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "d.png").exists()
