"""Training negatives never come from the user's training history, are uniform over the rest, and
stand for their uniform numbers exactly, position by position."""
from __future__ import annotations

import torch

from recbole_ext.local.negatives import negatives_from_uniform, sample_negatives


def test_never_returns_a_history_item_even_for_huge_histories():
    n_items = 5000
    g = torch.Generator().manual_seed(0)
    excluded = torch.zeros(3, n_items, dtype=torch.bool)
    excluded[:, 0] = True
    excluded[0, torch.randperm(n_items, generator=g)[:4900]] = True  # 4,900 interactions: 100 allowed
    excluded[1, 1:2500] = True
    excluded[2, 2500:] = True
    rows = torch.tensor([0, 1, 2]).repeat_interleave(400)
    drawn = sample_negatives(excluded, rows, 50, g)
    assert drawn.shape == (1200, 50)
    assert not excluded[rows.unsqueeze(1), drawn].any()
    # every allowed item of the heavy user shows up: the draw covers the whole allowed set
    assert set(drawn[rows == 0].flatten().tolist()) == set((~excluded[0]).nonzero().flatten().tolist())


def test_draws_are_uniform_over_allowed_items():
    excluded = torch.zeros(1, 11, dtype=torch.bool)
    excluded[0, [0, 3, 7]] = True
    drawn = sample_negatives(excluded, torch.zeros(20000, dtype=torch.long), 4, torch.Generator().manual_seed(1))
    counts = torch.bincount(drawn.flatten(), minlength=11).float()
    allowed = counts[~excluded[0]]
    assert counts[excluded[0]].sum() == 0
    assert (allowed / allowed.mean() - 1).abs().max() < 0.05


def test_a_uniform_number_picks_the_allowed_item_of_its_rank_whatever_else_is_drawn():
    # u in [k/n, (k+1)/n) stands for the k-th of the user's n allowed items (in id order), and each
    # position's items depend on its own numbers and user only: mapping many positions of many users at
    # once (as the vectorized backend does with one stream per user) gives each one's items alone.
    g = torch.Generator().manual_seed(2)
    excluded = torch.rand(5, 60, generator=g) < 0.7
    excluded[:, 0] = True
    excluded[3] = True
    excluded[3, 59] = False  # a user with one allowed item: every number picks it
    rows = torch.randint(0, 5, (300,), generator=g)
    uniform = torch.rand(300, 6, generator=g)
    uniform[:5] = torch.tensor([0.0, 1e-7, 0.5, 1 - 1e-7, 0.999999, 0.25])  # the ends of [0, 1)
    drawn = negatives_from_uniform(excluded, rows, uniform)
    allowed = [(~excluded[r]).nonzero().flatten() for r in range(5)]
    expected = torch.stack([allowed[r][(uniform[p] * len(allowed[r])).long().clamp_max(len(allowed[r]) - 1)]
                            for p, r in enumerate(rows.tolist())])
    assert torch.equal(drawn, expected)
    alone = torch.cat([negatives_from_uniform(excluded, rows[p:p + 1], uniform[p:p + 1]) for p in range(300)])
    assert torch.equal(drawn, alone)
    assert set(drawn[rows == 3].flatten().tolist()) <= {59}


def test_the_same_generator_state_draws_the_same_negatives():
    excluded = torch.zeros(4, 30, dtype=torch.bool)
    excluded[:, 0] = True
    excluded[1, 1:20] = True
    rows = torch.tensor([0, 1, 2, 3, 1])
    first = sample_negatives(excluded, rows, 7, torch.Generator().manual_seed(5))
    assert torch.equal(first, sample_negatives(excluded, rows, 7, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, sample_negatives(excluded, rows, 7, torch.Generator().manual_seed(6)))
