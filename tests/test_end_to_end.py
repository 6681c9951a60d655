"""Real runs through the command line, in a small form: prepare, the smoke run, a centralized run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow


def run_py(*args, cwd):
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    run_py("prepare", "ml100k", "--out", "data", cwd=folder)
    return folder


def test_smoke_run_writes_the_run_folder(workdir):
    stdout = run_py("--config", str(ROOT / "yamls" / "smoke.yaml"), "--quiet", cwd=workdir)
    assert "train  trm_encoder" in stdout and "frozen text_proj" in stdout  # groups printed before training
    run_dir = workdir / "runs" / "smoke"
    assert stdout.strip().endswith(f"run folder: {run_dir}")
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["round"] for l in lines] == [1, 2, 3]
    for key in ("rec_loss", "align_loss", "lb_loss", "router_visual", "router_text", "gamma", "align_visual",
                "align_text", "trainable_params", "bytes_up", "seconds", "valid"):
        assert key in lines[0], key
    assert set(lines[0]["valid"]) == {"full", "uni100"} and "ndcg@10" in lines[0]["valid"]["full"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == 1 and summary["best_round"] in (1, 2, 3)
    assert summary["trainable_params"] == sum(summary["trainable_groups"].values()) == lines[0]["trainable_params"]
    for protocol in ("full", "uni100"):
        for split in ("valid", "test"):
            assert {"hit@10", "ndcg@10", "mrr@10", "hit@5", "ndcg@20"} <= set(summary[split][protocol])
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    assert checkpoint["meta"]["round"] == summary["best_round"]
    assert (run_dir / "config.yaml").is_file()
    report = run_py("report", str(run_dir), cwd=workdir)
    assert "smoke" in report and f"{summary['test']['full']['hit@10']:.4f}" in report


def test_centralized_baseline_runs(workdir):
    run_py("--config", str(ROOT / "yamls" / "smoke.yaml"), "--quiet", "--set", "trainer=centralized",
           "--set", "centralized.epochs=2", "--set", "run_dir=runs/central", cwd=workdir)
    lines = [json.loads(l) for l in (workdir / "runs" / "central" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2] and lines[0]["bytes_up"] == 0
    assert lines[1]["loss"] < lines[0]["loss"]
