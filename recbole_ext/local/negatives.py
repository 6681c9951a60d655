"""Training negatives drawn uniformly from the items outside each user's whole training history."""
from __future__ import annotations

import torch


def sample_negatives(excluded: torch.Tensor, rows: torch.Tensor, num: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw `num` negatives for each entry of `rows`.

    excluded: [U, n_items] bool, True for items user u may not get (history, padding); every user
    of `rows` must have an allowed item (TrainingWindows checks its users once, when built).
    rows: [P] index into U, the user of each position. Returns [P, num] item ids, on excluded's
    device; the uniform numbers come from `generator` on its own device.
    """
    device = generator.device if generator is not None else excluded.device
    uniform = torch.rand(len(rows), num, generator=generator, device=device)
    return negatives_from_uniform(excluded, rows.to(excluded.device), uniform.to(excluded.device))


def negatives_from_uniform(excluded: torch.Tensor, rows: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The negatives that uniform numbers `uniform` [P, num] in [0, 1) stand for (see sample_negatives).

    Exact and loop-free: a number u picks rank k = floor(u * allowed count) among a user's allowed
    items, and the k-th of them is taken. The allowed (user, item) pairs in row-major order list each
    user's allowed items contiguously, so the k-th allowed item of user r is the allowed pair of
    rank (allowed items of the users before r) + k. Separate from the draw so that callers holding
    one generator per user can draw each user's numbers from its own stream and map them all at once.
    """
    allowed = ~excluded
    counts = allowed.sum(1)
    base = torch.cumsum(counts, 0) - counts  # allowed items of the users before each user
    rank = base[rows].unsqueeze(1) + (uniform * counts[rows].unsqueeze(1)).long().clamp_max(
        counts[rows].unsqueeze(1) - 1)
    if allowed.device.type == "cpu":
        # The list of allowed pairs, then a gather: the fastest on a CPU.
        return allowed.nonzero()[:, 1][rank]
    # `nonzero` would make the host wait for the device (its size is data); the pair of a given rank
    # is also where the running count of allowed pairs first exceeds that rank: the same items.
    return nth_allowed(allowed, rank)


def nth_allowed(allowed: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Items of the allowed (user, item) pairs of the given 0-based ranks in row-major order, found
    without a host synchronisation (see negatives_from_uniform)."""
    running = allowed.flatten().cumsum(0)
    return torch.searchsorted(running, rank + 1) % allowed.shape[1]
