"""RecBole's SequentialDataset, plus each user's full time-ordered sequence and the model's side info.

Every sample RecBole builds (train prefix, validation or test target) carries `mem_row`: the row of
its target in the full-sequence table. The memory, computed once over that table, is then looked
up for any sample by that row, whatever RecBole's split or truncation did to the item list.

Importing `recbole_ext.model.ur4rec_moe` registers this class as RecBole's `UR4RecMoEDataset`, so
RecBole's own `create_dataset(config)` builds it for that model.
"""
from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource, FeatureType

from ..errors import UserError
from .memory import MemoryConfig
from .side_info import SideInfo, build_side_info

MEM_ROW = "mem_row"  # interaction field: the row of the memory table for this target position


class UR4RecDataset(SequentialDataset):
    def __init__(self, config, max_users: int | None = None):
        self._max_users = max_users
        super().__init__(config)

    def data_augmentation(self):
        # RecBole sorts the same way (stably) inside data_augmentation, so rows keep their order.
        self.sort(by=[self.uid_field, self.time_field], ascending=True)
        if self._max_users is not None:
            self.inter_feat = self.inter_feat[self.inter_feat[self.uid_field] <= self._max_users]
        users = self.inter_feat[self.uid_field].numpy()
        self.sequence_items = self.inter_feat[self.iid_field].numpy().astype(np.int64)
        counts = np.bincount(users, minlength=self.user_num)
        self.sequence_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.set_field_property(MEM_ROW, FeatureType.TOKEN, FeatureSource.INTERACTION, 1)
        self.inter_feat.update(Interaction({MEM_ROW: torch.arange(len(self.inter_feat))}))
        super().data_augmentation()

    def side_info(self) -> SideInfo:
        """The features and memory the config asks for: `text_features` / `image_features` (`.npz`
        paths, None = absent) of widths `text_dim` / `image_dim`, and, with `experts` on, the memory
        with the `memory` settings (keys of `MemoryConfig`; missing ones take its defaults)."""
        config = self.config
        memory = None
        if config["experts"]:
            settings = config["memory"] or {}
            unknown = sorted(set(settings) - set(MemoryConfig.__dataclass_fields__))
            if unknown:
                raise UserError(f"memory: unknown key(s) {unknown}; the memory settings are "
                                f"{sorted(MemoryConfig.__dataclass_fields__)}")
            memory = MemoryConfig(**settings)
        return build_side_info(self, config["text_features"], config["image_features"], config["text_dim"],
                               config["image_dim"], memory)
