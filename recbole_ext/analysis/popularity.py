"""Popularity: every item scored by its number of training interactions, the same for every user.

It is the floor a sequential recommender has to clear, so `run.py baseline --model Pop` scores it
exactly as our runs are scored: on a stage's own leave-one-out split (`pipeline.Split`), by the
`TwoProtocolEvaluator` (full ranking, and uni100 with the run's negatives).
"""
from __future__ import annotations

import torch


def training_counts(split) -> torch.Tensor:
    """[n_items] int64: each item's interactions in the training split of `split` (a pipeline.Split)."""
    from ..evaluation import training_counts as counts

    return counts(split.dataset, (split.valid.dataset, split.test.dataset))[0]


class Popularity(torch.nn.Module):
    """Scores every item by `counts` for every user; nothing to train."""

    def __init__(self, counts: torch.Tensor):
        super().__init__()
        # A parameter that never trains rather than a buffer: the evaluator finds the device through
        # `parameters()`.
        self.counts = torch.nn.Parameter(counts.float(), requires_grad=False)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        # A copy per user: the evaluator writes -inf into the scores it gets.
        return self.counts.repeat(len(interaction), 1)
