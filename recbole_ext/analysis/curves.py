"""Validation accuracy against what a run spent: passes over the users' data (client participations
for a federated run, epochs for a centralized one) and wall time, for several runs on one figure.

    python run.py curves RUN_DIR [RUN_DIR ...] --out F.png [--json F.json] [--metric ndcg@10]
                         [--record F.json[#RUN] ...]

`--record` adds curves from a committed curves record (all of them, or the one labelled RUN), so new
runs are drawn beside runs whose folders are gone.

This is how federated recipes are compared with each other and with their centralized twin, and
what a federated run costs in communication: every pass is one upload per user. The wall time is
the sum of the metrics lines' `seconds` (training and validation), so it counts what the run did,
not the time it waited while stopped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from .plotting import pyplot
from .results import load_runs, note


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run.py curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    parser.add_argument("--out", required=True, help="the figure, e.g. docs/results/federation-gap.png")
    parser.add_argument("--json", help="also write the curves as records (run, passes, seconds, value)")
    parser.add_argument("--metric", default="ndcg@10", choices=[f"{m}@{k}" for m in ("hit", "ndcg", "mrr") for k in (5, 10, 20)])
    parser.add_argument("--protocol", default="full", choices=("full", "uni100"))
    parser.add_argument("--record", action="append", default=[], metavar="F.json[#RUN]",
                        help="also the curves of a curves record written by --json (or its run RUN)")
    args = parser.parse_args(argv)
    if not args.run_dirs and not args.record:
        parser.error("give at least one RUN_DIR or --record")
    metric = f"{args.protocol} {args.metric}"
    curves = [c for spec in args.record for c in recorded(spec, metric)]
    if args.run_dirs:
        curves += [curve(run, args.metric, args.protocol) for run in load_runs(args.run_dirs, allow_unfinished=True)]
    plot(curves, Path(args.out), f"validation {args.protocol} {args.metric}")
    if args.json:
        Path(args.json).write_text(json.dumps(curves, indent=1) + "\n")
        note(f"-> {args.json}")
    print(table(curves))


def curve(run, metric: str, protocol: str) -> dict:
    """A run's validated units: {unit, passes, seconds (cumulative), value, and for a federated run
    that round's update_abs}, and its best point."""
    lines = run.metrics
    if not lines:
        raise UserError(f"{run.path}: no metrics.jsonl lines")
    if "passes" not in lines[0]:
        raise UserError(f"{run.path}: its metrics.jsonl was written before metrics lines carried `passes`; "
                        f"rerun it to compare it by participations")
    unit = "round" if "round" in lines[0] else "epoch"
    points, elapsed = [], 0.0
    for line in lines:
        elapsed += line["seconds"]
        if "valid" in line:
            point = {unit: line[unit], "passes": line["passes"], "seconds": round(elapsed, 1),
                     "value": line["valid"][protocol][metric]}
            if "update_abs" in line:  # the server's |Delta| quantiles: the scale server_tau is set against
                point["update_abs"] = line["update_abs"]
            points.append(point)
    if not points:
        raise UserError(f"{run.path}: no validated {unit} yet")
    fed = run.config.get("federated") or {}
    setting = ({k: fed.get(k) for k in ("clients_per_round", "server_optimizer", "server_lr", "server_tau",
                                         "server_beta2", "local_epochs")}
               | {"schedule": (fed.get("schedule") or {}).get("kind")} if run.trainer == "federated" else {})
    return {"run": run.label, "trainer": run.trainer, "setting": setting, "metric": f"{protocol} {metric}",
            "best": max(points, key=lambda p: p["value"]), "points": points}


def recorded(spec: str, metric: str) -> list[dict]:
    """The curves of a record `F.json`, or its one curve labelled RUN for `F.json#RUN`; each must
    be of `metric`, so one figure never mixes two metrics."""
    path, _, label = spec.partition("#")
    try:
        curves = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--record {path}: not a readable curves record ({exc})") from None
    if not isinstance(curves, list) or not all(isinstance(c, dict) and "points" in c for c in curves):
        raise UserError(f"--record {path}: not a curves record (run.py curves --json writes one)")
    if label:
        curves = [c for c in curves if c["run"] == label]
        if not curves:
            raise UserError(f"--record {spec}: no run {label!r} in {path}")
    for c in curves:
        if c["metric"] != metric:
            raise UserError(f"--record {spec}: run {c['run']!r} is {c['metric']}, not {metric}")
    return curves


def plot(curves: list[dict], path: Path, ylabel: str) -> None:
    plt = pyplot()
    fig, (by_pass, by_time) = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for i, c in enumerate(curves):
        style = {"color": f"C{i % 10}", "marker": ".", "label": c["run"],
                 "linestyle": "--" if c["trainer"] == "centralized" else "-"}
        by_pass.plot([p["passes"] for p in c["points"]], [p["value"] for p in c["points"]], **style)
        by_time.plot([p["seconds"] / 60 for p in c["points"]], [p["value"] for p in c["points"]], **style)
    by_pass.set_xlabel("passes over the users (federated: client participations / users; centralized: epochs)")
    by_time.set_xlabel("wall time, minutes (training and validation)")
    by_pass.set_ylabel(ylabel)
    by_pass.legend(loc="lower right", fontsize=8)
    for ax in (by_pass, by_time):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    note(f"-> {path}")


def table(curves: list[dict]) -> str:
    rows = ["| run | trainer | best value | at passes | at minutes | last passes | last value |",
            "|---|---|---|---|---|---|---|"]
    for c in curves:
        best, last = c["best"], c["points"][-1]
        rows.append(f"| {c['run']} | {c['trainer']} | {best['value']:.4f} | {best['passes']:.2f} | "
                    f"{best['seconds'] / 60:.1f} | {last['passes']:.2f} | {last['value']:.4f} |")
    return "\n".join(rows)
