"""The `flower` backend (recbole_ext/federated/flower): a stage over Flower's deployment engine, on
loopback processes this test starts and stops through run.py. Skipped without the optional install
(`make flower`; CI has it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from conftest import ROOT  # noqa: E402
from recbole_ext.errors import UserError  # noqa: E402
from recbole_ext.federated.aggregate import RoundSums  # noqa: E402
from recbole_ext.federated.flower import records  # noqa: E402
from recbole_ext.federated.flower.backend import FlowerBackend  # noqa: E402
from recbole_ext.federated.flower.deploy import free_port  # noqa: E402

NO_DROPOUT = ["--set", "model.hidden_dropout_prob=0.0", "--set", "model.attn_dropout_prob=0.0"]


def run_py(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("modulus", [None, 2 ** 40])
def test_a_nodes_sums_arrive_as_they_left(modulus):
    dtype = torch.float32 if modulus is None else torch.int64
    update = {"item_embedding.weight": torch.arange(12, dtype=dtype).reshape(4, 3) * 3,
              "LayerNorm.bias": torch.arange(3, dtype=dtype)}
    sums = RoundSums(update, {"loss": torch.tensor(2.5), "gate": torch.tensor([0.25, 0.75])}, 7.0, 3, 1234, modulus)
    back = records.read_sums(records.sums_reply(sums), torch.device("cpu"))
    assert back.update.keys() == update.keys()
    for name, value in update.items():
        assert torch.equal(back.update[name], value) and back.update[name].dtype == value.dtype
    assert torch.equal(back.stats["gate"], sums.stats["gate"]) and float(back.stats["loss"]) == 2.5
    assert (back.weight, back.clients, back.bytes_up, back.modulus) == (7.0, 3, 1234, modulus)


def test_users_are_dealt_to_the_nodes_round_robin():
    owners = records.partition_of(np.arange(1, 11), 4)
    assert owners.tolist() == [1, 2, 3, 0, 1, 2, 3, 0, 1, 2]


def test_the_backend_outside_a_serverapp_is_refused():
    with pytest.raises(UserError, match="inside a Flower ServerApp"):
        FlowerBackend(None, None, {})


@pytest.mark.slow
def test_three_smoke_rounds_on_four_supernodes_equal_the_vectorized_backend(tmp_path):
    """Each node trains the round's clients it holds with the vectorized backend: the same global
    parameters as that backend to 1e-5 (the sums add up in another order), and the same metrics."""
    vectorized = run_py("--config", "yamls/smoke.yaml", "--set", f"run_dir={tmp_path / 'vectorized'}",
                        "--set", "federated.backend=vectorized", "--quiet", *NO_DROPOUT)
    assert vectorized.returncode == 0, vectorized.stderr[-3000:]
    started = time.monotonic()
    flower = run_py("--config", "yamls/smoke.yaml", "--set", f"run_dir={tmp_path / 'flower'}",
                    "--set", "federated.backend=flower", "--set", "federated.flower.nodes=4", "--quiet", *NO_DROPOUT)
    assert flower.returncode == 0, flower.stdout[-3000:] + flower.stderr[-3000:]
    print(f"flower run: {time.monotonic() - started:.0f} s")
    ours = torch.load(tmp_path / "flower" / "state.pt", weights_only=False)["model"]
    reference = torch.load(tmp_path / "vectorized" / "state.pt", weights_only=False)["model"]
    worst = max(float((ours[k].float() - reference[k].float()).abs().max()) for k in reference)
    assert 0 < max(float((reference[k].float()).abs().max()) for k in reference)
    assert worst < 1e-5, f"the flower run's parameters differ from the vectorized run's by {worst:.2e}"
    logs = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("vectorized", "flower")]
    assert [r["round"] for r in logs[1]] == [r["round"] for r in logs[0]] == [1, 2, 3]
    for theirs, mine in zip(*logs):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    assert "run folder:" in flower.stdout and "error" not in flower.stderr.lower()
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "flower")], capture_output=True, text=True).stdout
    assert not leftovers.strip()


def test_an_unreachable_superlink_is_a_clear_error_that_writes_nothing(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = run_py("--config", "yamls/smoke.yaml", "--set", f"run_dir={tmp_path / 'run'}", "--set",
                    "federated.backend=flower", "--set", f"federated.flower.address={address}", timeout=120)
    assert result.returncode == 2
    assert address in result.stderr and "SuperLink" in result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()
