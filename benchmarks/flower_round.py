#!/usr/bin/env python
"""Seconds and bytes per round of the `flower` backend against `vectorized`, on the same machine.

    python benchmarks/flower_round.py --out docs/benchmarks-flower.json
    python benchmarks/flower_round.py --table docs/benchmarks-flower.json   # its table, from the file

Each config runs as `run.py` stages, the backends taking turns: `vectorized` in one process,
`flower` on a SuperLink and `--nodes` SuperNodes that the command starts on loopback (docs/DEPLOY.md),
without and with SecAgg+ (`federated.flower.secaggplus`).
A round's time is `seconds` in metrics.jsonl, median over the rounds after the first that have no
validation; the bytes are `bytes_up` (what the clients' updates hold, every backend) and, for
`flower`, `wire_bytes` (the serialized messages to and from the nodes). Needs `make flower`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"smoke": "yamls/smoke.yaml", "demo stage 1": "yamls/demo/stage1.yaml"}
# name -> (backend, its extra settings)
BACKENDS = {"vectorized": ("vectorized", []), "flower": ("flower", []),
            "flower, SecAgg+": ("flower", ["federated.flower.secaggplus=true"])}


def table(result: dict) -> str:
    """The table docs/BENCHMARKS.md shows, from a results file."""
    lines = ["| config | clients a round | backend | s per round | MB of updates up | MB on the wire down / up |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        wire = (f"{row['wire_down_bytes'] / 1e6:.2f} / {row['wire_up_bytes'] / 1e6:.2f}"
                if row["wire_down_bytes"] is not None else "–")
        backend = row["backend"] + (f" ({row['nodes']} nodes)" if row["nodes"] else "")
        lines.append(f"| {row['config']} | {row['clients_per_round']} | {backend} | {row['seconds_per_round']:.2f} | "
                     f"{row['bytes_up'] / 1e6:.2f} | {wire} |")
    return "\n".join(lines)


def measure(config: str, name: str, rounds: int, nodes: int, folder: Path) -> dict:
    backend, sets = BACKENDS[name]
    run_dir = folder / f"{Path(config).stem}-{name.replace(', ', '-')}"
    command = [sys.executable, str(ROOT / "run.py"), "--config", config, "--set", f"run_dir={run_dir}",
               "--set", f"federated.backend={backend}", "--set", f"federated.rounds={rounds}",
               "--set", f"eval.every={rounds}", "--set", f"federated.flower.nodes={nodes}", "--quiet",
               *(x for kv in sets for x in ("--set", kv))]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [line for line in lines[1:] if "valid" not in line]
    wire = [line["wire_bytes"] for line in timed if "wire_bytes" in line]
    settings = json.loads((run_dir / "summary.json").read_text())
    return {"backend": name, "nodes": nodes if backend == "flower" else None, "rounds_timed": len(timed),
            "seconds_per_round": statistics.median(line["seconds"] for line in timed),
            "bytes_up": statistics.median(line["bytes_up"] for line in timed),
            "wire_down_bytes": statistics.median(w["down"] for w in wire) if wire else None,
            "wire_up_bytes": statistics.median(w["up"] for w in wire) if wire else None,
            "dataset": settings["dataset"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run (the first and the last are not timed)")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--note", default="", help="what else ran on the machine (recorded)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--table", metavar="FILE.json", help="print the Markdown table of a results file; measure nothing")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return

    from recbole_ext.config import load_config
    from recbole_ext.runs import machine_info

    rows = []
    with tempfile.TemporaryDirectory(prefix="flower-round-") as folder:
        for name, config in CONFIGS.items():
            clients = load_config(ROOT / config)["federated"]["clients_per_round"]
            for backend in BACKENDS:
                row = {"config": name, "file": config, "clients_per_round": clients,
                       **measure(config, backend, args.rounds, args.nodes, Path(folder))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"rounds": args.rounds, "machine": machine_info(), "threads": "1 per process (OMP_NUM_THREADS=1)",
              "flwr": __import__("flwr").__version__, "note": args.note, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
