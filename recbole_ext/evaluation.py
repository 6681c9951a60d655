"""Evaluation on both protocols from one full-ranking pass, scored by RecBole's own metric code.

Full ranking is RecBole's full-sort evaluation (same batches, same masking). The sampled protocol
(`uni100`: the positive plus N negatives drawn uniformly from items the user never interacted with,
in any split: the SASRec paper's protocol, not RecBole's, whose sampler excludes only the target)
gathers its candidates' columns from the same full scores instead of calling `predict` once per
candidate as stock RecBole does; the negatives are drawn once, seeded, and reused every round.
"""
from __future__ import annotations

import torch
from recbole.evaluator import Collector, Evaluator

from .federated.negatives import sample_negatives

PROTOCOLS = ("full", "uni100")
SAMPLED_NEGATIVES = 100


class TwoProtocolEvaluator:
    def __init__(self, recbole_config, dataset, loaders: dict, seed: int):
        self.config = recbole_config
        self.loaders = loaders  # {"valid": FullSortEvalDataLoader, "test": ...}
        self.uid_field, self.iid_field = dataset.uid_field, dataset.iid_field
        self.n_items = dataset.item_num
        excluded = torch.zeros(dataset.user_num, self.n_items, dtype=torch.bool)
        excluded[:, 0] = True
        users = torch.repeat_interleave(torch.arange(dataset.user_num),
                                        torch.from_numpy(dataset.sequence_offsets).diff())
        excluded[users, torch.from_numpy(dataset.sequence_items)] = True
        # Users without interactions never reach evaluation; give them a harmless allowed item.
        excluded[excluded.all(1), 0] = False
        generator = torch.Generator().manual_seed(seed)
        self.negatives = sample_negatives(excluded, torch.arange(dataset.user_num), SAMPLED_NEGATIVES,
                                          generator)
        self.evaluator = Evaluator(recbole_config)

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict:
        """{"full": {"hit@10": ...}, "uni100": {...}} for `split` ("valid" or "test")."""
        model.eval()
        collectors = {p: Collector(self.config) for p in PROTOCOLS}
        device = next(model.parameters()).device
        for interaction, history_index, positive_u, positive_i in self.loaders[split]:
            scores = model.full_sort_predict(interaction.to(device)).view(-1, self.n_items)
            scores[:, 0] = float("-inf")
            if history_index is not None:
                scores[history_index] = float("-inf")
            collectors["full"].eval_batch_collect(scores, interaction, positive_u, positive_i)
            candidates = torch.cat([interaction[self.iid_field].unsqueeze(1),
                                    self.negatives[interaction[self.uid_field]]], dim=1).to(device)
            rows = torch.arange(len(candidates))
            collectors["uni100"].eval_batch_collect(scores.gather(1, candidates), interaction, rows,
                                                    torch.zeros_like(rows))
        return {p: {k: float(v) for k, v in self.evaluator.evaluate(c.get_data_struct()).items()}
                for p, c in collectors.items()}
