"""Execution backends: who trains the round's clients. All return the same sums.

Every backend has `train_clients(clients, global_params, round_seed, progress) -> RoundSums`: the
sums of the clients' parameter changes (weighted by training targets, or uniform under DP and secure
aggregation) and of their loss/gate statistics, with `bytes_up`; the server (server.py) turns them
into the round's update. Each client's change becomes its upload through `privacy.Uploads` (clipping, masks, sparse rows), the same in every
backend. A client's randomness is its own (`client.client_generator`), so the backends agree to float
rounding for the same seed when dropout is off (tests/test_backends.py).

* `sequential` (here) is the reference: one client after another on the global model object, each
  with a fresh `LocalOptimizer` (local/optim.py, the optimizer of every backend), restoring the global
  trainable parameters before each client; a client with more than `cohort_positions` positions
  takes its gradient in parts.
* `vectorized` (vectorized.py): cohorts of clients at once with torch.func (stacked parameters).
* `ray` (ray_backend.py): Ray actors, each running `vectorized` on a shard of the round's clients.
* `flower` (flower/): Flower SuperNodes, each running `vectorized` on the round's clients it holds.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..data.sequences import TrainingWindows, to_device
from .aggregate import RoundSums
from ..local.steps import client_generator, positions_per_pass, train_step
from ..local.optim import LocalOptimizer
from .privacy import Uploads


class SequentialBackend:
    def __init__(self, model, windows: TrainingWindows, settings: dict):
        self.model = model
        self.windows = windows
        self.settings = settings
        self.max_positions = positions_per_pass(model, settings)
        self.uploads = Uploads(settings)

    def train_clients(self, clients, global_params: dict, round_seed: int, progress: bool = False,
                      round_clients=None) -> RoundSums:
        """The sums of the uploads of `clients`; `round_clients`: all the round's clients (the mask
        partners; default `clients`)."""
        opt, fed = self.settings["optim"], self.settings["federated"]
        round_clients = clients if round_clients is None else round_clients
        sums = self.uploads.zeros(global_params)
        params = dict(self.model.named_parameters())
        self.model.train()
        for user in tqdm(clients, desc="clients", leave=False, disable=not progress):
            with torch.no_grad():
                for name, value in global_params.items():
                    params[name].copy_(value)
            optimizer = LocalOptimizer(self.model, opt)
            generator = client_generator(round_seed, user, self.windows.device)
            index = self.windows.windows_of([user])
            owners = [user] * len(index)
            for _ in range(fed["local_epochs"]):
                step = train_step(self.model, optimizer, self.windows, index, owners, self.settings["loss"],
                                  generator, self.max_positions)
            weight = self.uploads.weights([self.windows.num_targets[user]])
            with torch.no_grad():
                deltas = {name: (params[name] - value).unsqueeze(0) for name, value in global_params.items()}
                self.uploads.add(sums, deltas, [user], to_device(weight.numpy(), self.windows.device), round_seed,
                                 round_clients)
            sums.add_stats(step, float(weight[0]))
            sums.weight += float(weight[0])
            sums.clients += 1
        with torch.no_grad():
            for name, value in global_params.items():
                params[name].copy_(value)
        return sums


def _vectorized(model, windows, settings):
    from .vectorized import VectorizedBackend
    return VectorizedBackend(model, windows, settings)


def _ray(model, windows, settings):
    from .ray_backend import RayBackend  # imports Ray (seconds), so only when asked for
    return RayBackend(model, windows, settings)


def _flower(model, windows, settings):
    from .flower.backend import FlowerBackend  # imports flwr (an optional install)
    return FlowerBackend(model, windows, settings)


BACKENDS = {"sequential": SequentialBackend, "vectorized": _vectorized, "ray": _ray, "flower": _flower}
