"""Evaluation on both protocols from one full-ranking pass, scored by RecBole's own metric code.

Full ranking is RecBole's full-sort evaluation (same batches, same masking). The sampled protocol
(`uni100`: the positive plus N negatives drawn uniformly from items the user never interacted with,
in any split: the SASRec paper's protocol, not RecBole's, whose sampler excludes only the target)
gathers its candidates' columns from the same full scores instead of calling `predict` once per
candidate as stock RecBole does; the negatives are drawn once, seeded, and reused every round.

Every pass also keeps each evaluated user's metrics, from the `metric_info` of RecBole's own metric
classes (whose mean over users is the Evaluator's number), and reports them per slice: by the
target item's number of training interactions (fixed bins) and by the user's training-history
length (quantiles over the evaluated users). The slices partition the users, so the user-weighted
mean of a slice metric is the overall one.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from recbole.evaluator import Collector, Evaluator

from .errors import UserError
from .local.negatives import sample_negatives
from .runs import atomic_write

PROTOCOLS = ("full", "uni100")
SAMPLED_NEGATIVES = 100
ITEM_COUNT_BINS = (1, 5, 10, 50)  # eval.item_count_bins' default: lower edges of the bins after 0
HISTORY_QUANTILES = 4


def training_counts(dataset, held_out) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_items], [n_users]) int64: each item's and each user's interactions in the training split.
    Leave-one-out holds out each user's last interactions, the targets of the `held_out` datasets
    (RecBole's validation and test splits); all the others are training interactions."""
    items = torch.bincount(torch.from_numpy(dataset.sequence_items), minlength=dataset.item_num)
    users = torch.from_numpy(np.diff(dataset.sequence_offsets))
    for part in held_out:
        items -= torch.bincount(part.inter_feat[dataset.iid_field], minlength=dataset.item_num)
        users -= torch.bincount(part.inter_feat[dataset.uid_field], minlength=len(users))
    return items, users


def item_count_slices(counts: np.ndarray, bins) -> tuple[np.ndarray, list[str]]:
    """Each row's slice index and the slice labels, e.g. "item 0", "item 1-4", "item 50+" for the
    target's training interactions `counts`; `bins` are the lower edges after 0."""
    lower = [0, *bins]
    labels = [f"item {lo}+" if i == len(lower) - 1 else f"item {lo}" if lower[i + 1] - 1 == lo
              else f"item {lo}-{lower[i + 1] - 1}" for i, lo in enumerate(lower)]
    return np.searchsorted(lower, counts, side="right") - 1, labels


def item_count_edges(text: str) -> tuple[int, ...]:
    """The lower edges after 0 that `--item-count-bins` gives as text, e.g. "1,5,10,50"."""
    try:
        edges = tuple(int(e) for e in text.split(","))
    except ValueError:
        edges = ()
    if not edges or edges[0] < 1 or any(x >= y for x, y in zip(edges, edges[1:])):
        raise UserError(f"--item-count-bins {text!r}: give increasing whole numbers of at least 1, "
                        f"separated by commas, e.g. 10 or 1,5,10,50")
    return edges


def history_slices(history: np.ndarray, quantiles: int) -> tuple[np.ndarray, list[str]]:
    """Each row's slice index and the labels of `quantiles` slices of the users' training-history
    lengths, edges at quantiles over these rows (lengths that occur, so no slice is empty; ties
    can merge slices), labelled with the range of lengths they hold, e.g. "hist 5-6"."""
    if len(history) == 0:
        return np.zeros(0, np.int64), []
    edges = np.quantile(history, np.arange(1, quantiles) / quantiles, method="higher")
    lower = np.unique(np.concatenate([[history.min()], edges])).astype(np.int64)
    upper = [*(lower[1:] - 1), int(history.max())]
    labels = [f"hist {lo}" if lo == hi else f"hist {lo}-{hi}" for lo, hi in zip(lower, upper)]
    return np.searchsorted(lower, history, side="right") - 1, labels


@dataclass
class UserMetrics:
    """One pass over a split: RecBole's numbers and, row by row, each evaluated user's."""

    metrics: dict          # protocol -> metric -> value, from RecBole's Evaluator
    users: np.ndarray      # [n] internal user ids
    targets: np.ndarray    # [n] internal ids of their target items
    item_counts: np.ndarray  # [n] training interactions of the target item
    history: np.ndarray    # [n] the user's training interactions
    values: dict           # protocol -> [n, len(names)] float per-user metrics
    names: list            # metric names, the columns of `values`
    item_count_bins: tuple
    history_quantiles: int

    def slicings(self) -> list[tuple[np.ndarray, list[str]]]:
        return [item_count_slices(self.item_counts, self.item_count_bins),
                history_slices(self.history, self.history_quantiles)]

    def slices(self) -> dict:
        """protocol -> slice label -> {"users": n, "metrics": {metric: mean}}; empty slices left out."""
        out = {p: {} for p in self.values}
        for index, labels in self.slicings():
            for i, label in enumerate(labels):
                rows = index == i
                if not rows.any():
                    continue
                for p, values in self.values.items():
                    means = values[rows].astype(np.float64).mean(axis=0)
                    out[p][label] = {"users": int(rows.sum()),
                                     "metrics": {m: float(v) for m, v in zip(self.names, means)}}
        return out

    def save(self, path: Path) -> None:
        """A compact .npz (docs/EVALUATION.md: per-user values), written whole or not at all."""
        arrays = {"users": self.users, "targets": self.targets, "item_counts": self.item_counts,
                  "history": self.history, "metrics": np.array(self.names),
                  "item_count_bins": np.array(self.item_count_bins, np.int64),
                  "history_quantiles": np.array(self.history_quantiles),
                  **{p: v.astype(np.float32) for p, v in self.values.items()}}

        def write(tmp):
            with open(tmp, "wb") as f:  # np.savez given a name would append .npz to the .tmp name
                np.savez_compressed(f, **arrays)
        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: Path) -> "UserMetrics":
        """A saved file; its `metrics` are the means of the per-user values (unrounded)."""
        try:
            with np.load(path) as f:
                names = [str(n) for n in f["metrics"]]
                values = {p: f[p] for p in PROTOCOLS}
                return cls({p: {n: float(v) for n, v in zip(names, values[p].astype(np.float64).mean(0))}
                            for p in PROTOCOLS}, f["users"], f["targets"], f["item_counts"], f["history"],
                           values, names, tuple(int(b) for b in f["item_count_bins"]),
                           int(f["history_quantiles"]))
        except (OSError, KeyError, ValueError) as err:
            raise UserError(f"{path}: not a per-user metrics file ({type(err).__name__}: {err})") from None


