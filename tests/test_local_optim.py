"""The package's one local optimizer (local/optim.py) against torch.optim, the reference.

Every trainer and backend steps with it: `LocalOptimizer` over a model's own parameters (sequential,
centralized), the stacked functions over a cohort (vectorized). Here it must take torch.optim's
steps: AdamW (decoupled decay) or SGD, decay only on weight matrices, gradients clipped as
`clip_grad_norm_` clips them.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from recbole_ext.local.optim import ADAM_BETAS, ADAM_EPS, LocalOptimizer, decays


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.item_embedding = nn.Embedding(7, 4)
        self.dense = nn.Linear(4, 3)
        self.gamma = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return (self.dense(self.item_embedding(x)) * self.gamma).pow(2).sum()


def reference_optimizer(model, optim: dict) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    rest = [p for n, p in model.named_parameters() if not decays(n, p)]
    groups = [{"params": decay, "weight_decay": optim["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    if optim["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=optim["learning_rate"], foreach=True)
    return torch.optim.AdamW(groups, lr=optim["learning_rate"], betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_three_steps_equal_torch_optim(name, clip):
    torch.manual_seed(0)
    ours_model = Small().double()
    theirs_model = copy.deepcopy(ours_model)
    optim = {"optimizer": name, "learning_rate": 0.05, "weight_decay": 0.1, "clip_grad_norm": clip}
    ours, theirs = LocalOptimizer(ours_model, optim), reference_optimizer(theirs_model, optim)
    initial_rows = ours_model.item_embedding.weight.detach().clone()
    for step in range(3):
        x = torch.tensor([[1, 2, 3], [2, 4, 1], [3, 3, 4]][step])
        ours.zero_grad()
        ours_model(x).backward()
        ours.step()
        theirs.zero_grad()
        theirs_model(x).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(theirs_model.parameters(), clip)
        theirs.step()
    for (n, a), b in zip(ours_model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=n)
    # embedding rows no step touched did not move (no decay on embeddings), the others did
    moved = (ours_model.item_embedding.weight != initial_rows).any(1)
    assert moved.tolist() == [False, True, True, True, True, False, False]


def steps(optimizer, model, x, count: int) -> None:
    for _ in range(count):
        optimizer.zero_grad()
        model(x).backward()
        optimizer.step()


def test_state_round_trips_and_continues_exactly():
    torch.manual_seed(1)
    model = Small()
    optim = {"optimizer": "adamw", "learning_rate": 0.01, "weight_decay": 0.0, "clip_grad_norm": None}
    first = LocalOptimizer(model, optim)
    x = torch.tensor([1, 2, 3])
    steps(first, model, x, 2)
    copy_model = copy.deepcopy(model)
    second = LocalOptimizer(copy_model, optim)
    second.load_state_dict(first.state_dict())
    for opt, m in ((first, model), (second, copy_model)):
        steps(opt, m, x, 1)
    for a, b in zip(model.parameters(), copy_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_torch_optim_state_written_before_continues_exactly(name):
    """A centralized run's state.pt from before held torch.optim's state: loaded into the local
    optimizer, the next step is the one torch.optim would have taken."""
    torch.manual_seed(2)
    model = Small().double()
    optim = {"optimizer": name, "learning_rate": 0.05, "weight_decay": 0.1, "clip_grad_norm": None}
    theirs = reference_optimizer(model, optim)
    x = torch.tensor([1, 2, 3])
    steps(theirs, model, x, 2)
    ours_model = copy.deepcopy(model)
    ours = LocalOptimizer(ours_model, optim)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for opt, m in ((theirs, model), (ours, ours_model)):
        steps(opt, m, x, 1)
    for a, b in zip(ours_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
