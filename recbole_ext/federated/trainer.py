"""Federated training: one client per user, seeded sampling, FedAvg of the trainable parameters,
applied by a server optimizer (SGD: FedAvg; Adam: FedAdam), at a rate per parameter group
(`federated.server_lr_groups`). Under `federated.dp` every round's metrics line carries the
user-level epsilon spent so far (privacy.Accountant)."""
from __future__ import annotations

import json

import numpy as np
import torch

from ..stages import server_rates
from ..training import RoundTrainer
from .backends import BACKENDS
from .client import round_seed
from .privacy import Accountant, dp_enabled


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
        users = len(windows.clients)
        self.accountant = Accountant(fed, users, self.round_size(users)) if dp_enabled(fed) else None

    def units(self) -> int:
        return self.settings["federated"]["rounds"]

    def round_size(self, users: int) -> int:
        fed = self.settings["federated"]
        count = (round(fed["client_fraction"] * users) if fed["client_fraction"] is not None
                 else fed["clients_per_round"])
        return max(1, min(count, users))

    def clients_for_round(self, clients: np.ndarray) -> np.ndarray:
        """A fixed number of clients, without replacement (what the DP accountant assumes)."""
        return self.sampler.choice(clients, size=self.round_size(len(clients)), replace=False)

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
        bytes_up = stats.pop("bytes_up")
        if self.accountant is not None:
            stats["epsilon"] = self.accountant.epsilon(index)
        return stats, bytes_up

    def unit_record(self, stats: dict) -> dict:
        record = super().unit_record(stats)
        if self.accountant is not None:
            record.update(epsilon=stats["epsilon"], delta=self.accountant.delta)
        return record

    def summary_extra(self) -> dict:
        """What the run's privacy options were and what they spent, for summary.json."""
        fed = self.settings["federated"]
        privacy = {"secure_aggregation": fed["secure_aggregation"], "sparse_uploads": fed["sparse_uploads"],
                   "dp": None}
        if self.accountant is not None:
            privacy["dp"] = {**fed["dp"], "delta": self.accountant.delta, "rounds": self.completed,
                             "epsilon": self.accountant.epsilon(self.completed),
                             "accountant": "dp-accounting RDP, SampledWithoutReplacementDpEvent (replace one user)"}
        return {"privacy": privacy}

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
