"""What a stage file declares about parameters: which train, which load from where, what must hold.

A parameter group is the first component of a parameter name (`item_embedding`, `trm_encoder`,
`visual_proj`, ...). Freeze patterns are globs over full parameter names; checkpoint loads take
whole groups.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib

import numpy as np
import torch

from .errors import UserError
from .runs import read_checkpoint


def group_of(name: str) -> str:
    return name.split(".", 1)[0]


def vocabulary_fingerprint(item_tokens) -> str:
    """Identifies an item vocabulary (tokens in internal-id order): a checkpoint's item embedding
    rows mean nothing under another one."""
    return hashlib.sha256("\n".join(map(str, item_tokens)).encode()).hexdigest()[:16]


def apply_trainable(model, patterns: list[str], where: str) -> dict[str, int]:
    """Freeze everything except parameters matching `patterns`; return trainable counts per group."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            groups = sorted({group_of(n) for n in names})
            raise UserError(f"{where}: trainable pattern {pattern!r} matches no parameter. "
                            f"Parameter groups are: {', '.join(groups)} (patterns are globs over names "
                            f"such as 'trm_encoder.*').")
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
    return trainable_counts(model)


def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters per group."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[group_of(name)] = counts.get(group_of(name), 0) + param.numel()
    return counts


def gradientless_parameters(model, windows, users: int = 32) -> list[str]:
    """Trainable parameters that get exactly zero gradient on this data, found by one backward pass
    of a copy of the model over the most recent window of up to `users` users.

    Structural zeros are what it finds: with one modality the softmaxes over the available
    modalities (align gating, router) are the constant 1, and whatever feeds only the missing
    modality (its projector, its expert) is multiplied by a zero weight. The copy runs without
    dropout, with gamma at 1 when gamma trains (at its usual start of 0 the experts would get their
    first gradient only in the second step) and with a few sampled negatives (the question is which
    parameters are connected to the loss, not by how much); the run's own model and random streams
    are untouched.
    """
    from .local.steps import backward_in_parts, default_positions_per_pass
    from .local.negatives import sample_negatives

    probe = copy.deepcopy(model).eval()
    probe.rec_loss = "sampled_softmax"
    if probe.gamma.requires_grad:
        with torch.no_grad():
            probe.gamma.fill_(1.0)
    clients = windows.clients
    chosen = np.unique(clients[np.linspace(0, len(clients) - 1, min(users, len(clients))).astype(int)])
    index = torch.as_tensor(windows.window_offsets[chosen])  # each user's first window is its most recent
    targets = windows.targets[index]
    valid = targets > 0
    owner = torch.arange(len(chosen)).unsqueeze(1).expand_as(valid)[valid]
    negatives = sample_negatives(windows.excluded(chosen.tolist()), owner, 8, torch.Generator().manual_seed(0))
    backward_in_parts(probe, windows.inputs[index], targets, windows.mem_rows[index], negatives,
                      default_positions_per_pass(probe))
    return [name for name, param in probe.named_parameters()
            if param.requires_grad and (param.grad is None or not bool(param.grad.any()))]


def freeze_gradientless(model, windows) -> list[str]:
    """Leave the declared-trainable parameters that cannot learn on this data out of the trainable set
    (they keep their loaded or initial values, are not uploaded and are not counted); their names."""
    names = gradientless_parameters(model, windows)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def check_server_rate_patterns(model, fed: dict, where: str) -> None:
    """Every `federated.server_lr_groups` pattern must match a declared-trainable parameter."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for pattern in fed["server_lr_groups"]:
        if not fnmatch.filter(trainable, pattern):
            raise UserError(f"{where}: federated.server_lr_groups pattern {pattern!r} matches no trainable "
                            f"parameter. Trainable groups are: {', '.join(sorted({group_of(n) for n in trainable}))}.")


def load_groups(model, entries: list[dict], fingerprint: str) -> dict[str, str]:
    """Copy the declared parameter groups from each checkpoint; return {group: checkpoint path}."""
    params = dict(model.named_parameters())
    loaded = {}
    for entry in entries:
        path = entry["checkpoint"]
        payload = read_checkpoint(path)
        theirs = payload["meta"].get("item_vocabulary")
        if theirs != fingerprint:
            raise UserError(f"{path}: trained on another item vocabulary ({payload['meta'].get('dataset')}, "
                            f"fingerprint {theirs}) than this run's ({fingerprint}); its item embedding "
                            f"rows would not line up.")
        state = payload["state_dict"]
        for group in entry["groups"]:
            mine = [n for n in params if group_of(n) == group]
            if not mine:
                raise UserError(f"{path}: load group {group!r} is not a parameter group of this model")
            for name in mine:
                if name not in state:
                    raise UserError(f"{path}: has no parameter {name!r}, so group {group!r} cannot be "
                                    f"loaded (the checkpoint holds groups "
                                    f"{', '.join(sorted({group_of(k) for k in state}))})")
                if state[name].shape != params[name].shape:
                    raise UserError(f"{path}: {name} has shape {tuple(state[name].shape)}, this model "
                                    f"needs {tuple(params[name].shape)}")
                with torch.no_grad():
                    params[name].copy_(state[name])
            loaded[group] = path
    return loaded


def check_expectations(trainable: dict[str, int], expect: dict, where: str) -> None:
    total = sum(trainable.values())
    limit = expect.get("max_trainable_params")
    if limit is not None and total > limit:
        raise UserError(f"{where}: {total:,} trainable parameters, more than expect.max_trainable_params "
                        f"= {limit:,} (groups: {trainable})")


def describe(model, trainable: dict[str, int], loaded: dict[str, str], gradientless: list[str] = ()) -> str:
    rows = []
    for group in dict.fromkeys(group_of(n) for n, _ in model.named_parameters()):
        size = sum(p.numel() for n, p in model.named_parameters() if group_of(n) == group)
        state = "train " if group in trainable else "frozen"
        source = f"  <- {loaded[group]}" if group in loaded else ""
        rows.append(f"  {state} {group:<20} {size:>10,}{source}")
    rows.append(f"  trainable parameters: {sum(trainable.values()):,}")
    if gradientless:
        whole = [g for g in dict.fromkeys(map(group_of, gradientless)) if g not in trainable]
        some = [n for n in gradientless if group_of(n) in trainable]
        rows.append("  not trained, although declared trainable, because they get no gradient on this data: "
                    + ", ".join(whole + some))
    return "\n".join(rows)