SAMPLE_SEED = 0  # not the run's seed: runs of every seed and stage on one dataset score the same users


def user_sample(dataset, evaluated, size: int) -> torch.Tensor:
    """A bool mask over internal user ids: `size` of the users `evaluated` (a split) holds, drawn without
    replacement by SAMPLE_SEED (all of them when there are fewer)."""
    users = torch.unique(evaluated.inter_feat[evaluated.uid_field])  # sorted: the draw ignores row order
    order = torch.randperm(len(users), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    chosen = torch.zeros(dataset.user_num, dtype=torch.bool)
    chosen[users[order[:size]]] = True
    return chosen


def _restricted(loader, users: torch.Tensor):
    """A copy of a full-sort evaluation loader over the rows of the users marked in `users`."""
    from recbole.data.dataloader import FullSortEvalDataLoader

    dataset = loader.dataset
    part = dataset.copy(dataset.inter_feat[users[dataset.inter_feat[dataset.uid_field]]])
    return FullSortEvalDataLoader(loader.config, part, loader._sampler, shuffle=False)


def per_user_values(evaluator: Evaluator, struct) -> tuple[list[str], np.ndarray]:
    """Metric names and the [n_users, len(names)] values RecBole's metric classes compute for every
    user before averaging them."""
    names, columns = [], []
    for name, metric in evaluator.metric_class.items():
        pos_index, pos_len = metric.used_info(struct)
        takes_length = "pos_len" in inspect.signature(metric.metric_info).parameters
        values = metric.metric_info(pos_index, pos_len) if takes_length else metric.metric_info(pos_index)
        for k in metric.topk:
            names.append(f"{name}@{k}")
            columns.append(values[:, k - 1])
    return names, np.stack(columns, axis=1).astype(np.float64)


class TwoProtocolEvaluator:
    def __init__(self, recbole_config, dataset, loaders: dict, seed: int, item_count_bins=ITEM_COUNT_BINS,
                 history_quantiles: int = HISTORY_QUANTILES, sample_users: int | None = None):
        """`loaders`: {"valid": FullSortEvalDataLoader, "test": ...}; the training interactions the
        slices count are the whole sequences less the targets of these splits. `sample_users`: score
        only this many users, the same seeded sample in every run on this data (see `user_sample`)."""
        self.config = recbole_config
        self.uid_field, self.iid_field = dataset.uid_field, dataset.iid_field
        self.n_items = dataset.item_num
        self.item_count_bins, self.history_quantiles = tuple(item_count_bins), history_quantiles
        # from every user's held-out targets, before any sampling: they are not training interactions
        self.item_counts, self.history = (c.numpy() for c in training_counts(
            dataset, [loader.dataset for loader in loaders.values()]))
        if sample_users is not None:
            chosen = user_sample(dataset, next(iter(loaders.values())).dataset, sample_users)
            loaders = {split: _restricted(loader, chosen) for split, loader in loaders.items()}
        self.loaders = loaders
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

    def evaluate(self, model, split: str) -> dict:
        """{"full": {"hit@10": ...}, "uni100": {...}} for `split` ("valid" or "test")."""
        return self.evaluate_users(model, split).metrics

    @torch.no_grad()
    def evaluate_users(self, model, split: str) -> UserMetrics:
        """RecBole's numbers on both protocols for `split`, with every evaluated user's values."""
        model.eval()
        collectors = {p: Collector(self.config) for p in PROTOCOLS}
        device = next(model.parameters()).device
        negatives = self.negatives.to(device)  # drawn once on the CPU, the same on every device
        users, targets = [], []
        for interaction, history_index, positive_u, positive_i in self.loaders[split]:
            scores = model.full_sort_predict(interaction.to(device)).view(-1, self.n_items)
            scores[:, 0] = float("-inf")
            if history_index is not None:
                scores[history_index] = float("-inf")
            collectors["full"].eval_batch_collect(scores, interaction, positive_u, positive_i)
            candidates = torch.cat([interaction[self.iid_field].unsqueeze(1),
                                    negatives[interaction[self.uid_field]]], dim=1)
            rows = torch.arange(len(candidates))
            collectors["uni100"].eval_batch_collect(scores.gather(1, candidates), interaction, rows,
                                                    torch.zeros_like(rows))
            users.append(interaction[self.uid_field].cpu())
            targets.append(interaction[self.iid_field].cpu())
        metrics, values = {}, {}
        for p, collector in collectors.items():
            struct = collector.get_data_struct()
            metrics[p] = {k: float(v) for k, v in self.evaluator.evaluate(struct).items()}
            names, values[p] = per_user_values(self.evaluator, struct)
        users, targets = torch.cat(users).numpy(), torch.cat(targets).numpy()
        return UserMetrics(metrics, users, targets, self.item_counts[targets], self.history[users], values, names,
                           self.item_count_bins, self.history_quantiles)
