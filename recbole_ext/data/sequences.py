"""Each user's training sequence, cut into fixed-length windows for all-position training.

A user's training pairs are (item at row j, item at row j + 1) for every training target; they are
cut into windows of `max_len` from the most recent end, so only the oldest window is short. Every
target is trained exactly once per pass, with causal attention inside its window.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import UserError
from .dataset import MEM_ROW


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """A host array as a tensor on `device`. To a GPU through pinned memory without waiting: a copy
    from ordinary memory would make the host wait for the device's queue, once per index array."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class TrainingWindows:
    inputs: torch.Tensor        # [W, L] item ids, right-padded with 0
    targets: torch.Tensor       # [W, L] next item at each position, 0 = padding
    mem_rows: torch.Tensor      # [W, L] memory-table row of each target
    window_offsets: np.ndarray  # [U + 1]: user u owns windows window_offsets[u]:window_offsets[u + 1]
    history: list               # per user: np.ndarray of training item ids (negatives exclude them)
    num_targets: np.ndarray     # [U] training targets per user (FedAvg weights)
    n_items: int
    # Shapes known on the host, so a backend sizes a cohort's tensors without asking the device:
    host_targets: np.ndarray     # [W, L] `targets` on the host (a view of them on a CPU)
    window_lengths: np.ndarray   # [W] real positions (= real input items) of each window
    distinct_targets: np.ndarray  # [U] distinct training targets per user (the align loss's items)
    # [U, n_items] bool, True for the items a user's negatives must not be (its history, and padding):
    # U x n_items bytes (22 MB on ML-1M), so a cohort's rows are one gather on the windows' device.
    excluded_table: torch.Tensor
    # [U] row of each user in `excluded_table` (-1: not held here); None when every user has its row
    excluded_row: np.ndarray | None = None

    @property
    def clients(self) -> np.ndarray:
        """Users with at least one training target: the federated clients."""
        return np.flatnonzero(self.num_targets > 0)

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def to(self, device) -> "TrainingWindows":
        """The windows and the exclusion table on `device` (offsets, counts and histories stay on
        the host, where cohorts are planned)."""
        return replace(self, inputs=self.inputs.to(device), targets=self.targets.to(device),
                       mem_rows=self.mem_rows.to(device), excluded_table=self.excluded_table.to(device))

    def windows_of(self, users) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(
            [np.arange(self.window_offsets[u], self.window_offsets[u + 1]) for u in users]))

    def excluded(self, users) -> torch.Tensor:
        """[len(users), n_items] bool: items a negative must not be (the history, and padding)."""
        users = np.asarray(users, dtype=np.int64)
        if self.excluded_row is not None:
            rows = self.excluded_row[users]
            if (rows < 0).any():
                raise ValueError(f"users {users[rows < 0][:5].tolist()} are not held here")
            users = rows
        return self.excluded_table[to_device(users, self.device)]


def build_training_windows(dataset, train_dataset, max_len: int) -> TrainingWindows:
    """`dataset` is the full UR4RecDataset, `train_dataset` RecBole's training split of it."""
    items = dataset.sequence_items
    offsets = dataset.sequence_offsets
    n_users = len(offsets) - 1
    train_rows = train_dataset.inter_feat[MEM_ROW].numpy()
    train_users = train_dataset.inter_feat[dataset.uid_field].numpy()
    last_row = np.full(n_users, -1, dtype=np.int64)
    np.maximum.at(last_row, train_users, train_rows)
    history = [items[offsets[u]:last_row[u] + 1] if last_row[u] >= offsets[u] else np.zeros(0, np.int64)
               for u in range(n_users)]
    return windows_from_histories(history, offsets[:-1], dataset.item_num, max_len)


def windows_from_histories(history: list, first_rows: np.ndarray, n_items: int, max_len: int,
                           held=None) -> TrainingWindows:
    """The windows of every user's training sequence `history[u]` (item ids in time order), whose
    item j sits at row `first_rows[u] + j` of the memory table. `held`: the users whose negatives can
    be drawn (None: all); a node that holds some users' data builds only their exclusion rows."""
    n_users = len(history)
    inputs, targets, mem_rows, window_counts = [], [], [], np.zeros(n_users, np.int64)
    num_targets, distinct, lengths = np.zeros(n_users, dtype=np.int64), np.zeros(n_users, dtype=np.int64), []
    for u, seq_items in enumerate(history):
        pairs = len(seq_items) - 1
        if pairs <= 0:
            continue
        num_targets[u] = pairs
        distinct[u] = len(np.unique(seq_items[1:]))
        for stop in range(pairs, 0, -max_len):  # windows from the most recent end backwards
            lo = max(0, stop - max_len)
            n = stop - lo
            seq, tgt, row = (np.zeros(max_len, np.int64) for _ in range(3))
            seq[:n] = seq_items[lo:stop]
            tgt[:n] = seq_items[lo + 1:stop + 1]
            row[:n] = first_rows[u] + np.arange(lo + 1, stop + 1)
            inputs.append(seq), targets.append(tgt), mem_rows.append(row), lengths.append(n)
            window_counts[u] += 1
    stack = lambda rows: torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, max_len, dtype=torch.long)
    rows_of = np.arange(n_users) if held is None else np.asarray(held, dtype=np.int64)
    excluded = np.zeros((len(rows_of), n_items), dtype=bool)
    excluded[:, 0] = True
    owned = [history[u] for u in rows_of]
    excluded[np.repeat(np.arange(len(rows_of)), [len(h) for h in owned]),
             np.concatenate(owned) if owned else np.zeros(0, np.int64)] = True
    full = rows_of[excluded.all(1) & (num_targets[rows_of] > 0)]
    if len(full):  # checked once here, so drawing a round's negatives needs no check on the device
        raise UserError(f"user {full[0]} (internal id) has interacted with every item: no training negative "
                        f"can be drawn for it")
    row_index = None
    if held is not None:
        row_index = np.full(n_users, -1, dtype=np.int64)
        row_index[rows_of] = np.arange(len(rows_of))
    targets = stack(targets)
    return TrainingWindows(stack(inputs), targets, stack(mem_rows),
                           np.concatenate([[0], np.cumsum(window_counts)]), history, num_targets,
                           n_items, targets.numpy(), np.array(lengths, dtype=np.int64), distinct,
                           torch.from_numpy(excluded), row_index)
