"""Local training: every position of a batch of windows as a target, in one step.

What every backend shares about a client, so they all train it the same way: its random stream
(`client_generator`), its negatives (`draw_negatives`), which parameters decay (`decays`), and the
optimizer step (`make_optimizer` / `train_step` here; `federated/vectorized.py` takes the same SGD
or AdamW step on stacked per-client tensors).
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.sequences import TrainingWindows
from .negatives import sample_negatives

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, written out for the stacked copy
ADAM_EPS = 1e-8


def round_seed(seed: int, round_index: int) -> int:
    return seed * 100_003 + round_index


def client_generator(round_seed: int, client: int) -> torch.Generator:
    """A client's own random stream, a function of (round seed, client id) alone: whichever backend,
    process or cohort trains the client, it draws the same negatives."""
    state = np.random.SeedSequence([int(round_seed), int(client)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def decays(name: str, param: torch.Tensor) -> bool:
    """Decoupled weight decay only on weight matrices: never on embeddings, norms or scalars, so
    embedding rows a client never touched do not shrink."""
    return param.ndim >= 2 and "embedding" not in name


def make_optimizer(model, optim: dict) -> torch.optim.Optimizer:
    """The optimizer of `optim.optimizer` (adamw | sgd) over the trainable parameters, decay as
    `decays` says (decoupled in both)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if optim["optimizer"] == "sgd":
        # torch's SGD decay is coupled (added to the gradient); for plain SGD that is the same step.
        return torch.optim.SGD(groups, lr=optim["learning_rate"], foreach=True)
    return torch.optim.AdamW(groups, lr=optim["learning_rate"], betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)


def draw_negatives(windows: TrainingWindows, users, position_owner: torch.Tensor, num: int,
                   generator: torch.Generator) -> torch.Tensor:
    """[P, num] negatives for P positions; position_owner[p] indexes `users` (distinct user ids)."""
    return sample_negatives(windows.excluded(users), position_owner, num, generator)


def train_step(model, optimizer, windows: TrainingWindows, index: torch.Tensor, users, loss_cfg: dict,
               clip_grad_norm: float | None, generator: torch.Generator) -> dict:
    """One optimizer step on windows[index]; `users[i]` owns window index[i] (negatives exclude its history)."""
    device = next(model.parameters()).device  # windows stay on the CPU; a step runs where the model is
    inputs, targets, mem_rows = (t[index].to(device) for t in (windows.inputs, windows.targets, windows.mem_rows))
    negatives = None
    if loss_cfg["type"] != "ce":
        distinct, owner = torch.unique(torch.as_tensor(users), return_inverse=True)
        valid = windows.targets[index] > 0
        position_owner = owner.unsqueeze(1).expand_as(valid)[valid]
        negatives = draw_negatives(windows, distinct.tolist(), position_owner, loss_cfg["num_negatives"],
                                   generator).to(device)
    out = model.sequence_loss(inputs, targets, mem_rows, negatives)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad_norm)
    optimizer.step()
    return {key: value.detach() for key, value in out.items()}
