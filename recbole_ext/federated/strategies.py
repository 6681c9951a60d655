"""Server strategies: how the server turns the clients' mean update into a step of the global model,
and the server learning-rate schedule.

The server treats the mean update Delta_t (the clients' weighted mean change) as a negative
gradient and hands it to a torch optimizer over the trainable parameters, one parameter group per
server rate (`federated.server_lr_groups`). `federated.server_optimizer` names the strategy:

* `sgd`: FedAvg (McMahan et al., 2017); with `server_lr` 1 the global model moves by Delta_t itself.
  `server_momentum` > 0 is FedAvgM (Hsu et al., 2019): v = mu v + Delta_t, x += lr v, which is
  torch's SGD with momentum.
* `adam`: FedAdam, torch's Adam (with its bias correction), betas `server_beta1`/`server_beta2` and
  eps = `server_tau`. Reddi et al. ("Adaptive Federated Optimization", ICLR 2021) call eps the
  adaptivity tau; its scale relative to |Delta_t| decides how adaptive the step is (docs/FEDERATION.md).
* `yogi`, `adagrad`: FedYogi and FedAdagrad as that paper's Algorithm 2 writes them (no bias
  correction; v starts at tau^2): m = b1 m + (1 - b1) Delta; v = v + Delta^2 (Adagrad) or
  v = v - (1 - b2) Delta^2 sign(v - Delta^2) (Yogi); x += lr m / (sqrt(v) + tau). torch has no Yogi,
  and its Adagrad has no momentum term, so both are written here (tests/test_server.py checks them
  against the formulas, and FedAdagrad with b1 = 0 against torch.optim.Adagrad).

Adding a strategy is one entry in STRATEGIES (and its name in the schema's choice).
"""
from __future__ import annotations

import math

import torch


class _ReddiAdaptive(torch.optim.Optimizer):
    """FedAdagrad / FedYogi's server step (Reddi et al., 2021, Algorithm 2); `grad` holds -Delta_t."""

    yogi = False

    def __init__(self, params, lr: float, betas: tuple[float, float], tau: float):
        super().__init__(params, {"lr": lr, "betas": betas, "tau": tau})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            tau = group["tau"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                delta = -p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, tau * tau)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(delta, alpha=1 - beta1)
                square = delta * delta
                if self.yogi:
                    v.sub_((1 - beta2) * square * torch.sign(v - square))
                else:
                    v.add_(square)
                p.addcdiv_(m, v.sqrt().add_(tau), value=group["lr"])


class ServerAdagrad(_ReddiAdaptive):
    yogi = False


class ServerYogi(_ReddiAdaptive):
    yogi = True


def _fedavg(groups, fed):
    return torch.optim.SGD(groups, lr=fed["server_lr"], momentum=fed["server_momentum"])


def _fedadam(groups, fed):
    # Defaults (betas 0.9/0.999, tau 1e-8) are torch's, so a config from before the strategies were
    # declared steps exactly as it did.
    return torch.optim.Adam(groups, lr=fed["server_lr"], betas=(fed["server_beta1"], fed["server_beta2"]),
                            eps=fed["server_tau"])


def _fedyogi(groups, fed):
    return ServerYogi(groups, fed["server_lr"], (fed["server_beta1"], fed["server_beta2"]), fed["server_tau"])


def _fedadagrad(groups, fed):
    return ServerAdagrad(groups, fed["server_lr"], (fed["server_beta1"], fed["server_beta2"]), fed["server_tau"])


STRATEGIES = {"sgd": _fedavg, "adam": _fedadam, "yogi": _fedyogi, "adagrad": _fedadagrad}


def rate_factor(schedule: dict, round_index: int, rounds: int) -> float:
    """The factor on every server rate in round `round_index` (1-based) of a `rounds`-round run:
    `warmup_rounds` rising linearly to 1, then `kind`: constant 1, cosine from 1 down to `floor` at
    the last round, or step (times `step_factor` every `step_rounds` rounds, not below `floor`)."""
    warmup = schedule["warmup_rounds"]
    if round_index <= warmup:
        return round_index / warmup
    kind, floor = schedule["kind"], schedule["floor"]
    after = round_index - warmup - 1  # rounds since the warmup ended, 0 in the first one
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = min(1.0, after / max(1, rounds - warmup - 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return max(floor, schedule["step_factor"] ** (after // schedule["step_rounds"]))
