"""Each bad input stops the run before training: exit code 2, one message naming the culprit,
no traceback, no run folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run
from conftest import ROOT, recbole_example_dir, write_features

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


def bad_features(folder: Path, kind: str) -> str:
    path = write_features(folder / f"{kind}.npz", 384, 0)
    data = dict(np.load(path))
    if kind == "nan":
        data["emb"][5, 3] = np.nan
    elif kind == "inf":
        data["emb"][7, 0] = np.inf
    elif kind == "width":
        data["emb"] = data["emb"][:, :300]
    elif kind == "unknown":
        data["ids"] = np.concatenate([data["ids"], ["99999"]])
        data["emb"] = np.concatenate([data["emb"], data["emb"][:1]])
    np.savez(path, **data)
    return str(path)


def cases(tmp_path, checkpoint, features):
    text = f"data.text_features={features['text']}"
    other_vocab = tmp_path / "other.pt"
    payload = torch.load(checkpoint, weights_only=True)
    payload["meta"]["item_vocabulary"] = "0123456789abcdef"
    torch.save(payload, other_vocab)
    no_encoder = tmp_path / "no_encoder.pt"
    payload = torch.load(checkpoint, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("trm_encoder")}
    torch.save(payload, no_encoder)
    return {
        "misspelled pattern": ("stage2.yaml", [text, "trainable=[text_projj.*]", "load=[]"], "text_projj"),
        "unknown key": ("stage1.yaml", ["model.hiden_size=8"], "model.hiden_size"),
        "missing checkpoint": ("stage2.yaml", [text, load(tmp_path / "nowhere.pt")], "nowhere.pt"),
        "other dataset": ("stage2.yaml", [text, load(other_vocab)], "other.pt"),
        "missing group": ("stage2.yaml", [text, load(no_encoder)], "trm_encoder"),
        "feature NaN": ("stage2.yaml", ["load=[]", f"data.text_features={bad_features(tmp_path, 'nan')}"], "nan.npz"),
        "feature inf": ("stage2.yaml", ["load=[]", f"data.text_features={bad_features(tmp_path, 'inf')}"], "inf.npz"),
        "feature width": ("stage2.yaml", ["load=[]", f"data.text_features={bad_features(tmp_path, 'width')}"],
                          "width.npz"),
        "unknown item id": ("stage2.yaml", ["load=[]", f"data.text_features={bad_features(tmp_path, 'unknown')}"],
                            "99999"),
    }


def test_each_bad_input_stops_cleanly(tmp_path, checkpoint, features, capsys):
    for name, (stage_file, sets, culprit) in cases(tmp_path, checkpoint, features).items():
        run_dir = tmp_path / "runs" / name.replace(" ", "_")
        argv = ["--config", str(ROOT / "yamls" / stage_file), "--quiet",
                *sum((["--set", s] for s in [*TINY, f"run_dir={run_dir}", *sets]), [])]
        code = run.main(argv)
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("error: ") and culprit in err.replace("\n", " "), (name, err)
        assert "Traceback" not in err, name
        assert not run_dir.exists(), f"{name}: left a run folder behind"


def test_command_line_exit_code_and_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(ROOT / "yamls" / "stage1.yaml"),
                          "--set", "federated.rounds=-1"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "federated.rounds = -1 must be > 0" in out.stderr and "Traceback" not in out.stderr
