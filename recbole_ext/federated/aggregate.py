"""Weighted sums over a set of clients: what a backend, or one Ray actor's shard, hands back.

Sums rather than means so shards combine by addition and the server divides once (FedAvg weighted
by each client's number of training targets).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoundSums:
    update: dict                                 # name -> sum_c w_c * (theta_c - theta_global)
    stats: dict = field(default_factory=dict)    # key -> sum_c w_c * stat_c (loss terms, gate weights)
    weight: float = 0.0                          # sum_c w_c
    clients: int = 0
    bytes_up: int = 0                            # what the clients sent
    modulus: int | None = None                   # secure aggregation: `update` holds residues mod this

    @classmethod
    def zeros(cls, global_params: dict) -> "RoundSums":
        return cls({name: torch.zeros_like(value) for name, value in global_params.items()})

    def add_stats(self, stats: dict, weights: torch.Tensor | float) -> None:
        """stats: key -> value for one client (weights a float) or [C, ...] for C clients ([C] weights)."""
        for key, value in stats.items():
            if isinstance(weights, torch.Tensor):
                value = torch.einsum("c,c...->...", weights.to(value.dtype), value)
            else:
                value = weights * value
            self.stats[key] = self.stats.get(key, 0.0) + value.detach()

    def to(self, device) -> "RoundSums":
        """These sums with their tensors on `device` (a Ray actor's sums travel to the driver's)."""
        move = lambda values: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        return RoundSums(move(self.update), move(self.stats), self.weight, self.clients, self.bytes_up, self.modulus)

    def merge(self, other: "RoundSums") -> "RoundSums":
        for name, value in other.update.items():
            if self.modulus is None:
                self.update[name] += value
            else:
                self.update[name] = (self.update[name] + value).remainder(self.modulus)
        for key, value in other.stats.items():
            self.stats[key] = self.stats.get(key, 0.0) + value
        self.weight += other.weight
        self.clients += other.clients
        self.bytes_up += other.bytes_up
        return self

    def mean(self) -> tuple[dict, dict]:
        """(FedAvg update, weighted mean stats)."""
        return ({name: value / self.weight for name, value in self.update.items()},
                {key: value / self.weight for key, value in self.stats.items()})
