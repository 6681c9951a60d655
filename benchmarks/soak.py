#!/usr/bin/env python
"""Soak test: 200 rounds of tiny federated training, resident memory every 20 rounds.

    python benchmarks/soak.py [--rounds 200] [--out docs/soak-cpu.json]

Passes when resident memory after round 20 never grows more than 10% above its round-20 value
(the first rounds allocate optimizer state, caches and allocator pools once).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from recbole_ext import compat  # noqa: E402,F401
from recbole_ext.config import load_config  # noqa: E402
from recbole_ext.pipeline import Stage  # noqa: E402
from recbole_ext.runs import machine_info  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "docs" / "soak-cpu.json"))
    args = parser.parse_args()
    import recbole
    data = os.path.join(os.path.dirname(recbole.__file__), "dataset_example")
    process = psutil.Process()
    samples = []

    def measure(record):
        if record["round"] % args.every == 0:
            samples.append({"round": record["round"], "rss_mib": round(process.memory_info().rss / 2 ** 20, 1)})
            print(samples[-1], flush=True)

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(ROOT / "yamls" / "smoke.yaml", [
            f"data.path={data}", f"run_dir={run_dir}", f"federated.rounds={args.rounds}",
            f"eval.every={args.every}", f"eval.patience={args.rounds}", f"state_every={args.every}"])
        Stage(cfg, "soak").run(show_progress=False, callback_fn=measure)
    base = next(s["rss_mib"] for s in samples if s["round"] >= args.every)
    growth = max(s["rss_mib"] for s in samples if s["round"] >= args.every) / base - 1
    result = {"benchmark": "soak", "rounds": args.rounds, "samples": samples,
              "growth_after_first_sample": round(growth, 4), "passed": growth <= 0.10,
              "machine": machine_info()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"growth after round {args.every}: {growth:+.1%} -> {'pass' if result['passed'] else 'FAIL'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
