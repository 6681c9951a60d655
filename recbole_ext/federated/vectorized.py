"""The `vectorized` backend: a cohort of clients trained at once with torch.func.

Each cohort runs `vmap(grad(loss))` over its clients: one batched forward and backward instead of
one small one per client, with each client's own gradient clipping, its own optimizer (SGD or
AdamW of local/optim.py, state stacked [C, ...]) and its own negatives, drawn from its own
generator exactly as `sequential` draws them.
Frozen parameters and buffers are shared, never copied per client. The first local step starts every
client from the global parameters, so they are passed once (not stacked) and the forward runs plain
matrix products; with one local step (the default), the optimizer's first step is applied in closed
form and summed over the cohort at once, so no per-client copy of the parameters or of optimizer
state is ever made (unless a privacy option needs each client's own change: privacy.Uploads).

Shapes: clients are padded to a common number of windows and of trained positions and masked
(`UR4RecMoE.masked_sequence_loss`). Cohorts are formed from clients sorted by size, so a cohort pads
no client by more than MAX_PADDING of its positions (GPU_MAX_PADDING on a GPU); a cohort holds at
most `cohort_size` clients and `cohort_positions` padded positions per gradient pass (both, when
null, larger on a GPU: `gpu_cohort_size`, `client.default_positions_per_pass`). A client larger than that is trained in
parts (sets of its windows) whose gradients are added before its optimizer step, so one gradient
pass never holds more than about `cohort_positions` positions of activations: that bounds memory for
ML-1M users with 2,000+ interactions (stage 3 holds about 3 MB of activations per position). The
transformer skips the padding too: padding windows are dropped and each client's short (oldest)
window runs at its own length (`trim_windows`).

With a frozen backbone (stage 2) the backbone states come from `BackboneCache`: no transformer runs
in a round at all.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from ..data.sequences import TrainingWindows, to_device
from .aggregate import RoundSums
from .backbone_cache import BackboneCache
from ..local.steps import backward_in_parts, client_generator, compact, positions_per_pass, whole_client_stats
from ..local.optim import (adamw_, clip_coefficients, decays, first_adamw_step_sum, first_sgd_step_sum,
                          scale_per_client_, sgd_)
from ..local.negatives import negatives_from_uniform
from .privacy import Uploads

MAX_PADDING = 0.25  # a cohort pads a client's positions by at most this fraction (on a CPU)
CPU_COHORT_SIZE = 64  # `federated.cohort_size` null on a CPU
# On a GPU a cohort's fixed work (a batched pass of some thousand small kernels) costs more than
# padding's arithmetic: fewer, larger cohorts, as many clients as a quarter of the free memory holds
# (each client's gradient is a full copy of the trainable parameters), at most GPU_COHORT_SIZE.
GPU_MAX_PADDING = 1.0
GPU_COHORT_SIZE = 1024


class _Call(nn.Module):
    """`functional_call` runs a module's forward; this one's forward is one method of the model."""

    def __init__(self, model, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args):
        return getattr(self.model, self.method)(*args)


def plan_cohorts(clients: np.ndarray, sizes: np.ndarray, max_clients: int, max_positions: int,
                 max_padding: float = MAX_PADDING) -> list[np.ndarray]:
    """Split `clients` into cohorts (arrays of client ids) of similar size (training positions):
    sorted by size, a cohort pads none of its clients by more than `max_padding` of their size and
    holds at most `max_clients` clients and `max_positions` padded positions (a larger client is a
    cohort of its own, trained in parts)."""
    order = np.argsort(sizes[clients], kind="stable")
    cohorts, current, first = [], [], 0
    for client in clients[order]:
        size = int(sizes[client])
        if current and (len(current) >= max_clients or size > math.floor(first * (1 + max_padding))
                        or (len(current) + 1) * size > max_positions):
            cohorts.append(np.array(current))
            current = []
        if not current:
            first = size
        current.append(client)
    if current:
        cohorts.append(np.array(current))
    return cohorts


def pooled_sum_is_exact(model, settings: dict, uploads: Uploads) -> bool:
    """Whether a round's sum of client updates is one backward pass over the clients' pooled
    positions: one unclipped local SGD step, target weights, no per-client upload processing, and a
    loss that is a sum over positions with nothing drawn per client (full softmax; no align loss over
    a client's distinct targets, no load balance over its mean route). Then
    sum_c n_c * (-lr g_c) = -lr * (gradient of the summed loss): the per-client gradients (dense
    [C, items, hidden] under the full softmax) are never formed. Equal to the per-client path to
    float rounding with dropout off (tests/test_backends.py); with dropout, its masks are drawn
    per pooled batch instead of per client, from the same distribution."""
    opt, fed = settings["optim"], settings["federated"]
    return (fed["local_epochs"] == 1 and opt["optimizer"] == "sgd" and opt["clip_grad_norm"] is None
            and not uploads.per_client and settings["loss"]["type"] == "ce" and not model.use_align
            and not model.use_experts and not model.backbone_frozen())


def gpu_cohort_size(model) -> int:
    """`federated.cohort_size` null on a GPU: the clients whose gradients (three copies of the
    trainable parameters each, with the optimizer's temporaries) fill a quarter of its free memory,
    between CPU_COHORT_SIZE and GPU_COHORT_SIZE."""
    device = next(model.parameters()).device
    per_client = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(GPU_COHORT_SIZE, max(CPU_COHORT_SIZE, free // 4 // max(1, per_client))))


class VectorizedBackend:
    def __init__(self, model, windows: TrainingWindows, settings: dict, own_cache: bool = True):
        """own_cache False: the stage-2 states are handed in as `shared_states` (Ray actors)."""
        self.model = model
        self.windows = windows
        self.settings = settings
        fed = settings["federated"]
        self.device = windows.device
        on_gpu = self.device.type == "cuda"
        self.cohort_size = fed["cohort_size"] or (gpu_cohort_size(model) if on_gpu else CPU_COHORT_SIZE)
        self.max_padding = GPU_MAX_PADDING if on_gpu else MAX_PADDING
        self.cohort_positions = positions_per_pass(model, settings)
        self.window_counts = np.diff(windows.window_offsets)
        self.cache = BackboneCache(model, windows.inputs) if own_cache and model.backbone_frozen() else None
        self.shared_states = None
        self.loss_module = _Call(model, "masked_sequence_loss")
        self.route_module = _Call(model, "mean_route")
        self.uploads = Uploads(settings)
        self.pooled = pooled_sum_is_exact(model, settings, self.uploads)

    def train_clients(self, clients, global_params: dict, round_seed: int, progress: bool = False,
                      round_clients=None) -> RoundSums:
        """The sums of the uploads of `clients`; `round_clients`: all the round's clients (the mask
        partners; default `clients`)."""
        round_clients = clients if round_clients is None else round_clients
        sums = self.uploads.zeros(global_params)
        if self.pooled:
            self._pooled_sum(np.asarray(clients), global_params, sums)
            return sums
        cohorts = plan_cohorts(np.asarray(clients), self.windows.num_targets, self.cohort_size,
                               self.cohort_positions, self.max_padding)
        # Frozen parameters and buffers, shared by every client (in_dims None below).
        frozen = {f"model.{name}": value for name, value in self.model.named_parameters() if name not in global_params}
        frozen.update({f"model.{name}": value for name, value in self.model.named_buffers()})
        states = self.cache.states() if self.cache is not None else self.shared_states
        self.model.train()
        for cohort in tqdm(cohorts, desc="cohorts", leave=False, disable=not progress):
            self._train_cohort(cohort, global_params, frozen, states, round_seed, sums, round_clients)
        return sums

    def _pooled_sum(self, clients: np.ndarray, global_params: dict, sums: RoundSums) -> None:
        """The clients' weighted sum of one unclipped SGD step each, from one backward pass of the
        loss over all their positions (see `pooled_sum_is_exact`), in parts of `cohort_positions`."""
        opt, w = self.settings["optim"], self.windows
        names = list(global_params)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in global_params.items():
                params[name].copy_(value)
                params[name].grad = None
        host_index = np.concatenate([np.arange(w.window_offsets[c], w.window_offsets[c + 1]) for c in clients])
        index = to_device(host_index, w.device)
        total = float(w.num_targets[clients].sum())
        self.model.train()
        stats = backward_in_parts(self.model, w.inputs[index], w.targets[index], w.mem_rows[index], None,
                                  self.cohort_positions, w.host_targets[host_index])
        # The mean loss's gradient times the positions is the target-weighted sum of the clients' own.
        grads = [(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).mul(total)
                 .unsqueeze(0) for n in names]
        weight_decay = [opt["weight_decay"] if decays(n, global_params[n]) else 0.0 for n in names]
        one = torch.ones(1, device=grads[0].device)
        updates = first_sgd_step_sum(grads, None, one, total, [global_params[n] for n in names],
                                     opt["learning_rate"], weight_decay)
        with torch.no_grad():
            for name in names:
                params[name].grad = None
        dense_bytes = sum(p.numel() * p.element_size() for p in global_params.values())
        self.uploads.add_summed(sums, dict(zip(names, updates)), len(clients), dense_bytes)
        sums.add_stats(stats, float(total))
        sums.weight += total
        sums.clients += len(clients)

    # ----------------------------------------------------------------- one cohort
    def _train_cohort(self, cohort, global_params, frozen, states, round_seed, sums: RoundSums,
                      round_clients) -> None:
        opt, fed = self.settings["optim"], self.settings["federated"]
        names = list(global_params)
        lr, epochs = opt["learning_rate"], fed["local_epochs"]
        weight_decay = [opt["weight_decay"] if decays(name, global_params[name]) else 0.0 for name in names]
        parts, whole = self._cohort_parts(cohort, round_seed, states)
        device = next(iter(global_params.values())).device
        # Weights and their sum from the host's target counts: nothing here waits for the device.
        host_weights = self.uploads.weights(self.windows.num_targets[cohort])
        weights, total_weight = to_device(host_weights.numpy(), device), float(host_weights.sum())

        def loss(trainable, shared, *inputs):
            values = {**shared, **{f"model.{name}": value for name, value in trainable.items()}}
            out = functional_call(self.loss_module, values, inputs)
            return out["loss"], {key: value.detach() for key, value in out.items()}

        def gradients(params, batched: bool, step: int):
            """Per-client gradients [C, ...] and stats of one local step, summed over the parts.
            `batched` False: every client holds `params` (the first step), passed once."""
            route_mean = self._route_means(params, batched, frozen, whole, step) if len(parts) > 1 else None
            total, stats = None, {}
            for part in parts:
                inputs = [part["item_seq"], part["positions"], part["targets"], part["mem_rows"],
                          None if part["negatives"] is None else part["negatives"][step],
                          part["align_items"], part["align_mask"], part["states"], part["total"], route_mean,
                          part["tail_seq"]]
                inputs = [None if x is None else x.to(device) for x in inputs]
                dims = [None if x is None else 0 for x in inputs]
                fn = vmap(grad(loss, has_aux=True), in_dims=(0 if batched else None, None, *dims),
                          randomness="different")
                grads, part_stats = fn(params, frozen, *inputs)
                total = grads if total is None else {n: total[n] + grads[n] for n in names}
                for key, value in part_stats.items():
                    stats[key] = stats.get(key, 0) + value
            stats = whole_client_stats(self.model, stats, route_mean)
            grads = [total[name] for name in names]
            clip = clip_coefficients(grads, opt["clip_grad_norm"]) if opt["clip_grad_norm"] else None
            return grads, stats, clip

        grads, stats, clip = gradients(global_params, False, 0)
        sgd = opt["optimizer"] == "sgd"
        if epochs == 1 and not self.uploads.per_client:
            # One step from a fresh optimizer, in closed form, summed over the cohort at once: no
            # stacked parameter or moment copies. The privacy options (clipping, masks, sparse rows)
            # act on each client's own change, so they take the stacked path below.
            first_step_sum = first_sgd_step_sum if sgd else first_adamw_step_sum
            updates = first_step_sum(grads, clip, weights, total_weight, [global_params[n] for n in names], lr,
                                     weight_decay)
            dense_bytes = sum(p.numel() * p.element_size() for p in global_params.values())
            self.uploads.add_summed(sums, dict(zip(names, updates)), len(cohort), dense_bytes)
        else:
            size = len(cohort)
            params = {n: global_params[n].unsqueeze(0).repeat(size, *([1] * global_params[n].ndim)) for n in names}
            stacked = [params[n] for n in names]
            exp_avg = [torch.zeros_like(value) for value in stacked]
            exp_avg_sq = [torch.zeros_like(value) for value in stacked]
            for step in range(epochs):
                if step:
                    grads, stats, clip = gradients(params, True, step)
                if clip is not None:
                    scale_per_client_(grads, clip)
                if sgd:
                    sgd_(stacked, grads, lr, weight_decay)
                else:
                    adamw_(stacked, grads, exp_avg, exp_avg_sq, step + 1, lr, weight_decay)
            with torch.no_grad():
                deltas = {n: value.sub_(global_params[n]) for n, value in zip(names, stacked)}
                self.uploads.add(sums, deltas, cohort, weights, round_seed, round_clients)
        sums.add_stats(stats, weights)
        sums.weight += total_weight
        sums.clients += len(cohort)

    @torch.no_grad()
    def _route_means(self, params, batched: bool, frozen, whole: dict, step: int) -> torch.Tensor | None:
        """[C, 2]: each client's mean router weight over all its positions and candidates (the
        load-balance loss couples a client's parts through it)."""
        if not self.model.use_experts:
            return None
        device = next(iter(frozen.values())).device
        negatives = None if whole["negatives"] is None else whole["negatives"][step].to(device)
        targets, weight = whole["targets"].to(device), whole["weight"].to(device)

        def mean_route(trainable, shared, targets, negatives, weight):
            values = {**shared, **{f"model.{name}": value for name, value in trainable.items()}}
            return functional_call(self.route_module, values, (targets, negatives, weight))

        return vmap(mean_route, in_dims=(0 if batched else None, None, 0, None if negatives is None else 0, 0),
                    randomness="different")(params, frozen, targets, negatives, weight)

    def _cohort_parts(self, cohort, round_seed: int, states) -> tuple[list[dict], dict]:
        """The cohort's inputs, as a list of parts (one unless a client is too large for one pass),
        plus the whole-cohort targets, negatives and position weights (for `_route_means`).

        Built on the windows' device; every shape comes from counts the host holds (`_host` arrays),
        so assembling a cohort never waits for the device."""
        w, loss_cfg, epochs = self.windows, self.settings["loss"], self.settings["federated"]["local_epochs"]
        device, length = self.device, w.inputs.shape[1]
        starts, counts = w.window_offsets[cohort], self.window_counts[cohort]
        slots = np.arange(counts.max())
        present_host = slots[None, :] < counts[:, None]  # [C, W]
        index_host = np.where(present_host, starts[:, None] + slots[None, :], 0)
        sizes_host = np.where(present_host, w.window_lengths[index_host], 0)  # real positions per window
        totals_host = w.num_targets[cohort]
        width = int(totals_host.max())  # positions of the largest client
        index = to_device(index_host, device)
        present = to_device(present_host, device).unsqueeze(-1)
        inputs = w.inputs[index] * present  # [C, W, L]; padding windows are all zeros
        targets = (w.targets[index] * present).flatten(1)  # [C, W * L]
        mem_rows = (w.mem_rows[index] * present).flatten(1)
        valid = targets > 0
        totals = to_device(totals_host, device)
        ordinal = valid.cumsum(1) - 1  # rank of each real position among its client's, in row-major order

        # Every client's negatives for every local step, in the order `sequential` draws them.
        position, real = compact(valid, width)  # [C, P]
        negatives = None
        if loss_cfg["type"] != "ce":
            num = loss_cfg["num_negatives"]
            # Each client's uniform numbers from its own stream, in the order `sequential` draws them
            # (step by step), then mapped to items for the whole cohort at once.
            draws = [[] for _ in range(epochs)]
            for i, user in enumerate(cohort):
                generator = client_generator(round_seed, user, device)
                for step in range(epochs):
                    draws[step].append(torch.rand(int(totals_host[i]), num, generator=generator, device=device))
            clients = np.arange(len(cohort))
            owner = to_device(np.repeat(clients, totals_host), device)
            excluded = w.excluded(cohort)
            items = torch.stack([negatives_from_uniform(excluded, owner, torch.cat(d)) for d in draws])
            # [E, C, P, num]; padding rows get item 1: a real item, scored at weight 0. Client c's
            # draws go to its first totals[c] slots.
            first = np.repeat(np.cumsum(totals_host) - totals_host, totals_host)
            slot = np.repeat(clients * width, totals_host) + np.arange(int(totals_host.sum())) - first
            negatives = torch.ones(epochs, len(cohort) * width, num, dtype=torch.long, device=device)
            negatives[:, to_device(slot, device)] = items
            negatives = negatives.view(epochs, len(cohort), width, num)
        align_items, align_mask = self._align_items(targets, int(w.distinct_targets[cohort].max()))
        whole = {"targets": targets.gather(1, position) * real, "negatives": negatives,
                 "weight": real / totals.clamp_min(1).unsqueeze(1).to(torch.float32)}

        part_count = math.ceil(len(cohort) * width / self.cohort_positions)
        part_windows = math.ceil(inputs.shape[1] / part_count)
        window = torch.div(torch.arange(targets.shape[1], device=device), length, rounding_mode="floor")
        parts = []
        for start in range(0, inputs.shape[1], part_windows):
            held = sizes_host[:, start:start + part_windows]
            column, real = compact(valid & (window >= start) & (window < start + part_windows),
                                   int(held.sum(1).max()))
            part = {"positions": (column - start * length) * real,
                    "targets": targets.gather(1, column) * real,
                    "mem_rows": mem_rows.gather(1, column) * real,
                    "align_items": align_items,
                    "align_mask": align_mask if start == 0 else torch.zeros_like(align_mask),
                    "total": totals.to(torch.float32) if part_count > 1 else None,
                    "negatives": None}
            if negatives is not None:
                rank = ordinal.gather(1, column) * real
                part["negatives"] = negatives.gather(2, rank[None, :, :, None].expand(epochs, -1, -1, negatives.shape[3]))
            if states is None:
                part.update(states=None, **trim_windows(inputs[:, start:start + part_windows], column - start * length,
                                                        real, held))
            else:  # frozen backbone: its output at each position, looked up; no transformer at all
                flat = index.gather(1, column // length) * length + column % length
                part.update(item_seq=None, tail_seq=None, states=states.flatten(0, 1)[flat.to(states.device)])
            parts.append(part)
        return parts, whole

    def _align_items(self, targets: torch.Tensor, width: int):
        """Each client's distinct targets, [C, U] padded with 0, and the mask of real entries; `width`:
        the most distinct targets of a client (TrainingWindows.distinct_targets)."""
        if not self.model.use_align:
            return (torch.zeros(len(targets), 1, dtype=torch.long, device=targets.device),
                    torch.zeros(len(targets), 1, dtype=torch.bool, device=targets.device))
        # Sort each row, keep the first of every run of equal items; padding (0) sorts first and is dropped.
        ordered, _ = torch.sort(targets, dim=1)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        column, real = compact(first & (ordered > 0), width)
        return ordered.gather(1, column) * real, real


def trim_windows(windows: torch.Tensor, column: torch.Tensor, real: torch.Tensor,
                 sizes: np.ndarray | None = None) -> dict:
    """Drop the transformer's work on padding: the cohort's padding windows go, and each client's
    window shorter than L (the oldest one) moves to `tail_seq` [C, 1, T], cut to the longest such
    length T. windows [C, W, L]; column [C, P] positions into W * L (real ones where `real`); sizes
    [C, W] each window's real items, on the host (None: counted from `windows`, waiting for the device).
    Returns item_seq [C, F, L] (the full windows, or None), tail_seq (or None), and the positions
    re-indexed into item_seq's F * L followed by tail_seq's T, as `masked_sequence_loss` reads them."""
    length, device = windows.shape[2], windows.device
    if sizes is None:
        sizes = (windows > 0).sum(-1).cpu().numpy()
    full_host = sizes == length
    short_host = (sizes > 0) & ~full_host  # at most one per client: the oldest window
    count = int(full_host.sum(1).max()) if full_host.size else 0  # the most full windows of a client
    tail_length = int(sizes[short_host].max()) if short_host.any() else 0
    full, short = (to_device(m, device) for m in (full_host, short_host))
    window, offset = torch.div(column, length, rounding_mode="floor"), column % length
    in_tail = short.gather(1, window)
    slot = (full.cumsum(1) - 1).gather(1, window)  # rank of a full window among the client's full ones
    positions = torch.where(in_tail, count * length + offset, slot * length + offset) * real
    item_seq = None
    if count:
        keep, kept = compact(full, count)  # [C, F]
        item_seq = windows.gather(1, keep.unsqueeze(-1).expand(-1, -1, length)) * kept.unsqueeze(-1)
    tail_seq = None
    if tail_length:
        which = to_device(short_host.argmax(1), device)  # the short window (or 0, zeroed below, if none)
        tail_seq = (windows[torch.arange(len(windows), device=device), which, :tail_length]
                    * short.any(1, keepdim=True)).unsqueeze(1)
    return {"item_seq": item_seq, "tail_seq": tail_seq, "positions": positions}
