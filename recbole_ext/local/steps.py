"""Local training: every position of a batch of windows as a target, in one step.

What every backend shares about a client, so they all train it the same way: its random stream
(`client_generator`), its negatives (`draw_negatives`), the loss in parts (`backward_in_parts`) and
the optimizer (`optim.py`: `train_step` here steps one set of windows with it as a cohort of
one; `federated/vectorized.py` steps stacked per-client tensors with the same functions).
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.sequences import TrainingWindows, to_device
from .optim import LocalOptimizer
from .negatives import sample_negatives


def round_seed(seed: int, round_index: int) -> int:
    return seed * 100_003 + round_index


def client_generator(round_seed: int, client: int, device="cpu") -> torch.Generator:
    """A client's own random stream on `device`, a function of (round seed, client id) alone: whichever
    backend, process or cohort trains the client on a given device, it draws the same negatives (a
    CUDA generator's stream differs from the CPU's for the same seed)."""
    state = np.random.SeedSequence([int(round_seed), int(client)]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def draw_negatives(windows: TrainingWindows, users, position_owner: torch.Tensor, num: int,
                   generator: torch.Generator) -> torch.Tensor:
    """[P, num] negatives for P positions; position_owner[p] indexes `users` (distinct user ids)."""
    return sample_negatives(windows.excluded(users), position_owner, num, generator)


def default_positions_per_pass(model) -> int:
    """Positions per gradient pass when `federated.cohort_positions` is null: about 1 GiB of
    activations or less on ML-1M in each stage (measured: ~0.1 MB a position in stage 1, ~0.4 MB with
    the align gating, ~2.5 MB with the experts, whose tensors are [positions, candidates, hidden]),
    so an ML-1M stage-3 run stays under 6 GiB in all. On a GPU, that many per 4 GiB of its free
    memory (a quarter of it): there a pass's fixed cost, not its size, is what a round pays for."""
    positions = 256 if model.use_experts else 2048 if model.use_align else 8192
    device = next(model.parameters()).device
    if device.type != "cuda":
        return positions
    free, _ = torch.cuda.mem_get_info(device)
    return positions * max(1, free // (4 * 2 ** 30))


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


def compact(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's True columns, in order, left-aligned: (index [R, M], real [R, M]), padded with 0.

    M = max(1, `width`), which must be at least the most True entries of a row: callers know it on
    the host, so no shape depends on the device's data (None counts them, which waits for the device).
    """
    if width is None:
        width = int(mask.sum(1).max()) if mask.numel() else 1
    width = max(1, width)
    if mask.shape[1] < width:  # fewer columns than slots: pad with False columns
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], width - mask.shape[1])], dim=1)
    # A stable sort puts each row's True columns first, in their order.
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    real = torch.arange(width, device=mask.device) < mask.sum(1, keepdim=True)
    return order * real, real


def part_bounds(positions_per_window: np.ndarray, max_positions: int) -> list[int]:
    """Window boundaries [0, ..., W] of consecutive parts holding at most `max_positions` positions
    each (a single window larger than that is a part of its own)."""
    bounds, held = [0], 0
    for i, count in enumerate(positions_per_window.tolist()):
        if held and held + count > max_positions:
            bounds.append(i)
            held = 0
        held += count
    return bounds + [len(positions_per_window)]


def backward_in_parts(model, inputs, targets, mem_rows, negatives, max_positions: int,
                      host_targets: np.ndarray | None = None) -> dict:
    """Backpropagate the loss over every position of the windows `inputs` [W, L] (targets, mem_rows
    [W, L]; negatives [P, n] for the P real positions in row-major order, or None) into the
    parameters' `.grad`, in parts of whole windows holding at most `max_positions` positions.
    `host_targets`: `targets` on the host, where the parts and the align loss's distinct targets are
    worked out without waiting for the device (None: copied from `targets`).

    The parts' gradients add up to the one-pass gradient (to float rounding): each position weighs
    1 / (all positions), the align loss over the distinct targets comes with the first part only, and
    the load balance, a function of the mean router weight over all positions, gets that mean first
    (`UR4RecMoE.mean_route`). Memory is bounded by the part, not the client. Returns the loss stats.
    """
    device = next(model.parameters()).device  # a pass runs where the model is, whatever the windows' device
    inputs, targets, mem_rows = inputs.to(device), targets.to(device), mem_rows.to(device)
    host_targets = targets.cpu().numpy() if host_targets is None else host_targets
    lengths = (host_targets > 0).sum(1)
    valid = targets > 0
    bounds = part_bounds(lengths, max_positions)
    total = int(lengths.sum())
    flat = compact(valid.flatten().unsqueeze(0), total)[0][0]  # the real positions, row-major
    flat_targets, flat_rows = targets.flatten()[flat], mem_rows.flatten()[flat]
    negatives = None if negatives is None else negatives.to(device)
    align_items = to_device(np.unique(host_targets[host_targets > 0]), device)
    several = len(bounds) > 2
    route_mean = None
    if several and model.use_experts:
        with torch.no_grad():
            route_mean = model.mean_route(flat_targets, negatives,
                                          torch.full((total,), 1.0 / total, device=device))
    stats, offset = {}, 0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        count = int(lengths[start:stop].sum())
        rows = slice(offset, offset + count)
        out = model.masked_sequence_loss(
            inputs[start:stop], compact(valid[start:stop].flatten().unsqueeze(0), count)[0][0], flat_targets[rows],
            flat_rows[rows], None if negatives is None else negatives[rows], align_items,
            torch.full_like(align_items, start == 0, dtype=torch.bool), None, float(total) if several else None,
            route_mean)
        out["loss"].backward()
        for key, value in out.items():
            stats[key] = stats.get(key, 0) + value.detach()
        offset += count
    return whole_client_stats(model, stats, route_mean)


def train_step(model, optimizer: LocalOptimizer, windows: TrainingWindows, index: torch.Tensor, users,
               loss_cfg: dict, generator: torch.Generator, max_positions: int) -> dict:
    """One optimizer step (clipped as the optimizer's `optim` says) on windows[index]; `users[i]`
    owns window index[i] (negatives exclude its history). The gradient is taken in parts of at most
    `max_positions` positions."""
    host_index = index.numpy()
    index = to_device(host_index, windows.device)
    inputs, targets, mem_rows = (t[index] for t in (windows.inputs, windows.targets, windows.mem_rows))
    negatives = None
    if loss_cfg["type"] != "ce":
        distinct, owner = np.unique(np.asarray(users), return_inverse=True)
        position_owner = to_device(np.repeat(owner, windows.window_lengths[host_index]), windows.device)
        negatives = draw_negatives(windows, distinct.tolist(), position_owner, loss_cfg["num_negatives"],
                                   generator)
    optimizer.zero_grad()
    stats = backward_in_parts(model, inputs, targets, mem_rows, negatives, max_positions,
                              windows.host_targets[host_index])
    optimizer.step()
    return stats
