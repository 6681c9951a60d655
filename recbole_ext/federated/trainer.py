"""Federated training: one client per user, seeded sampling, FedAvg of the trainable parameters,
applied by a server optimizer (SGD: FedAvg; Adam: FedAdam), at a rate per parameter group
(`federated.server_lr_groups`)."""
from __future__ import annotations

import json

import numpy as np
import torch

from ..stages import server_rates
from ..training import RoundTrainer
from .backends import BACKENDS
from .client import round_seed


class FederatedTrainer(RoundTrainer):
    unit = "round"

    def __init__(self, recbole_config, model, settings, run, meta, windows):
        super().__init__(recbole_config, model, settings, run, meta)
        self.backend = BACKENDS[settings["federated"]["backend"]](model, windows, settings)
        self.sampler = np.random.default_rng(settings["seed"])
        fed = settings["federated"]
        # The server treats the clients' mean update as a negative gradient: plain SGD with lr 1 is
        # FedAvg itself; Adam is FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
        server = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[fed["server_optimizer"]]
        rates = server_rates(self.trainable, fed)
        groups: dict[float, list] = {}
        for name, param in self.trainable.items():
            groups.setdefault(rates[name], []).append(param)
        self.server_optimizer = server([{"params": params, "lr": lr} for lr, params in groups.items()],
                                       lr=fed["server_lr"])

    def units(self) -> int:
        return self.settings["federated"]["rounds"]

    def clients_for_round(self, clients: np.ndarray) -> np.ndarray:
        fed = self.settings["federated"]
        count = (round(fed["client_fraction"] * len(clients)) if fed["client_fraction"] is not None
                 else fed["clients_per_round"])
        return self.sampler.choice(clients, size=max(1, min(count, len(clients))), replace=False)

    def train_unit(self, index, train_data, show_progress):
        clients = self.clients_for_round(train_data.clients)
        global_params = {name: p.detach().clone() for name, p in self.trainable.items()}
        # Each client draws from its own stream seeded by (round seed, client id), in every backend.
        update, stats = self.backend.run_round(clients, global_params, round_seed(self.settings["seed"], index),
                                               show_progress)
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(global_params[name])
                param.grad = -update[name]
        self.server_optimizer.step()
        self.server_optimizer.zero_grad(set_to_none=True)
        bytes_per_client = sum(p.numel() * p.element_size() for p in self.trainable.values())
        return stats, bytes_per_client * len(clients)

    def extra_state(self) -> dict:
        state = {"server_optimizer": self.server_optimizer.state_dict(),
                 "sampler": json.dumps(self.sampler.bit_generator.state)}
        if hasattr(self.backend, "rng_states"):  # ray: the actors' own random streams
            state["actor_rngs"] = self.backend.rng_states()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.server_optimizer.load_state_dict(state["server_optimizer"])
        self.sampler.bit_generator.state = json.loads(state["sampler"])
        if "actor_rngs" in state and hasattr(self.backend, "rng_states"):
            self.backend.set_rng_states(state["actor_rngs"])
