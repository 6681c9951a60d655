"""The server side of federated training, in one place: which clients a round trains, how their
uploads become one update (unmasking, DP noise, the mean), the server optimizer with its per-group
rates and schedule (strategies.py), and the privacy accountant.

The backends (backends.py, vectorized.py, ray_backend.py) only train the clients they are given and
hand back their `RoundSums`; they hold no server logic, as a Flower ClientApp holds none of its
Strategy's.
"""
from __future__ import annotations

import fnmatch
import json

import numpy as np
import torch

from ..errors import UserError
from .aggregate import RoundSums
from .privacy import NOISE_STREAM, Accountant, decode, dp_enabled
from .strategies import STRATEGIES, rate_factor


def server_rates(trainable: dict, fed: dict) -> dict[str, float]:
    """Each trainable parameter's server learning rate: that of the first pattern in
    `federated.server_lr_groups` its name matches, else `server_lr`. FedAdam moves every parameter by
    about its rate per round, whatever its gradient's scale, so a part that starts untrained beside a
    trained backbone needs a rate of its own."""
    patterns = fed["server_lr_groups"]
    return {name: next((lr for p, lr in patterns.items() if fnmatch.fnmatchcase(name, p)), fed["server_lr"])
            for name in trainable}


def round_size(fed: dict, users: int) -> int:
    count = round(fed["client_fraction"] * users) if fed["client_fraction"] is not None else fed["clients_per_round"]
    return max(1, min(count, users))


def aggregate(sums: RoundSums, global_params: dict, round_seed: int, fed: dict) -> tuple[dict, dict]:
    """The update the server applies: the clients' sum (unmasked by the ring arithmetic under secure
    aggregation), plus the DP noise, over their total weight; and the weighted mean stats, with
    `bytes_up`."""
    total = dict(sums.update)
    if sums.modulus is not None:
        total = {n: decode(v, global_params[n].dtype) for n, v in total.items()}
    clip_norm, noise_multiplier = fed["dp"]["clip_norm"], fed["dp"]["noise_multiplier"]
    if clip_norm is not None and noise_multiplier > 0:
        seed = np.random.SeedSequence([int(round_seed), NOISE_STREAM]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(seed))
        std = noise_multiplier * clip_norm
        total = {n: v + std * torch.randn(v.shape, generator=generator, dtype=torch.float64).to(v)
                 for n, v in total.items()}
    update, stats = RoundSums(total, sums.stats, sums.weight).mean()
    return update, {**stats, "bytes_up": sums.bytes_up}


def update_magnitudes(update: dict) -> dict:
    """Quantiles of |Delta| over every trainable coordinate: the scale `server_tau` is set against."""
    flat = torch.cat([v.detach().reshape(-1).abs().float().cpu() for v in update.values()])
    if len(flat) > 2 ** 24:  # torch.quantile's limit; an even subsample estimates the quantiles
        flat = flat[:: len(flat) // 2 ** 23 + 1]
    q = torch.quantile(flat, torch.tensor([0.5, 0.9, 0.99]))
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(flat.max())}


class Server:
    """One run's server: `sample` the round's clients, `aggregate` their sums, `apply` the update."""

    def __init__(self, trainable: dict, settings: dict, users: int):
        self.fed = fed = settings["federated"]
        self.trainable = trainable
        self.sampler = np.random.default_rng(settings["seed"])
        self.per_round = round_size(fed, users)
        rates = server_rates(trainable, fed)
        groups: dict[float, list] = {}
        for name, param in trainable.items():
            groups.setdefault(rates[name], []).append(param)
        self.optimizer = STRATEGIES[fed["server_optimizer"]]([{"params": params, "lr": lr}
                                                               for lr, params in groups.items()], fed)
        self.base_rates = [group["lr"] for group in self.optimizer.param_groups]
        self.accountant = Accountant(fed, users, self.per_round) if dp_enabled(fed) else None

    def sample(self, clients: np.ndarray) -> np.ndarray:
        """A fixed number of clients, without replacement (what the DP accountant assumes)."""
        return self.sampler.choice(clients, size=self.per_round, replace=False)

    def aggregate(self, sums: RoundSums, global_params: dict, round_seed: int) -> tuple[dict, dict]:
        return aggregate(sums, global_params, round_seed, self.fed)

    def rate_factor(self, round_index: int) -> float:
        return rate_factor(self.fed["schedule"], round_index, self.fed["rounds"])

    def apply(self, update: dict, global_params: dict, round_index: int) -> float:
        """Move the trainable parameters from `global_params` by the strategy's step on `update`;
        returns the round's rate factor."""
        factor = self.rate_factor(round_index)
        for group, base in zip(self.optimizer.param_groups, self.base_rates):
            group["lr"] = base * factor
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(global_params[name])
                param.grad = -update[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return factor

    def state_dict(self) -> dict:
        # Key names as before the server had a module of its own, so older run states resume.
        return {"server_optimizer": self.optimizer.state_dict(),
                "sampler": json.dumps(self.sampler.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state["server_optimizer"])
        except (ValueError, KeyError) as err:
            raise UserError(f"the saved server state does not fit federated.server_optimizer "
                            f"{self.fed['server_optimizer']!r} ({err})") from None
        for group, base in zip(self.optimizer.param_groups, self.base_rates):
            group["lr"] = base  # the saved rate may be a scheduled one; `apply` sets each round's
        self.sampler.bit_generator.state = json.loads(state["sampler"])
