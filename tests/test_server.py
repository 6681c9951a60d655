"""The server side: each strategy's step against its paper's formula, the rate schedule, the
strategy's state across --resume, the backends under every strategy, and the default strategy
stepping exactly as the server optimizer did before strategies were declared."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import ROOT, fresh_trainer, tiny_config
from recbole_ext.config import load_config
from recbole_ext.federated.server import Server
from recbole_ext.federated.strategies import rate_factor
from recbole_ext.pipeline import Stage

@pytest.fixture(scope="module")
def fed():
    return load_config(ROOT / "yamls" / "base.yaml")["federated"]


def settings_with(fed: dict, **values) -> dict:
    schedule = {**fed["schedule"], **values.pop("schedule", {})}
    return {"seed": 1, "federated": {**fed, **values, "schedule": schedule}}


def steps(settings: dict, deltas: list[torch.Tensor], start: torch.Tensor) -> list[torch.Tensor]:
    """The parameter after each server step on the mean updates `deltas`, from `start`."""
    param = torch.nn.Parameter(start.clone())
    server = Server({"w": param}, settings, users=10)
    out = []
    for index, delta in enumerate(deltas, start=1):
        server.apply({"w": delta}, {"w": param.detach().clone()}, index)
        out.append(param.detach().clone())
    return out


DELTAS = [torch.tensor([0.02, -0.001, 0.0, 3e-6], dtype=torch.float64),
          torch.tensor([-0.01, -0.002, 0.004, 1e-6], dtype=torch.float64),
          torch.tensor([0.03, 0.0005, -0.004, -2e-6], dtype=torch.float64)]
START = torch.tensor([0.5, -0.2, 0.1, 0.0], dtype=torch.float64)


def test_fedavg_and_fedavgm_follow_their_formulas(fed):
    got = steps(settings_with(fed, server_optimizer="sgd", server_lr=0.7), DELTAS, START)
    x = START.clone()
    for delta, after in zip(DELTAS, got):
        x = x + 0.7 * delta
        torch.testing.assert_close(after, x, rtol=0, atol=1e-15)
    got = steps(settings_with(fed, server_optimizer="sgd", server_lr=0.7, server_momentum=0.9), DELTAS, START)
    x, v = START.clone(), torch.zeros_like(START)
    for delta, after in zip(DELTAS, got):
        v = 0.9 * v + delta
        x = x + 0.7 * v
        torch.testing.assert_close(after, x, rtol=0, atol=1e-15)


def test_fedadam_follows_adam_with_bias_correction(fed):
    b1, b2, tau, lr = 0.8, 0.95, 1e-3, 0.01
    got = steps(settings_with(fed, server_optimizer="adam", server_lr=lr, server_beta1=b1, server_beta2=b2,
                              server_tau=tau), DELTAS, START)
    x, m, v = START.clone(), torch.zeros_like(START), torch.zeros_like(START)
    for t, (delta, after) in enumerate(zip(DELTAS, got), start=1):
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta ** 2
        x = x + lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + tau)
        torch.testing.assert_close(after, x, rtol=0, atol=1e-12)


def test_fedyogi_follows_reddi_et_al_algorithm_2(fed):
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.01
    got = steps(settings_with(fed, server_optimizer="yogi", server_lr=lr, server_beta1=b1, server_beta2=b2,
                              server_tau=tau), DELTAS, START)
    x, m, v = START.clone(), torch.zeros_like(START), torch.full_like(START, tau ** 2)
    for delta, after in zip(DELTAS, got):
        m = b1 * m + (1 - b1) * delta
        v = v - (1 - b2) * delta ** 2 * torch.sign(v - delta ** 2)
        x = x + lr * m / (v.sqrt() + tau)
        torch.testing.assert_close(after, x, rtol=0, atol=1e-12)
    # Yogi's v moves additively, Adam's multiplicatively: after a large first update they differ.
    adam = steps(settings_with(fed, server_optimizer="adam", server_lr=lr, server_beta1=b1, server_beta2=b2,
                               server_tau=tau), DELTAS, START)
    assert not torch.allclose(adam[-1], got[-1])


def test_fedadagrad_follows_its_formula_and_torch_adagrad_without_momentum(fed):
    tau, lr = 1e-3, 0.05
    got = steps(settings_with(fed, server_optimizer="adagrad", server_lr=lr, server_beta1=0.5, server_tau=tau),
                DELTAS, START)
    x, m, v = START.clone(), torch.zeros_like(START), torch.full_like(START, tau ** 2)
    for delta, after in zip(DELTAS, got):
        m = 0.5 * m + 0.5 * delta
        v = v + delta ** 2
        x = x + lr * m / (v.sqrt() + tau)
        torch.testing.assert_close(after, x, rtol=0, atol=1e-12)
    # With beta1 0 it is torch's own Adagrad (the maintained implementation) on -delta.
    ours = steps(settings_with(fed, server_optimizer="adagrad", server_lr=lr, server_beta1=0.0, server_tau=tau),
                 DELTAS, START)
    param = torch.nn.Parameter(START.clone())
    theirs = torch.optim.Adagrad([param], lr=lr, eps=tau, initial_accumulator_value=tau ** 2)
    for delta, after in zip(DELTAS, ours):
        param.grad = -delta
        theirs.step()
        torch.testing.assert_close(after, param.detach(), rtol=0, atol=1e-14)


def test_the_default_strategy_is_the_server_optimizer_of_before(fed):
    """Before strategies were declared the server was torch.optim.Adam(groups, lr=server_lr) with
    torch's defaults; the default config must step bit for bit as it did."""
    assert fed["server_optimizer"] == "adam" and fed["schedule"]["kind"] == "constant"
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(50, 8, generator=generator) * 1e-3 for _ in range(5)]
    start = torch.randn(50, 8, generator=generator)
    got = steps(settings_with(fed), deltas, start)
    param = torch.nn.Parameter(start.clone())
    before = torch.optim.Adam([{"params": [param], "lr": fed["server_lr"]}], lr=fed["server_lr"])
    for delta, after in zip(deltas, got):
        param.grad = -delta
        before.step()
        assert torch.equal(after, param.detach())


