"""Federated training: one client per user. Each round the server (server.py) samples the clients,
a backend trains them and returns their sums, and the server aggregates them and steps the global
model with its strategy (strategies.py). Under `federated.dp` every round's metrics line carries the
user-level epsilon spent so far."""
from __future__ import annotations

import sys

from ..training import RoundTrainer
from .backends import BACKENDS
from ..local.steps import round_seed
from .server import Server, update_magnitudes


class FederatedTrainer(RoundTrainer):
    unit = "round"

    def __init__(self, recbole_config, model, settings, run, meta, windows):
        super().__init__(recbole_config, model, settings, run, meta)
        self.backend = BACKENDS[settings["federated"]["backend"]](model, windows, settings)
        self.users = len(windows.clients)
        self.server = Server(self.trainable, settings, self.users)

    def units(self) -> int:
        return self.settings["federated"]["rounds"]

    def train_unit(self, index, train_data, show_progress):
        clients = self.server.sample(train_data.clients)
        global_params = {name: p.detach().clone() for name, p in self.trainable.items()}
        # Each client draws from its own stream seeded by (round seed, client id), in every backend.
        seed = round_seed(self.settings["seed"], index)
        sums = self.backend.train_clients(clients, global_params, seed, show_progress)
        update, stats = self.server.aggregate(sums, global_params, seed)
        if hasattr(self.backend, "round_extra"):  # a deployed backend: bytes on the wire, dropped nodes
            stats["backend"] = self.backend.round_extra()
            for drop in stats["backend"]["dropped_nodes"]:
                print(f"round {index}: dropped the answer of node {drop['node']} (partition {drop['partition']}, "
                      f"{drop['clients']} clients): {drop['reason']}", file=sys.stderr, flush=True)
        stats["update_abs"] = update_magnitudes(update)
        stats["server_lr_factor"] = self.server.apply(update, global_params, index)
        bytes_up = stats.pop("bytes_up")
        if self.server.accountant is not None:
            stats["epsilon"] = self.server.accountant.epsilon(index)
        return stats, bytes_up

    def passes(self, index: int) -> float:
        return index * self.server.per_round / self.users

    def unit_record(self, stats: dict) -> dict:
        record = super().unit_record(stats)
        record.update(update_abs=stats["update_abs"], server_lr_factor=stats["server_lr_factor"])
        record.update(stats.get("backend", {}))
        if self.server.accountant is not None:
            record.update(epsilon=stats["epsilon"], delta=self.server.accountant.delta)
        return record

    def summary_extra(self) -> dict:
        """What the run's privacy options were and what they spent, for summary.json."""
        fed = self.settings["federated"]
        privacy = {"secure_aggregation": fed["secure_aggregation"], "sparse_uploads": fed["sparse_uploads"],
                   "dp": None}
        accountant = self.server.accountant
        if accountant is not None:
            privacy["dp"] = {**fed["dp"], "delta": accountant.delta, "rounds": self.completed,
                             "epsilon": accountant.epsilon(self.completed),
                             "accountant": "dp-accounting RDP, SampledWithoutReplacementDpEvent (replace one user)"}
        return {"privacy": privacy}

    def extra_state(self) -> dict:
        state = self.server.state_dict()
        if hasattr(self.backend, "rng_states"):  # ray: the actors' own random streams
            state["actor_rngs"] = self.backend.rng_states()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.server.load_state_dict(state)
        if "actor_rngs" in state and hasattr(self.backend, "rng_states"):
            self.backend.set_rng_states(state["actor_rngs"])
