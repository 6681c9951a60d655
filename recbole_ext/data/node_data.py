"""What one SuperNode of a Flower deployment holds (docs/DEPLOY.md): the training sequences of the
users of its partition, in the run's internal ids, and the public item tables (the vocabulary and the
item features), nothing of the other users and none of anyone's validation or test items.

The server cuts a run's data into one file per partition (`run.py node-data`); a node trains from its
file alone. Ids stay the server's: RecBole renumbers users and items from the data it loads, so a node
that loaded its own users' interactions would number them differently.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..runs import atomic_write
from .memory import MemoryConfig
from .sequences import TrainingWindows, windows_from_histories
from .side_info import SideInfo, memory_table

FORMAT = 1  # bumped when the file's arrays change meaning


def partition_of(clients, partitions: int) -> np.ndarray:
    """Which node holds each user: user ids dealt round-robin over the partitions, so every node holds
    about as many users (and, users being in no particular order, as much work)."""
    return np.asarray(clients) % partitions


def partition_summary(windows: TrainingWindows, partition: int, partitions: int) -> dict:
    """What a node's training data must share with the server's for its partition: the item count,
    the partition's users and training positions, and a digest of which users hold how many, so a
    node with another dataset, another version of it or another partition is told apart before it
    trains."""
    users = windows.clients[partition_of(windows.clients, partitions) == partition]
    counts = np.ascontiguousarray(windows.num_targets[users], dtype=np.int64)
    digest = hashlib.sha256(users.astype(np.int64).tobytes() + counts.tobytes()
                            + int(windows.n_items).to_bytes(8, "little")).hexdigest()[:16]
    return {"items": int(windows.n_items), "users": int(len(users)), "positions": int(counts.sum()),
            "digest": digest}


@dataclass
class NodeData:
    partition: int
    partitions: int
    dataset: str
    n_users: int                # the run's user count (ids are the server's)
    users: np.ndarray           # [H] the held users' internal ids
    histories: list             # [H] each one's training item ids, in time order
    item_tokens: np.ndarray     # [n_items] raw item tokens in internal-id order, '[PAD]' first
    side: SideInfo              # the item features (no memory: the node builds it from its sequences)

    @property
    def n_items(self) -> int:
        return len(self.item_tokens)

    def _local_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(h) for h in self.histories])]).astype(np.int64)

    def windows(self, max_len: int) -> TrainingWindows:
        """The held users' training windows, under their server ids (the others hold none); memory
        rows index the table `side_info` builds over the held sequences."""
        history = [np.zeros(0, np.int64)] * self.n_users
        first_rows = np.zeros(self.n_users, dtype=np.int64)
        for user, seq, first in zip(self.users, self.histories, self._local_offsets()):
            history[user], first_rows[user] = seq, first
        return windows_from_histories(history, first_rows, self.n_items, max_len, held=self.users)

    def side_info(self, memory: MemoryConfig | None) -> SideInfo:
        """The item features and, when `memory` is given, the memory of the held sequences: a row of
        the memory depends only on its user's earlier items, so it equals the server's row."""
        if memory is None:
            return self.side
        items = np.concatenate(self.histories) if self.histories else np.zeros(0, np.int64)
        return replace(self.side, memory=memory_table(self.side, self._local_offsets(), items, memory))


def cut(windows: TrainingWindows, side: SideInfo, item_tokens, dataset: str, partitions: int) -> list[NodeData]:
    """The run's training data (`windows` on the host, `side`'s features) as `partitions` nodes hold it."""
    owner = partition_of(windows.clients, partitions)
    return [NodeData(p, partitions, dataset, len(windows.num_targets), windows.clients[owner == p],
                     [windows.history[u] for u in windows.clients[owner == p]], np.asarray(item_tokens, dtype=str),
                     side) for p in range(partitions)]


def write(path: str | os.PathLike, node: NodeData) -> Path:
    path = Path(path)
    meta = {"format": FORMAT, "partition": node.partition, "partitions": node.partitions,
            "dataset": node.dataset, "users": node.n_users}
    lengths = np.array([len(h) for h in node.histories], dtype=np.int64)
    arrays = {"meta": np.array(json.dumps(meta)), "users": node.users.astype(np.int64), "lengths": lengths,
              "items": np.concatenate(node.histories).astype(np.int64) if len(lengths) else np.zeros(0, np.int64),
              "item_tokens": node.item_tokens, "text": node.side.text.numpy(),
              "text_available": node.side.text_available.numpy(), "image": node.side.image.numpy(),
              "image_available": node.side.image_available.numpy()}
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary name
            np.savez(f, **arrays)

    atomic_write(path, save)
    return path


def read(path: str | os.PathLike) -> NodeData:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"node data file {path} does not exist (write it with `python run.py node-data`)")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("format") != FORMAT:
                raise UserError(f"node data file {path} is of format {meta.get('format')}, this code reads "
                                f"format {FORMAT}: write it again with `python run.py node-data`")
            users, lengths, items = f["users"], f["lengths"], f["items"]
            side = SideInfo(torch.from_numpy(f["text"]), torch.from_numpy(f["text_available"]),
                            torch.from_numpy(f["image"]), torch.from_numpy(f["image_available"]),
                            torch.zeros(1, 0, dtype=torch.long))
            tokens = f["item_tokens"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise UserError(f"node data file {path} cannot be read ({err}); write it again with "
                        f"`python run.py node-data`") from None
    if len(users) != len(lengths) or int(lengths.sum()) != len(items) or \
            (len(users) and (users.min() < 0 or users.max() >= meta["users"])):
        raise UserError(f"node data file {path} is inconsistent: {len(users)} users, {len(lengths)} "
                        f"sequence lengths summing to {int(lengths.sum())}, {len(items)} items")
    histories = np.split(items, np.cumsum(lengths)[:-1]) if len(lengths) else []
    return NodeData(int(meta["partition"]), int(meta["partitions"]), str(meta["dataset"]), int(meta["users"]),
                    users, histories, tokens, side)
