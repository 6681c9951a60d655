#!/usr/bin/env python
"""The GPU check's reports (benchmarks/gpu_round.sh), each from finished or cut-short run folders.

    python benchmarks/gpu_report.py compare CPU_RUN GPU_RUN --out part.json [--tolerance 1e-3]
    python benchmarks/gpu_report.py timing RUN --wall SECONDS --planned-rounds 600 --out part.json
    python benchmarks/gpu_report.py merge PARTS_DIR --into docs/benchmarks-gpu.json

`compare`: the validation metrics of two runs of one config on two devices, round by round.
`timing`: seconds per training round and per validation of a stage run (from its metrics.jsonl;
a run cut by a time limit reports the rounds it finished) and the projection to its planned rounds.
`merge`: writes the results file: the round benchmark's file at the top level (so
`federated_round.py --table` reads it), the other parts beside it, and whatever the file held
before that this check did not write, under `earlier` (labelled as measured before).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROUNDS, CPU_VS_GPU, TIMING = "rounds.json", "cpu_vs_gpu.json", "ml1m_stage1.json"
EARLIER_LABEL = ("measured before stage runs could use a GPU: the benchmark moved each stage's model to the "
                 "GPU itself; federated rounds only (docs/BENCHMARKS.md, 'On a GPU')")


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def compare(cpu: Path, gpu: Path, tolerance: float) -> dict:
    """Every validation both runs reached: the largest absolute difference of any metric."""
    theirs = {r["round"]: r["valid"] for r in records(cpu) if "valid" in r}
    rounds = []
    for record in records(gpu):
        if "valid" not in record or record["round"] not in theirs:
            continue
        expected = theirs[record["round"]]
        worst = max(abs(record["valid"][p][m] - expected[p][m]) for p in expected for m in expected[p])
        rounds.append({"round": record["round"], "max_abs_difference": round(worst, 6),
                       "gpu": record["valid"], "cpu": expected})
    seconds = {name: _mean([r["seconds"] for r in records(run) if "valid" not in r])
               for name, run in (("cpu", cpu), ("gpu", gpu))}
    return {"kind": "cpu_vs_gpu", "tolerance": tolerance, "validations_compared": len(rounds),
            "agree": bool(rounds) and all(r["max_abs_difference"] <= tolerance for r in rounds),
            "seconds_per_training_round": seconds, "rounds": rounds}


def timing(run: Path, wall: float, planned: int, every: int) -> dict:
    """Medians, so a first round's warm-up does not count; validation = a validation round less a
    training round."""
    done = records(run)
    train = [r["seconds"] for r in done if "valid" not in r]
    valid = [r["seconds"] for r in done if "valid" in r]
    per_round = statistics.median(train) if train else None
    per_validation = statistics.median(valid) - per_round if valid and per_round is not None else None
    projected = None if per_validation is None else round(planned * per_round + planned // every * per_validation, 1)
    best = max((r for r in done if "valid" in r), key=lambda r: r["valid"]["full"]["ndcg@10"], default=None)
    return {"kind": "stage_run_timing", "run": str(run), "rounds_done": len(done), "planned_rounds": planned,
            "validation_every": every, "wall_seconds": round(wall, 1),
            "setup_seconds": round(wall - sum(r["seconds"] for r in done), 1),
            "seconds_per_round": None if per_round is None else round(per_round, 4),
            "seconds_per_validation": None if per_validation is None else round(per_validation, 4),
            "projected_training_seconds": projected,
            "best_valid_so_far": None if best is None else {"round": best["round"], "valid": best["valid"]}}


def merge(parts: Path, into: Path) -> dict:
    before = json.loads(into.read_text()) if into.is_file() else {}
    ours = {"cpu_vs_gpu", "ml1m_stage1", "earlier", "check"}
    earlier = before.get("earlier") or ({"label": EARLIER_LABEL, **before} if before else None)
    rounds = json.loads((parts / ROUNDS).read_text()) if (parts / ROUNDS).is_file() else {}
    out = {key: value for key, value in rounds.items() if key not in ours}
    for key, name in (("cpu_vs_gpu", CPU_VS_GPU), ("ml1m_stage1", TIMING)):
        if (parts / name).is_file():
            out[key] = json.loads((parts / name).read_text())
    check = parts / "check.json"
    if check.is_file():
        out["check"] = json.loads(check.read_text())
    if earlier is not None:
        out["earlier"] = earlier
    into.parent.mkdir(parents=True, exist_ok=True)
    into.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _mean(values):
    return round(sum(values) / len(values), 4) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare")
    c.add_argument("cpu", type=Path)
    c.add_argument("gpu", type=Path)
    c.add_argument("--tolerance", type=float, default=1e-3)
    c.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("timing")
    t.add_argument("run", type=Path)
    t.add_argument("--wall", type=float, required=True, help="seconds the run's command took, setup included")
    t.add_argument("--planned-rounds", type=int, required=True)
    t.add_argument("--every", type=int, default=10, help="validation every N rounds")
    t.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("merge")
    m.add_argument("parts", type=Path)
    m.add_argument("--into", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "merge":
        merge(args.parts, args.into)
        return 0
    if args.command == "compare":
        result = compare(args.cpu, args.gpu, args.tolerance)
    else:
        result = timing(args.run, args.wall, args.planned_rounds, args.every)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    return 0 if result.get("agree", True) else 1


if __name__ == "__main__":
    sys.exit(main())
