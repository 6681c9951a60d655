"""The per-user memory (docs/DESIGN.md §3): time-causal, deterministic, and exactly the documented rules."""

import math
import warnings

import numpy as np
import pytest

from recbole_ext.data.memory import MemoryConfig, build_memory, memory_summary
from recbole_ext.errors import UserError


def csr(sequences):
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    items = np.array([i for s in sequences for i in s], dtype=np.int64)
    return offsets, items


def random_sequences(rng, n_users, n_items, max_len):
    # Lengths 0 and 1 included; a small item pool forces repeats.
    return [rng.integers(1, n_items + 1, rng.integers(0, max_len + 1)).tolist() for _ in range(n_users)]


def clustered_features(rng, n_items, n_clusters=5, dim=32):
    """Items in one cluster are 0.99-similar (merge, not novel); clusters are orthogonal; some rows are zero."""
    feats = np.zeros((n_items + 1, dim), dtype=np.float32)
    for i in range(1, n_items + 1):
        c = rng.integers(n_clusters)
        feats[i, c] = 1.0
        feats[i, n_clusters + rng.integers(dim - n_clusters)] = 0.1
    feats[rng.choice(np.arange(1, n_items + 1), n_items // 6, replace=False)] = 0.0
    return feats


def reference_memory(seq, features, cfg):
    """The module docstring's rules, written as plainly as possible (slow)."""
    norms = np.linalg.norm(features.astype(np.float64), axis=1, keepdims=True)
    unit = np.divide(features, norms, out=np.zeros(features.shape), where=norms > 0)
    fifo, store, n_admitted, rows = [], [], 0, []

    def key(entry, t):
        return (math.log1p(entry["freq"]) + cfg.recency_decay ** (t - entry["last"]), entry["last"], entry["adm"])

    def pad(ids, n):
        return (ids + [0] * n)[:n]

    for t, x in enumerate(seq):
        ranked = sorted(store, key=lambda e: key(e, t), reverse=True)
        rows.append(pad(fifo[::-1][: cfg.st_k], cfg.st_k) + pad([e["id"] for e in ranked][: cfg.lt_k], cfg.lt_k))
        fifo.append(x)
        if len(fifo) <= cfg.st_size:
            continue
        o = fifo.pop(0)
        if cfg.lt_size == 0:
            continue
        sims = [float(unit[o] @ unit[e["id"]]) for e in store]
        same = [e for e in store if e["id"] == o]
        if same:
            target = same[0]
        elif store and max(sims) >= cfg.merge_threshold:
            target = store[int(np.argmax(sims))]
        else:
            target = None
        if target is not None:
            target["freq"] += 1
            target["last"] = t
        elif max((float(unit[o] @ unit[s]) for s in fifo), default=-np.inf) < cfg.novelty_threshold:
            store.append({"id": o, "freq": 1, "last": t, "adm": n_admitted})
            n_admitted += 1
            if len(store) > cfg.lt_size:
                store.remove(min(store, key=lambda e: key(e, t)))
    return np.array(rows, dtype=np.int64).reshape(len(seq), cfg.k)


def rows_of(mem, offsets, u):
    return mem[offsets[u] : offsets[u + 1]]


CONFIGS = [
    MemoryConfig(),
    MemoryConfig(st_size=2, lt_size=3, st_k=2, lt_k=3, recency_decay=0.5),
    MemoryConfig(st_size=0, lt_size=4, st_k=1, lt_k=2),
    MemoryConfig(st_size=3, lt_size=2, st_k=5, lt_k=4, novelty_threshold=0.5, merge_threshold=0.95),
    MemoryConfig(st_size=1, lt_size=5, st_k=1, lt_k=5, recency_decay=0.0),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_rows_never_hold_the_current_or_a_later_item(cfg):
    rng = np.random.default_rng(1)
    sequences = random_sequences(rng, n_users=40, n_items=15, max_len=40)
    sequences[:3] = [[7], [], [3, 3, 3]]
    offsets, items = csr(sequences)
    mem = build_memory(offsets, items, clustered_features(rng, 15), cfg)

    assert mem.shape == (len(items), cfg.k) and mem.dtype == np.int64
    for u, seq in enumerate(sequences):
        rows = rows_of(mem, offsets, u)
        for t, row in enumerate(rows):
            assert set(row[row != 0].tolist()) <= set(seq[:t]), (u, t)
        if seq:
            assert not rows[0].any()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_a_plain_reading_of_the_rules(cfg):
    rng = np.random.default_rng(2)
    sequences = random_sequences(rng, n_users=30, n_items=20, max_len=60)
    features = clustered_features(rng, 20)
    offsets, items = csr(sequences)
    mem = build_memory(offsets, items, features, cfg)
    for u, seq in enumerate(sequences):
        expected = reference_memory(seq, features, cfg)
        np.testing.assert_array_equal(rows_of(mem, offsets, u), expected, err_msg=f"user {u}")


def test_short_term_slots_are_the_last_items_most_recent_first():
    seq = [5, 1, 5, 2, 3, 4, 1]
    offsets, items = csr([seq])
    cfg = MemoryConfig(st_size=8, lt_size=0, st_k=3, lt_k=2)
    mem = build_memory(offsets, items, np.eye(6, dtype=np.float32), cfg)
    expected_st = [[0, 0, 0], [5, 0, 0], [1, 5, 0], [5, 1, 5], [2, 5, 1], [3, 2, 5], [4, 3, 2]]
    np.testing.assert_array_equal(mem[:, :3], expected_st)
    assert not mem[:, 3:].any()


def test_short_term_slots_beyond_the_fifo_capacity_stay_empty():
    offsets, items = csr([[1, 2, 3, 4]])
    mem = build_memory(offsets, items, np.eye(5, dtype=np.float32), MemoryConfig(st_size=2, lt_size=0, st_k=4, lt_k=0))
    np.testing.assert_array_equal(mem, [[0, 0, 0, 0], [1, 0, 0, 0], [2, 1, 0, 0], [3, 2, 0, 0]])


def test_orthogonal_items_leaving_the_fifo_are_admitted_to_long_term():
    offsets, items = csr([[1, 2, 3, 4, 5, 6]])
    cfg = MemoryConfig(st_size=2, lt_size=8, st_k=2, lt_k=8)
    mem = build_memory(offsets, items, np.eye(7, dtype=np.float32), cfg)
    # x_0 leaves the FIFO when x_2 arrives, so it is in long-term from row 3 on.
    assert not mem[:3, 2:].any()
    assert set(mem[5, 2:][mem[5, 2:] != 0].tolist()) == {1, 2, 3}


@pytest.mark.parametrize("novelty_threshold", [0.9, 1.0])  # novel means strictly below the threshold
def test_identical_items_are_never_novel_so_long_term_stays_empty(novelty_threshold):
    offsets, items = csr([[1, 2, 3, 4, 5, 6, 1, 2]])
    same = np.ones((7, 4), dtype=np.float32)  # cosine exactly 1.0
    cfg = MemoryConfig(st_size=2, lt_size=4, st_k=2, lt_k=4, novelty_threshold=novelty_threshold)
    mem = build_memory(offsets, items, same, cfg)
    assert not mem[:, 2:].any()


@pytest.mark.parametrize("merge_threshold", [0.98, 1.0])  # merging includes the threshold itself
def test_identical_items_with_an_empty_fifo_merge_into_the_first_entry(merge_threshold):
    # st_size = 0: the short-term set is empty, so the first popped item is novel; every later one
    # is 1-similar to it and merges.
    offsets, items = csr([[3, 1, 2, 4]])
    same = np.ones((5, 4), dtype=np.float32)
    cfg = MemoryConfig(st_size=0, lt_size=4, st_k=0, lt_k=4, merge_threshold=merge_threshold)
    mem = build_memory(offsets, items, same, cfg)
    np.testing.assert_array_equal(mem, [[0, 0, 0, 0], [3, 0, 0, 0], [3, 0, 0, 0], [3, 0, 0, 0]])


def test_zero_feature_items_are_always_novel_and_raise_no_warning():
    offsets, items = csr([list(range(1, 9))])
    cfg = MemoryConfig(st_size=1, lt_size=10, st_k=0, lt_k=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mem = build_memory(offsets, items, np.zeros((9, 6), dtype=np.float32), cfg)
    assert set(mem[-1][mem[-1] != 0].tolist()) == set(range(1, 7))  # all but x_6 (in the FIFO) and x_7


def test_a_repeated_item_merges_and_outlives_a_less_useful_entry():
    # st_size 1, decay 0.5, orthogonal items. Utilities at each row (log1p(freq) + 0.5 ** age):
    #   t=1: x_0=1 admitted (f1, seen 1)          t=2: row [1]
    #   t=2: x_1=2 admitted (f1, seen 2)          t=3: row [2, 1]  (0.69+0.5 > 0.69+0.25)
    #   t=3: x_2=1 again -> merge (f2, seen 3)    t=4: row [1, 2]  (1.10+0.5 > 0.69+0.25)
    #   t=4: x_3=3 admitted, store over 2 -> evict 2 (0.94 < 1.60 (1) < 1.69 (3))
    #                                             t=5: row [1, 3]  (1.10+0.25 > 0.69+0.5)
    #   t=5: x_4=4 admitted -> evict 3 (1.19 < 1.35 (1) < 1.69 (4))
    #                                             t=6: row [1, 4]  (1.10+0.125 > 0.69+0.5)
    # Without the merge, entry 1 would have been the oldest, least useful entry and evicted at t=4.
    offsets, items = csr([[1, 2, 1, 3, 4, 5, 5]])
    cfg = MemoryConfig(st_size=1, lt_size=2, st_k=0, lt_k=2, recency_decay=0.5)
    mem = build_memory(offsets, items, np.eye(6, dtype=np.float32), cfg)
    np.testing.assert_array_equal(mem, [[0, 0], [0, 0], [1, 0], [2, 1], [1, 2], [1, 3], [1, 4]])


def test_a_near_duplicate_merges_into_the_entry_and_keeps_its_id():
    features = np.eye(7, dtype=np.float32)
    features[6] = features[1] + 0.1 * features[5]  # cosine 0.995 to item 1
    offsets, items = csr([[1, 2, 6, 3, 3]])
    cfg = MemoryConfig(st_size=1, lt_size=4, st_k=0, lt_k=4, recency_decay=0.5)
    mem = build_memory(offsets, items, features, cfg)
    # Item 6 leaves the FIFO at t=3 and merges into entry 1 (f2, seen 3), which then ranks first.
    np.testing.assert_array_equal(mem[3:], [[2, 1, 0, 0], [1, 2, 0, 0]])


def test_no_slots_at_all_gives_an_empty_array():
    offsets, items = csr([[1, 2, 3], [2]])
    mem = build_memory(offsets, items, np.eye(4, dtype=np.float32), MemoryConfig(st_k=0, lt_k=0))
    assert mem.shape == (4, 0) and mem.dtype == np.int64


def test_no_long_term_store_leaves_long_term_slots_empty():
    rng = np.random.default_rng(3)
    offsets, items = csr(random_sequences(rng, 10, 12, 30))
    mem = build_memory(offsets, items, np.eye(13, dtype=np.float32), MemoryConfig(lt_size=0, lt_k=3))
    assert mem.shape == (len(items), 7) and not mem[:, 4:].any() and mem[:, :4].any()


def test_short_term_only_without_short_term_slots():
    offsets, items = csr([[1, 2, 3, 4]])
    mem = build_memory(offsets, items, np.eye(5, dtype=np.float32), MemoryConfig(st_size=1, st_k=0, lt_k=2))
    np.testing.assert_array_equal(mem, [[0, 0], [0, 0], [1, 0], [2, 1]])


def test_deterministic_and_independent_of_how_similarities_are_tabulated():
    rng = np.random.default_rng(4)
    offsets, items = csr(random_sequences(rng, 50, 30, 50))
    features = clustered_features(rng, 30)
    cfg = MemoryConfig(st_size=3, lt_size=4)
    first = build_memory(offsets, items, features, cfg)
    np.testing.assert_array_equal(first, build_memory(offsets, items, features, cfg))
    # max_global_gram_items=0: similarities computed per user on demand instead of one item-item table.
    np.testing.assert_array_equal(first, build_memory(offsets, items, features, cfg, max_global_gram_items=0))


def test_summary_counts_filled_slots():
    mem = np.array([[0, 0, 0], [5, 0, 0], [5, 4, 2]])
    summary = memory_summary(mem, MemoryConfig(st_k=2, lt_k=1))
    assert summary["fill_fraction"] == pytest.approx(4 / 9)
    assert summary["mean_filled"] == pytest.approx(4 / 3)
    assert summary["mean_short_term"] == pytest.approx(1)
    assert summary["mean_long_term"] == pytest.approx(1 / 3)
    assert memory_summary(np.zeros((0, 0), dtype=np.int64))["fill_fraction"] == 0.0


@pytest.mark.parametrize(
    "bad", [{"st_size": -1}, {"lt_k": 1.5}, {"st_k": True}, {"recency_decay": 1.5}, {"novelty_threshold": float("nan")}]
)
def test_bad_settings_are_user_errors_that_name_the_key(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        MemoryConfig(**bad)


def test_ids_outside_the_feature_table_are_rejected():
    offsets, items = csr([[1, 9]])
    with pytest.raises(ValueError, match="item ids"):
        build_memory(offsets, items, np.eye(4, dtype=np.float32), MemoryConfig())
