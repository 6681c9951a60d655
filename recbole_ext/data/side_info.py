"""What the model reads besides the interactions: frozen item features and the per-user memory.

Built here, from a dataset and the feature files it is given, for every way a model is made: the
stage pipeline and a stock RecBole script (through `UR4RecDataset.side_info`) both call
`build_side_info`, so features are aligned and the memory is built the same way for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .features import load_item_features, read_item_tokens
from .memory import MemoryConfig, build_memory


@dataclass
class SideInfo:
    """Frozen per-item features and the per-user memory table, aligned to internal item ids."""

    text: torch.Tensor             # [n_items, text_dim]
    text_available: torch.Tensor   # [n_items] bool
    image: torch.Tensor            # [n_items, image_dim]
    image_available: torch.Tensor  # [n_items] bool
    memory: torch.Tensor           # [rows, K] item ids, 0 = empty slot

    @classmethod
    def empty(cls, n_items: int, text_dim: int, image_dim: int) -> "SideInfo":
        no = torch.zeros(n_items, dtype=torch.bool)
        return cls(torch.zeros(n_items, text_dim), no, torch.zeros(n_items, image_dim), no.clone(),
                   torch.zeros(1, 0, dtype=torch.long))


def build_side_info(dataset, text_features: str | None, image_features: str | None, text_dim: int,
                    image_dim: int, memory: MemoryConfig | None) -> SideInfo:
    """Features of `dataset`'s items from the given `.npz` files (None: that modality is absent) and,
    when `memory` is given, every user's memory at every position of their sequence.

    `dataset` is a `UR4RecDataset` (its full time-ordered sequences index the memory table).
    """
    item_tokens = list(dataset.field2id_token[dataset.iid_field])
    side = SideInfo.empty(len(item_tokens), text_dim, image_dim)
    known = read_item_tokens(Path(dataset.dataset_path) / f"{dataset.dataset_name}.item")
    if text_features:
        side.text, side.text_available = load_item_features(text_features, item_tokens, text_dim, known)
    if image_features:
        side.image, side.image_available = load_item_features(image_features, item_tokens, image_dim, known)
    if memory is not None:
        side.memory = memory_table(side, dataset.sequence_offsets, dataset.sequence_items, memory)
    return side


def memory_table(side: SideInfo, offsets, items, memory: MemoryConfig) -> torch.Tensor:
    """Every user's memory at every position of their sequence (`items[offsets[u]:offsets[u + 1]]`),
    with the similarities of `side`'s available features (all of them, each modality unit-normed)."""
    parts = [torch.nn.functional.normalize(f, dim=1) for f, a in
             ((side.image, side.image_available), (side.text, side.text_available)) if a.any()]
    features = torch.cat(parts, dim=1) if parts else torch.zeros(len(side.text), 1)
    return torch.from_numpy(build_memory(offsets, items, features.numpy(), memory))
