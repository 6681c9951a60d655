"""Training negatives never come from the user's training history, and are drawn without loops."""
from __future__ import annotations

import ast
import inspect
import textwrap

import torch

from recbole_ext.local import negatives
from recbole_ext.local.negatives import sample_negatives


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


def test_sampler_has_no_python_loop():
    tree = ast.parse(textwrap.dedent(inspect.getsource(negatives.sample_negatives)))
    loops = [node for node in ast.walk(tree) if isinstance(node, (ast.For, ast.While, ast.comprehension))]
    assert not loops
