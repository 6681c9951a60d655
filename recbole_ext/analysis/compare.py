"""`run.py compare RUN_A RUN_B`: two runs compared user by user on the users both evaluated.

Each run folder's per-user values (`per_user_<split>.npz`, written at the end of a run from its best
checkpoint) give, overall and in every slice, the mean of each run, the mean difference B - A, a
paired bootstrap 95% interval of that difference (users resampled with replacement, the same
resamples for every metric of a slice) and the Wilcoxon signed-rank p-value of the paired
differences.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..evaluation import PROTOCOLS, UserMetrics, item_count_edges
from ..runs import PER_USER
from .report import METRICS

COMPARED = ("hit@10", "ndcg@10")
_CHUNK = 256  # bootstrap resamples drawn at once: bounds memory at _CHUNK x users counts


def load(run_dir: str | Path, split: str) -> UserMetrics:
    path = Path(run_dir) / PER_USER.format(split=split)
    if not path.is_file():
        if not Path(run_dir).is_dir():
            raise UserError(f"{run_dir}: not a run folder")
        raise UserError(f"{run_dir}: no {path.name}: the run predates per-user values or is unfinished "
                        f"(they are written when a run ends)")
    return UserMetrics.load(path)


def paired(a: UserMetrics, b: UserMetrics, run_a, run_b, common_users: bool = False
           ) -> tuple[UserMetrics, UserMetrics]:
    """Both runs' values in one user order; a UserError naming both folders unless they evaluated the
    same users (or, with `common_users`, on the users both evaluated) with the same targets and slices."""
    where = f"{run_a} and {run_b}"
    common = np.intersect1d(a.users, b.users)
    if common_users and len(common):
        a, b = (_rows(r, np.isin(r.users, common)) for r in (a, b))
    if set(a.users.tolist()) != set(b.users.tolist()):
        raise UserError(f"{where} did not evaluate the same users ({len(a.users)} and {len(b.users)} users, "
                        f"{len(common)} in common): compare runs of one dataset and split, or give "
                        f"--common-users when one scored a sample (eval.sample_users)")
    a, b = (_rows(r, np.argsort(r.users, kind="stable")) for r in (a, b))
    differ = np.flatnonzero(a.targets != b.targets)
    if len(differ):
        u = differ[0]
        raise UserError(f"{where} evaluated other targets for {len(differ)} of {len(a.users)} users (user "
                        f"{a.users[u]}: item {a.targets[u]} and item {b.targets[u]}): compare runs of one split")
    for what, x, y in (("training interactions of the targets", a.item_counts, b.item_counts),
                       ("training-history lengths", a.history, b.history),
                       ("item count bins", a.item_count_bins, b.item_count_bins),
                       ("history quantiles", a.history_quantiles, b.history_quantiles)):
        if not np.array_equal(x, y):
            raise UserError(f"{where} differ in their {what}, so their slices differ: compare runs of one "
                            f"dataset and eval settings")
    if a.names != b.names:
        raise UserError(f"{where} hold different metrics ({', '.join(a.names)} and {', '.join(b.names)})")
    return a, b


def _rows(r: UserMetrics, index: np.ndarray) -> UserMetrics:
    """`r` restricted to (and ordered by) `index`, a boolean mask or positions over its rows."""
    return dataclasses.replace(r, users=r.users[index], targets=r.targets[index], item_counts=r.item_counts[index],
                               history=r.history[index], values={p: v[index] for p, v in r.values.items()})


def compare(a: UserMetrics, b: UserMetrics, resamples: int = 10000, seed: int = 0) -> list[dict]:
    """One row per (slice, protocol, metric): overall first, then the slices in their order."""
    from scipy.stats import wilcoxon

    groups = [("overall", np.ones(len(a.users), dtype=bool))]
    for index, labels in a.slicings():
        groups += [(label, index == i) for i, label in enumerate(labels) if (index == i).any()]
    columns = [(p, m) for p in PROTOCOLS for m in COMPARED]
    out = []
    for label, rows in groups:
        va = np.stack([a.values[p][rows, a.names.index(m)] for p, m in columns], axis=1).astype(np.float64)
        vb = np.stack([b.values[p][rows, b.names.index(m)] for p, m in columns], axis=1).astype(np.float64)
        low, high = bootstrap_interval(vb - va, resamples, seed)
        for j, (p, m) in enumerate(columns):
            d = vb[:, j] - va[:, j]
            # Wilcoxon's test drops zero differences; with none left there is no evidence of a difference.
            p_value = 1.0 if not d.any() else float(wilcoxon(d).pvalue)
            out.append({"slice": label, "users": int(rows.sum()), "protocol": p, "metric": m,
                        "mean_a": float(va[:, j].mean()), "mean_b": float(vb[:, j].mean()),
                        "difference": float(d.mean()), "ci_low": float(low[j]), "ci_high": float(high[j]),
                        "p_wilcoxon": p_value})
    return out


def bootstrap_interval(differences: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2.5th and 97.5th percentiles of the mean of `differences` [users, columns] over `resamples`
    resamples of the users with replacement (as multinomial counts, so memory stays chunk x users)."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = []
    for start in range(0, resamples, _CHUNK):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, resamples - start))
        means.append(counts @ differences / n)
    means = np.concatenate(means)
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def markdown(rows: list[dict], run_a, run_b, split: str, resamples: int) -> str:
    lines = [f"A = {run_a}", f"B = {run_b}", f"{split} split, {rows[0]['users']} users; B − A with a paired "
             f"bootstrap 95% interval ({resamples} resamples of the users) and the Wilcoxon signed-rank p-value",
             "", "| slice | users | metric | A | B | B − A | 95% CI | p |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['slice']} | {r['users']} | {r['protocol']} {METRICS[r['metric']]} | {r['mean_a']:.4f} | "
                     f"{r['mean_b']:.4f} | {r['difference']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
                     f"{r['p_wilcoxon']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="run.py compare",
        description="Compare two finished runs user by user (B − A), overall and per slice, for HR@10 and "
                    "NDCG@10 on both protocols: means, paired bootstrap 95% interval, Wilcoxon p-value.")
    parser.add_argument("run_a", metavar="RUN_A")
    parser.add_argument("run_b", metavar="RUN_B")
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--bootstrap", type=int, default=10000, metavar="N", help="resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    parser.add_argument("--item-count-bins", metavar="E,E,...",
                        help="slice the targets by these lower edges after 0 instead of the runs' own "
                             "eval.item_count_bins, e.g. 10 for fewer than 10 training interactions and the rest")
    parser.add_argument("--common-users", action="store_true",
                        help="compare on the users both runs scored (one scored a sample: eval.sample_users)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.bootstrap < 1:
        raise UserError(f"--bootstrap {args.bootstrap}: must be at least 1")
    a, b = paired(load(args.run_a, args.split), load(args.run_b, args.split), args.run_a, args.run_b,
                  args.common_users)
    if args.item_count_bins:
        bins = item_count_edges(args.item_count_bins)
        a, b = (dataclasses.replace(r, item_count_bins=bins) for r in (a, b))
    rows = compare(a, b, args.bootstrap, args.seed)
    print(markdown(rows, args.run_a, args.run_b, args.split, args.bootstrap))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"run_a": str(args.run_a), "run_b": str(args.run_b), "split": args.split,
                                   "bootstrap": args.bootstrap, "seed": args.seed, "rows": rows}, indent=2) + "\n")
