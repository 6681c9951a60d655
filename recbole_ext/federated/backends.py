"""Execution backends: who trains the round's clients. All return the same aggregated update.

`sequential` is the reference: one client after another on the global model object, restoring the
global trainable parameters before each client.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..data.sequences import TrainingWindows
from .client import make_optimizer, train_step


class SequentialBackend:
    def __init__(self, model, windows: TrainingWindows, settings: dict):
        self.model = model
        self.windows = windows
        self.settings = settings

    def run_round(self, clients, global_params: dict, generator: torch.Generator, progress: bool = True):
        """Train each client from `global_params`; return (weighted mean update, weighted mean stats)."""
        opt, fed = self.settings["optim"], self.settings["federated"]
        total = {name: torch.zeros_like(value) for name, value in global_params.items()}
        stats, weight_sum = {}, 0.0
        params = dict(self.model.named_parameters())
        self.model.train()
        for user in tqdm(clients, desc="clients", leave=False, disable=not progress):
            with torch.no_grad():
                for name, value in global_params.items():
                    params[name].copy_(value)
            optimizer = make_optimizer(self.model, opt["learning_rate"], opt["weight_decay"])
            index = self.windows.windows_of([user])
            owners = [user] * len(index)
            for _ in range(fed["local_epochs"]):
                step = train_step(self.model, optimizer, self.windows, index, owners, self.settings["loss"],
                                  opt["clip_grad_norm"], generator)
            weight = float(self.windows.num_targets[user])
            weight_sum += weight
            with torch.no_grad():
                for name, value in global_params.items():
                    total[name] += weight * (params[name] - value)
            for key, value in step.items():
                stats[key] = stats.get(key, 0.0) + weight * value
        with torch.no_grad():
            for name, value in global_params.items():
                params[name].copy_(value)
        update = {name: value / weight_sum for name, value in total.items()}
        return update, {key: value / weight_sum for key, value in stats.items()}


BACKENDS = {"sequential": SequentialBackend}
