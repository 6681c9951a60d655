"""Local training: every position of a batch of windows as a target, in one step."""
from __future__ import annotations

import torch

from ..data.sequences import TrainingWindows
from .negatives import sample_negatives

STAT_KEYS = ("loss", "rec_loss", "align_loss", "lb_loss")


def make_optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; decoupled decay, never on embeddings, norms or scalars,
    so rows a client never touched do not shrink."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, foreach=True)


def train_step(model, optimizer, windows: TrainingWindows, index: torch.Tensor, users, loss_cfg: dict,
               clip_grad_norm: float | None, generator: torch.Generator) -> dict:
    """One optimizer step on windows[index]; `users[i]` owns window index[i] (negatives exclude its history)."""
    inputs, targets, mem_rows = windows.inputs[index], windows.targets[index], windows.mem_rows[index]
    negatives = None
    if loss_cfg["type"] != "ce":
        distinct, owner = torch.unique(torch.as_tensor(users), return_inverse=True)
        valid = targets > 0
        position_owner = owner.unsqueeze(1).expand_as(targets)[valid]
        negatives = sample_negatives(windows.excluded(distinct.tolist()), position_owner,
                                     loss_cfg["num_negatives"], generator)
    out = model.sequence_loss(inputs, targets, mem_rows, negatives)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad_norm)
    optimizer.step()
    return {key: value.detach() for key, value in out.items()}
