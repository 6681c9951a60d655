"""Tables of finished runs, read from their summary.json files."""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from ..errors import UserError

METRICS = {"hit@10": "HR@10", "ndcg@10": "NDCG@10", "mrr@10": "MRR@10"}  # table columns: heading
# Printed under every results table: sampled metrics are only comparable under the same exclusion rule.
UNI100_NOTE = ("uni100: the target against 100 negatives drawn uniformly from the items outside the user's "
               "whole sequence (the SASRec paper's protocol); RecBole's own uni100 sampler for sequential "
               "models excludes only the target, so its uni100 numbers are not these.")


def format_summary(summary: dict) -> str:
    test = summary["test"]
    best = "" if summary["best_round"] is None else f", best {summary['best_round']}"  # None: trains nothing
    lines = [f"test ({summary['name']}{best}):"]
    for protocol, values in test.items():
        lines.append(f"  {protocol:<7} " + "  ".join(f"{m} {values[m]:.4f}" for m in METRICS))
    return "\n".join(lines)


def read_summary(run_dir: str | Path) -> dict:
    """A finished run's summary.json; a run folder without one is an error naming it."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise UserError(f"{path}: no summary (did the run finish?)")
    return json.loads(path.read_text())


def record(summary: dict) -> dict:
    """What the table shows of one run, and the machine that ran it: a committable record."""
    keys = ("name", "stage", "test", "trainable_params", "wall_seconds", "machine")
    return {key: summary.get(key) for key in keys}


def table(records: list[dict]) -> str:
    head = ["run", "stage"] + [f"{p} {m}" for p in ("full", "uni100") for m in METRICS.values()]
    head += ["trainable", "wall s"]
    rows = []
    for s in records:
        stage = "-" if s["stage"] is None else str(s["stage"])  # None: a baseline
        rows.append([s["name"], stage] + [f"{s['test'][p][m]:.4f}" for p in ("full", "uni100") for m in METRICS]
                    + [f"{s['trainable_params']:,}", f"{s['wall_seconds']:.0f}"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    return "\n".join(lines + [textwrap.fill(UNI100_NOTE, width=100)])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run.py report", description="Test metrics of finished runs.")
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", metavar="FILE.json", help="also write the table's records (what README's demo "
                                                           "table is printed from)")
    args = parser.parse_args(argv)
    records = [record(read_summary(run_dir)) for run_dir in args.run_dirs]
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    print(table(records))
