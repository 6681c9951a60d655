"""Training negatives drawn uniformly from the items outside each user's whole training history."""
from __future__ import annotations

import torch


def sample_negatives(excluded: torch.Tensor, rows: torch.Tensor, num: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw `num` negatives for each entry of `rows`.

    excluded: [U, n_items] bool, True for items user u may not get (history, padding).
    rows: [P] index into U, the user of each position. Returns [P, num] item ids.

    Exact and loop-free: draw a rank k uniformly among a user's allowed items and find the k-th
    allowed item by binary search in the running count of allowed items. Offsetting each user's
    running count by the totals of the users before it makes one flat sorted array for all users.
    """
    allowed = (~excluded).to(torch.int64)
    counts = allowed.sum(1)
    if bool((counts[rows] == 0).any()):
        raise ValueError("a user has interacted with every item: no negative can be drawn")
    base = torch.cumsum(counts, 0) - counts  # allowed items of the users before each user
    running = (torch.cumsum(allowed, 1) + base.unsqueeze(1)).flatten()
    u = torch.rand(len(rows), num, generator=generator)
    rank = (u * counts[rows].unsqueeze(1)).long().clamp_max(counts[rows].unsqueeze(1) - 1)
    flat = torch.searchsorted(running, base[rows].unsqueeze(1) + rank + 1)
    return flat % excluded.shape[1]
