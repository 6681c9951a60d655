"""The per-user, time-causal memory of past items (docs/DESIGN.md §3), computed once per dataset as item ids.

Reference semantics. Each user's sequence ``x_0 .. x_{n-1}`` is walked in time order; at each
position ``t`` the retrieval for row ``t`` is written first, then ``x_t`` is inserted. So row ``t``
is a function of ``x_0 .. x_{t-1}`` and the frozen features only, and row 0 is all zeros.

Insert ``x_t``: append it to the short-term FIFO. If the FIFO now holds more than ``st_size``
items, pop its oldest item ``o`` and offer ``o`` to the long-term store (nothing happens when
``lt_size == 0``), in this order:

1. *merge by id*: ``o`` is already the id of a long-term entry -> that entry's frequency += 1 and
   ``last_seen = t``, whatever the similarity;
2. *merge by similarity*: the cosine similarity of ``o`` to some entry is >= ``merge_threshold`` ->
   the most similar entry (the earliest admitted on a tie) absorbs it the same way and keeps its id;
3. *admit*: the max cosine similarity of ``o`` to the current short-term set (the ``st_size`` items
   left after the pop; empty set -> novel) is < ``novelty_threshold`` -> a new entry
   ``(o, frequency 1, last_seen t)``. If the store then holds more than ``lt_size`` entries, the
   lowest-ranked entry is evicted; that can be the newcomer itself;
4. otherwise ``o`` is dropped.

Ranking of long-term entries at time ``t``: by utility ``log(1 + frequency) + recency_decay **
(t - last_seen)``, then by ``last_seen``, then by admission order, all descending. Retrieval takes
the top of that ranking, eviction removes its bottom (lowest utility, ties: least recently seen,
then earliest admitted).

Retrieval for row ``t`` gives ``K = st_k + lt_k`` ids: the ``st_k`` most recent short-term items,
most recent first (the FIFO holds at most ``st_size`` of them, so slots beyond that stay empty),
then the ``lt_k`` top-ranked long-term entries; empty slots are 0. The two parts are not
deduplicated: an item seen again recently can sit in both.

Similarity is the cosine on the given feature rows, computed in float32. A row of zeros (an item
without features) has similarity 0 to everything: it is always novel and only merges by id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from recbole_ext.defaults import base_defaults
from recbole_ext.errors import UserError

#: Up to this many items, one item-by-item similarity table is computed for the whole dataset
#: (8192 items -> 256 MiB); above it, only the similarities each user's walk needs, on demand.
MAX_GLOBAL_GRAM_ITEMS = 8192

_DEFAULT = base_defaults()["model"]["memory"]


@dataclass(frozen=True)
class MemoryConfig:
    """`model.memory`; yamls/base.yaml says what each setting means and holds its default."""

    st_size: int = _DEFAULT["st_size"]
    lt_size: int = _DEFAULT["lt_size"]
    st_k: int = _DEFAULT["st_k"]
    lt_k: int = _DEFAULT["lt_k"]
    novelty_threshold: float = _DEFAULT["novelty_threshold"]
    merge_threshold: float = _DEFAULT["merge_threshold"]
    recency_decay: float = _DEFAULT["recency_decay"]

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                raise UserError(f"memory.{f.name} must be a number, got {value!r}")
            if f.type == "int" and not (isinstance(value, (int, np.integer)) and value >= 0):
                raise UserError(f"memory.{f.name} must be a non-negative integer, got {value!r}")
            if f.type == "float" and not (isinstance(value, (int, float, np.number)) and not math.isnan(value)):
                raise UserError(f"memory.{f.name} must be a number, got {value!r}")
        if not 0.0 <= self.recency_decay <= 1.0:
            raise UserError(f"memory.recency_decay must lie in [0, 1], got {self.recency_decay!r}")

    @property
    def k(self) -> int:
        return self.st_k + self.lt_k


def build_memory(
    offsets: np.ndarray,
    items: np.ndarray,
    features: np.ndarray,
    cfg: MemoryConfig,
    *,
    max_global_gram_items: int = MAX_GLOBAL_GRAM_ITEMS,
) -> np.ndarray:
    """Every user's memory at every position of their sequence (module docstring: the semantics).

    ``offsets`` (int [U+1]) and ``items`` (int [N], ids >= 1) hold the users' time-ordered
    sequences as CSR: user u's is ``items[offsets[u]:offsets[u+1]]``. ``features`` is float
    [n_items, D], row 0 padding. Returns int64 [N, cfg.k]: row ``offsets[u] + t`` holds the ids in
    user u's memory just before position t, 0 = empty slot.
    """
    offsets, items, features = _checked(offsets, items, features)
    mem = np.zeros((len(items), cfg.k), dtype=np.int64)
    _fill_short_term(mem, offsets, items, cfg)
    if cfg.lt_k == 0 or cfg.lt_size == 0:
        return mem

    unit = _unit_rows(features)
    gram = unit @ unit.T if len(unit) <= max_global_gram_items else None
    longest = int(np.diff(offsets).max(initial=0))
    # Python-float tables: the per-step ranking runs on <= lt_size + 1 entries, where a numpy
    # call costs more than it saves.
    log_freq = [math.log1p(f) for f in range(longest + 1)]
    decay_pow = [cfg.recency_decay**age for age in range(longest + 1)]

    for u in range(len(offsets) - 1):
        lo, hi = int(offsets[u]), int(offsets[u + 1])
        if hi - lo <= cfg.st_size:
            continue  # the FIFO never overflows, long-term stays empty
        seq = items[lo:hi]
        if gram is not None:
            novel = _novel_when_popped(lambda a, b: gram[seq[a], seq[b]], len(seq), cfg)
            similarity = _gram_similarity(gram, seq)
        else:
            # Only the similarities the walk needs, so the cost stays linear in the sequence length.
            x = unit[seq]
            novel = _novel_when_popped(lambda a, b: np.einsum("id,id->i", x[a], x[b]), len(seq), cfg)
            similarity = _row_similarity(x)
        _walk_long_term(mem[lo:hi, cfg.st_k :], seq.tolist(), novel, similarity, cfg, log_freq, decay_pow)
    return mem


def memory_summary(mem: np.ndarray, cfg: MemoryConfig | None = None) -> dict:
    """How full the memory is: fraction of filled slots and mean filled slots per row; with
    ``cfg``, also the mean filled short-term and long-term slots."""
    filled = mem != 0
    rows = max(len(mem), 1)
    summary = {
        "rows": len(mem),
        "slots": mem.shape[1],
        "fill_fraction": float(filled.mean()) if filled.size else 0.0,
        "mean_filled": float(filled.sum()) / rows,
    }
    if cfg is not None:
        summary["mean_short_term"] = float(filled[:, : cfg.st_k].sum()) / rows
        summary["mean_long_term"] = float(filled[:, cfg.st_k :].sum()) / rows
    return summary


def _checked(offsets, items, features):
    offsets = np.asarray(offsets, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    features = np.asarray(features, dtype=np.float32)
    csr_ok = offsets.ndim == 1 and len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == len(items)
    if not csr_ok or (np.diff(offsets) < 0).any():
        raise ValueError("offsets must be a non-decreasing CSR index from 0 to len(items)")
    if features.ndim != 2:
        raise ValueError(f"features must be [n_items, D], got shape {features.shape}")
    if len(items) and (items.min() < 1 or items.max() >= len(features)):
        raise ValueError(f"item ids must lie in [1, {len(features) - 1}], got [{items.min()}, {items.max()}]")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinity")
    return offsets, items, features


def _unit_rows(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    # Zero rows stay zero, so an item without features has similarity 0 to everything.
    return np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)


def _fill_short_term(mem, offsets, items, cfg):
    position = np.arange(len(items)) - np.repeat(offsets[:-1], np.diff(offsets))
    for slot in range(min(cfg.st_k, cfg.st_size)):
        rows = np.flatnonzero(position > slot)
        mem[rows, slot] = items[rows - 1 - slot]


def _novel_when_popped(pair_similarity, n, cfg) -> list:
    """novel[j]: whether x_j, popped when x_{j + st_size} arrives, passes the novelty test.

    The short-term set at that moment is x_{j+1} .. x_{j+st_size}, whatever the long-term store
    holds, so the test is decided for all pops at once. ``pair_similarity(a, b)`` gives the
    cosines of x_a and x_b for two equally long position arrays."""
    popped = np.arange(n - cfg.st_size)
    most_similar = np.full(len(popped), -np.inf, dtype=np.float32)  # empty short-term set: novel
    for lag in range(1, cfg.st_size + 1):
        np.maximum(most_similar, pair_similarity(popped, popped + lag), out=most_similar)
    return (most_similar < cfg.novelty_threshold).tolist()


def _gram_similarity(gram, seq):
    def similarity(j, entry_ids, entry_positions):
        return gram[seq[j]].take(entry_ids)

    return similarity


def _row_similarity(x):
    def similarity(j, entry_ids, entry_positions):
        return x.take(entry_positions, axis=0) @ x[j]

    return similarity


def _walk_long_term(out, seq, novel, similarity, cfg, log_freq, decay_pow):
    """Walks one user's sequence, writing the long-term slots of each row into ``out`` [n, lt_k].

    ``similarity(j, entry_ids, entry_positions)`` gives the cosines of x_j to the long-term
    entries, given as item ids and as the positions in ``seq`` they were admitted from."""
    # Long-term entries, one per index; ``where`` is the position of the item an entry was admitted as.
    ids, where, freq, last, admitted = [], [], [], [], []
    n_admitted = 0
    ranking = []
    rows = []  # long-term slots of rows st_size.., written to ``out`` in one go
    empty = [0] * cfg.lt_k

    # Rows t <= st_size see an empty long-term store: the first pop happens when x_{st_size} arrives.
    for t in range(cfg.st_size, len(seq)):
        if ids:
            # Best first; admission order makes the keys unique, so the sort is deterministic.
            utility = [log_freq[f] + decay_pow[t - s] for f, s in zip(freq, last)]
            ranking = sorted(zip(utility, last, admitted, range(len(ids))), reverse=True)
            top = [ids[r[3]] for r in ranking[: cfg.lt_k]]
            rows.append(top + empty[len(top) :])
        else:
            rows.append(empty)

        j = t - cfg.st_size
        o = seq[j]
        hit = None
        if o in ids:
            hit = ids.index(o)
        elif ids:
            s = similarity(j, ids, where)
            best = int(s.argmax())
            if float(s[best]) >= cfg.merge_threshold:
                hit = best

        if hit is not None:
            freq[hit] += 1
            last[hit] = t
        elif novel[j]:
            newcomer = (log_freq[1] + decay_pow[0], t, n_admitted, len(ids))
            ids.append(o)
            where.append(j)
            freq.append(1)
            last.append(t)
            admitted.append(n_admitted)
            n_admitted += 1
            if len(ids) > cfg.lt_size:
                # Nothing merged at this step, so the ranking above still holds at time t for the old entries.
                worst = min(ranking[-1], newcomer)[3]
                for column in (ids, where, freq, last, admitted):
                    del column[worst]
    if rows:
        out[cfg.st_size :] = rows
