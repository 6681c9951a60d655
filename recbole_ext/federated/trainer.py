"""Federated training: one client per user, seeded sampling, FedAvg of the trainable parameters."""
from __future__ import annotations

import numpy as np
import torch

from ..training import RoundTrainer
from .backends import BACKENDS


class FederatedTrainer(RoundTrainer):
    unit = "round"

    def __init__(self, recbole_config, model, settings, run, meta, windows):
        super().__init__(recbole_config, model, settings, run, meta)
        self.backend = BACKENDS[settings["federated"]["backend"]](model, windows, settings)
        self.sampler = np.random.default_rng(settings["seed"])

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
        generator = torch.Generator().manual_seed(self.settings["seed"] * 100_003 + index)
        update, stats = self.backend.run_round(clients, global_params, generator, show_progress)
        server_lr = self.settings["federated"]["server_lr"]
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(global_params[name] + server_lr * update[name])
        bytes_per_client = sum(p.numel() * p.element_size() for p in self.trainable.values())
        return stats, bytes_per_client * len(clients)
