"""A run killed mid-round and resumed ends with the same metrics, round by round, as one never killed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import run as run_py
from conftest import ROOT, recbole_example_dir
from recbole_ext.config import load_config
from recbole_ext.runs import RunFolder

pytestmark = pytest.mark.slow

SETS = [f"data.path={recbole_example_dir()}", "federated.rounds=30", "federated.clients_per_round=12",
        "state_every=1", "eval.every=2", "federated.server_optimizer=adam", "federated.server_lr=0.01"]


def command(run_dir, *extra):
    sets = sum((["--set", s] for s in [*SETS, f"run_dir={run_dir}"]), [])
    return [sys.executable, str(ROOT / "run.py"), "--config", str(ROOT / "yamls" / "smoke.yaml"), "--quiet",
            *sets, *extra]


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


SHORT = ("--set", "federated.rounds=10")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The smoke run's 10 rounds, never stopped (run in this process; each resume below is a fresh one)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert run_py.main(command(run_dir, *SHORT)[2:]) == 0
    return run_dir


def test_sigkill_mid_round_then_resume_matches_uninterrupted(tmp_path, reference):
    # 10 rounds: the kill lands after the third metrics line and before the last round
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, *SHORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        path = killed / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics(killed))
    assert 3 <= done < 10, "the kill should land before the run finished"

    subprocess.run(command(killed, *SHORT, "--resume", str(killed)), check=True, capture_output=True)
    assert metrics(killed) == metrics(reference)
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (killed, reference))
    assert ours["test"] == theirs["test"] and ours["best_round"] == theirs["best_round"]
    assert torch.equal(torch.load(killed / "best.pt", weights_only=True)["state_dict"]["item_embedding.weight"],
                       torch.load(reference / "best.pt", weights_only=True)["state_dict"]["item_embedding.weight"])


def test_resume_refuses_a_changed_config(tmp_path, capsys):
    # config.yaml alone decides, before any data is read: a folder holding only it is enough
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", *SETS]
    RunFolder(run_dir).create(load_config(ROOT / "yamls" / "smoke.yaml", sets))
    args = sum((["--set", s] for s in sets), [])
    code = run_py.main(["--config", str(ROOT / "yamls" / "smoke.yaml"), "--quiet", *args, "--resume", str(run_dir),
                        "--set", "optim.learning_rate=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "optim.learning_rate" in err and "Traceback" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_a_finished_run_resumed_with_more_rounds_continues_as_if_never_stopped(tmp_path, capsys, reference):
    extended = tmp_path / "extended"
    subprocess.run(command(extended, "--set", "federated.rounds=4"), check=True, capture_output=True)
    assert len(metrics(extended)) == 4
    subprocess.run(command(extended, "--resume", str(extended), *SHORT), check=True, capture_output=True)
    assert metrics(extended) == metrics(reference)
    summary = json.loads((extended / "summary.json").read_text())
    assert summary["test"] == json.loads((reference / "summary.json").read_text())["test"]
    assert summary["wall_seconds"] >= sum(json.loads(line)["seconds"]
                                          for line in (extended / "metrics.jsonl").read_text().splitlines())

    capsys.readouterr()
    shrink = command(extended, "--resume", str(extended), "--set", "federated.rounds=9")
    assert run_py.main(shrink[2:]) == 2 and "federated.rounds 10 -> 9" in capsys.readouterr().err


def test_a_run_stopped_by_patience_resumed_unchanged_trains_no_further(tmp_path):
    run_dir = tmp_path / "run"
    stopping = ["--set", "eval.every=1", "--set", "eval.patience=1"]
    assert run_py.main(command(run_dir, *stopping)[2:]) == 0  # in this process; the resume is a fresh one
    stopped = metrics(run_dir)
    assert len(stopped) < 30, "patience 1 should stop the smoke run before its 30 rounds"
    summary = (run_dir / "summary.json").read_text()
    subprocess.run(command(run_dir, "--resume", str(run_dir), *stopping), check=True, capture_output=True)
    assert metrics(run_dir) == stopped
    assert json.loads((run_dir / "summary.json").read_text())["test"] == json.loads(summary)["test"]
