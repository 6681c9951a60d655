"""RecBole's SequentialDataset, plus each user's full time-ordered sequence.

Every sample RecBole builds (train prefix, validation or test target) carries `mem_row`: the row of
its target in the full-sequence table. The memory, computed once over that table, is then looked
up for any sample by that row, whatever RecBole's split or truncation did to the item list.
"""
from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource, FeatureType

from ..model.ur4rec_moe import MEM_ROW


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
