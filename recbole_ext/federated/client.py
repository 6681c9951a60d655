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


def default_positions_per_pass(model) -> int:
    """Positions per gradient pass when `federated.cohort_positions` is null: about 1 GiB of
    activations or less on ML-1M in each stage (measured: ~0.1 MB a position in stage 1, ~0.4 MB with
    the align gating, ~2.5 MB with the experts, whose tensors are [positions, candidates, hidden]),
    so an ML-1M stage-3 run stays under 6 GiB in all."""
    return 256 if model.use_experts else 2048 if model.use_align else 8192


def positions_per_pass(model, settings: dict) -> int:
    """The most positions one forward and backward pass holds, in every backend and trainer."""
    return settings["federated"].get("cohort_positions") or default_positions_per_pass(model)


def whole_client_stats(model, stats: dict, route_mean: torch.Tensor | None) -> dict:
    """A client trained in parts reports its load-balance loss from the mean router weight over all
    its positions (`route_mean`), not as the sum of the parts' gradient surrogates (see `_losses`)."""
    if route_mean is not None:
        stats["lb_loss"] = ((route_mean - 0.5) ** 2).sum(-1)
        stats["loss"] = (stats["rec_loss"] + model.lambda_align * stats["align_loss"]
                         + model.lambda_lb * stats["lb_loss"])
    return stats


def part_bounds(positions_per_window: torch.Tensor, max_positions: int) -> list[int]:
    """Window boundaries [0, ..., W] of consecutive parts holding at most `max_positions` positions
    each (a single window larger than that is a part of its own)."""
    bounds, held = [0], 0
    for i, count in enumerate(positions_per_window.tolist()):
        if held and held + count > max_positions:
            bounds.append(i)
            held = 0
        held += count
    return bounds + [len(positions_per_window)]


def backward_in_parts(model, inputs, targets, mem_rows, negatives, max_positions: int) -> dict:
    """Backpropagate the loss over every position of the windows `inputs` [W, L] (targets, mem_rows
    [W, L]; negatives [P, n] for the P real positions in row-major order, or None) into the
    parameters' `.grad`, in parts of whole windows holding at most `max_positions` positions.

    The parts' gradients add up to the one-pass gradient (to float rounding): each position weighs
    1 / (all positions), the align loss over the distinct targets comes with the first part only, and
    the load balance, a function of the mean router weight over all positions, gets that mean first
    (`UR4RecMoE.mean_route`). Memory is bounded by the part, not the client. Returns the loss stats.
    """
    device = next(model.parameters()).device  # windows stay on the CPU; a pass runs where the model is
    valid = targets > 0
    bounds = part_bounds(valid.sum(1), max_positions)
    flat_targets, flat_rows = targets[valid].to(device), mem_rows[valid].to(device)
    negatives = None if negatives is None else negatives.to(device)
    total = len(flat_targets)
    align_items = torch.unique(flat_targets)
    several = len(bounds) > 2
    route_mean = None
    if several and model.use_experts:
        with torch.no_grad():
            route_mean = model.mean_route(flat_targets, negatives,
                                          torch.full((total,), 1.0 / total, device=device))
    stats, offset = {}, 0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = valid[start:stop]
        count = int(part.sum())
        rows = slice(offset, offset + count)
        out = model.masked_sequence_loss(
            inputs[start:stop].to(device), part.flatten().nonzero().squeeze(1).to(device), flat_targets[rows],
            flat_rows[rows], None if negatives is None else negatives[rows], align_items,
            torch.full_like(align_items, start == 0, dtype=torch.bool), None, float(total) if several else None,
            route_mean)
        out["loss"].backward()
        for key, value in out.items():
            stats[key] = stats.get(key, 0) + value.detach()
        offset += count
    return whole_client_stats(model, stats, route_mean)


def train_step(model, optimizer, windows: TrainingWindows, index: torch.Tensor, users, loss_cfg: dict,
               clip_grad_norm: float | None, generator: torch.Generator, max_positions: int) -> dict:
    """One optimizer step on windows[index]; `users[i]` owns window index[i] (negatives exclude its
    history). The gradient is taken in parts of at most `max_positions` positions."""
    inputs, targets, mem_rows = (t[index] for t in (windows.inputs, windows.targets, windows.mem_rows))
    negatives = None
    if loss_cfg["type"] != "ce":
        distinct, owner = torch.unique(torch.as_tensor(users), return_inverse=True)
        position_owner = owner.unsqueeze(1).expand_as(targets)[targets > 0]
        negatives = draw_negatives(windows, distinct.tolist(), position_owner, loss_cfg["num_negatives"],
                                   generator)
    optimizer.zero_grad(set_to_none=True)
    stats = backward_in_parts(model, inputs, targets, mem_rows, negatives, max_positions)
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad_norm)
    optimizer.step()
    return stats