@pytest.mark.parametrize("kind, rounds, expected", [
    ("constant", {1: 0.25, 4: 1.0, 100: 1.0}, None),
    ("cosine", {2: 0.5, 5: 1.0, 100: 0.1}, {52: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 95))}),
    ("step", {4: 1.0, 5: 1.0, 34: 1.0, 35: 0.5, 65: 0.25, 95: 0.2, 100: 0.2}, None),
])
def test_the_schedule_gives_the_rate_at_chosen_rounds(kind, rounds, expected):
    schedule = {"kind": kind, "warmup_rounds": 4, "floor": 0.1 if kind == "cosine" else 0.2,
                "step_rounds": 30, "step_factor": 0.5}
    for index, factor in {**rounds, **(expected or {})}.items():
        if kind == "constant" and index <= 4:
            factor = index / 4
        assert rate_factor(schedule, index, 100) == pytest.approx(factor, abs=1e-12), (kind, index)


def test_per_group_rates_follow_the_schedule(fed):
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    settings = settings_with(fed, server_optimizer="sgd", server_lr=1.0, server_lr_groups={"b": 0.1},
                             schedule={"kind": "step", "step_rounds": 1, "step_factor": 0.5}, rounds=5)
    server = Server({"a": a, "b": b}, settings, users=4)
    one = torch.ones(3)
    for index in (1, 2, 3):
        server.apply({"a": one, "b": one}, {"a": a.detach().clone(), "b": b.detach().clone()}, index)
    torch.testing.assert_close(a.detach(), torch.full((3,), 1 + 0.5 + 0.25))
    torch.testing.assert_close(b.detach(), torch.full((3,), 0.1 * (1 + 0.5 + 0.25)))


STRATEGY_SETS = {
    "fedavgm": ["federated.server_optimizer=sgd", "federated.server_lr=1.0", "federated.server_momentum=0.9"],
    "fedyogi": ["federated.server_optimizer=yogi", "federated.server_tau=1.0e-4", "federated.server_beta2=0.99",
                "federated.schedule.kind=cosine", "federated.schedule.warmup_rounds=1"],
    "fedadagrad": ["federated.server_optimizer=adagrad", "federated.schedule.kind=step",
                   "federated.schedule.step_rounds=1"],
}


@pytest.mark.parametrize("strategy", sorted(STRATEGY_SETS))
def test_a_strategys_state_survives_resume_exactly(strategy, tmp_path):
    sets = [*STRATEGY_SETS[strategy], "federated.clients_per_round=6", "federated.rounds=4", "load=[]",
            "model.hidden_dropout_prob=0.2"]
    stage = Stage(tiny_config("stage1.yaml", tmp_path / "built", None, sets), "stage1.yaml")
    initial = {k: v.clone() for k, v in stage.model.state_dict().items()}

    def trained(trainer, rounds):
        for index in rounds:
            trainer.train_unit(index, stage.windows, False)
        trainer.run.save_state(trainer.state())
        return {n: p.detach().clone() for n, p in stage.model.named_parameters()}, trainer.run.load_state()

    torch.manual_seed(0)
    reference, _ = trained(fresh_trainer(stage, initial, tmp_path / "whole"), [1, 2, 3, 4])
    torch.manual_seed(0)
    _, state = trained(fresh_trainer(stage, initial, tmp_path / "stopped"), [1, 2])
    stage.model.load_state_dict(initial)  # the resumed state, not the model object, must carry the run
    resumed = fresh_trainer(stage, initial, tmp_path / "resumed")
    torch.manual_seed(123)  # resume_from restores the torch stream (the dropout masks) with the rest
    resumed.resume_from(state)
    params, _ = trained(resumed, [3, 4])
    for name, value in reference.items():
        assert torch.equal(params[name], value), f"{strategy}: {name}"


def test_the_server_samples_a_fixed_count_without_replacement(fed):
    server = Server({"w": torch.nn.Parameter(torch.zeros(1))}, settings_with(fed, clients_per_round=5), users=12)
    clients = np.arange(100, 112)
    chosen = server.sample(clients)
    assert len(chosen) == len(set(chosen.tolist())) == 5 and set(chosen.tolist()) <= set(clients.tolist())
