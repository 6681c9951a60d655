"""Training negatives drawn uniformly from the items outside each user's whole training history."""
from __future__ import annotations

import torch


def sample_negatives(excluded: torch.Tensor, rows: torch.Tensor, num: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw `num` negatives for each entry of `rows`.

    excluded: [U, n_items] bool, True for items user u may not get (history, padding).
    rows: [P] index into U, the user of each position. Returns [P, num] item ids.
    """
    return negatives_from_uniform(excluded, rows, torch.rand(len(rows), num, generator=generator))


def negatives_from_uniform(excluded: torch.Tensor, rows: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The negatives that uniform numbers `uniform` [P, num] in [0, 1) stand for (see sample_negatives).

    Exact and loop-free: a number u picks rank k = floor(u * allowed count) among a user's allowed
    items, and the k-th of them is taken. The allowed (user, item) pairs in row-major order list each
    user's allowed items contiguously, so the k-th allowed item of user r sits at (allowed items of
    the users before r) + k. Separate from the draw so that callers holding one generator per user
    can draw each user's numbers from its own stream and map them all at once.
    """
    allowed = ~excluded
    counts = allowed.sum(1)
    if bool((counts[rows] == 0).any()):
        raise ValueError("a user has interacted with every item: no negative can be drawn")
    base = torch.cumsum(counts, 0) - counts  # allowed items of the users before each user
    allowed_items = allowed.nonzero()[:, 1]
    rank = (uniform * counts[rows].unsqueeze(1)).long().clamp_max(counts[rows].unsqueeze(1) - 1)
    return allowed_items[base[rows].unsqueeze(1) + rank]
