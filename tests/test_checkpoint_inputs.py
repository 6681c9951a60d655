"""Checkpoints that must not load: another dataset or shape, a missing group, a truncated file, a
file carrying code. Each stops the run before training: exit code 2, one message naming the
culprit, no traceback, no run folder. (Config and data cases live in tests/bad_inputs/.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
from conftest import ROOT, recbole_example_dir

TINY = [f"data.path={recbole_example_dir()}", "data.max_users=20", "model.hidden_size=16", "model.n_layers=1",
        "model.inner_size=32", "federated.rounds=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real tiny stage-1 checkpoint to load in the cases that need one."""
    folder = tmp_path_factory.mktemp("ckpt")
    assert run.main(["--config", str(ROOT / "yamls" / "stage1.yaml"), "--quiet", "--set", f"run_dir={folder}",
                     *sum((["--set", s] for s in TINY), [])]) == 0
    return folder / "best.pt"


def load(path, groups="[item_embedding, position_embedding, trm_encoder, LayerNorm]"):
    return f"load=[{{checkpoint: {path}, groups: {groups}}}]"


class Exploit:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/ur4rec-pwned",))


def cases(tmp_path, checkpoint, features):
    text = f"data.text_features={features['text']}"
    payload = torch.load(checkpoint, weights_only=True)
    other_vocab, no_encoder, truncated, code, shape = (tmp_path / f"{n}.pt" for n in
                                                      ("other", "no_encoder", "truncated", "code", "shape"))
    torch.save({**payload, "meta": {**payload["meta"], "item_vocabulary": "0123456789abcdef"}}, other_vocab)
    torch.save({**payload, "state_dict": {k: v for k, v in payload["state_dict"].items()
                                          if not k.startswith("trm_encoder")}}, no_encoder)
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    torch.save({"state_dict": payload["state_dict"], "meta": Exploit()}, code)
    wide = dict(payload["state_dict"], **{"position_embedding.weight": torch.zeros(7, 3)})
    torch.save({**payload, "state_dict": wide}, shape)
    return {
        "other dataset": ([text, load(other_vocab)], "other.pt"),
        "missing group": ([text, load(no_encoder)], "trm_encoder"),
        "truncated": ([text, load(truncated)], "truncated.pt: not a readable checkpoint (truncated or corrupt"),
        "carries code": ([text, load(code)], "code.pt: refused: it holds Python objects"),
        "other shape": ([text, load(shape)], "(7, 3)"),
    }


def test_each_bad_input_stops_cleanly(tmp_path, checkpoint, features, capsys):
    for name, (sets, culprit) in cases(tmp_path, checkpoint, features).items():
        run_dir = tmp_path / "runs" / name.replace(" ", "_")
        argv = ["--config", str(ROOT / "yamls" / "stage2.yaml"), "--quiet",
                *sum((["--set", s] for s in [*TINY, f"run_dir={run_dir}", *sets]), [])]
        code = run.main(argv)
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("error: ") and culprit in err.replace("\n", " "), (name, err)
        assert "Traceback" not in err, name
        assert not run_dir.exists(), f"{name}: left a run folder behind"
    assert not os.path.exists("/tmp/ur4rec-pwned")


def test_command_line_exit_code_and_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(ROOT / "yamls" / "stage1.yaml"),
                          "--set", "federated.rounds=-1"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "federated.rounds = -1 must be > 0" in out.stderr and "Traceback" not in out.stderr
