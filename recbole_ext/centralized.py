"""The centralized baseline: the same model and windows, pooled across users, one optimizer."""
from __future__ import annotations

import json

import numpy as np
import torch

from .local.steps import positions_per_pass, round_seed, train_step
from .local.optim import LocalOptimizer
from .training import RoundTrainer


class CentralizedTrainer(RoundTrainer):
    unit = "epoch"

    def __init__(self, recbole_config, model, settings, run, meta):
        super().__init__(recbole_config, model, settings, run, meta)
        opt = settings["optim"]
        self.local_optimizer = LocalOptimizer(model, opt)
        self.shuffler = np.random.default_rng(settings["seed"])
        self.max_positions = positions_per_pass(model, settings)

    def units(self) -> int:
        return self.settings["centralized"]["epochs"]

    def train_unit(self, index, train_data, show_progress):
        owner = np.repeat(np.arange(len(train_data.window_offsets) - 1), np.diff(train_data.window_offsets))
        order = self.shuffler.permutation(len(owner))
        size = self.settings["centralized"]["batch_size"]
        generator = torch.Generator(train_data.device).manual_seed(round_seed(self.settings["seed"], index))
        totals, weight_sum = {}, 0
        self.model.train()
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            step = train_step(self.model, self.local_optimizer, train_data, torch.from_numpy(batch),
                              owner[batch].tolist(), self.settings["loss"], generator, self.max_positions)
            weight = len(batch)
            weight_sum += weight
            for key, value in step.items():
                totals[key] = totals.get(key, 0.0) + weight * value
        return {key: value / weight_sum for key, value in totals.items()}, 0

    def extra_state(self) -> dict:
        return {"optimizer": self.local_optimizer.state_dict(),
                "shuffler": json.dumps(self.shuffler.bit_generator.state)}

    def load_extra_state(self, state: dict) -> None:
        self.local_optimizer.load_state_dict(state["optimizer"])
        self.shuffler.bit_generator.state = json.loads(state["shuffler"])
