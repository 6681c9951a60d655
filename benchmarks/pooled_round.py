#!/usr/bin/env python
"""The vectorized backend's pooled round against its per-client path, on the same clients, in one process.

    python benchmarks/pooled_round.py --config yamls/amazon/stage1.yaml --out docs/benchmarks-pooled-round.json
    python benchmarks/pooled_round.py --table docs/benchmarks-pooled-round.json   # its table, from the file

With the full softmax and one unclipped local SGD step, a round's sum of client updates is one
backward pass over the clients' pooled positions (`vectorized.pooled_sum_is_exact`); otherwise each
client's gradient is formed on its own (`vmap(grad)`), which under the full softmax is a dense
[clients, items, hidden] tensor. This times both paths on the same sampled clients, taking turns
within each repeat (the fastest repeat counts), and checks that they give the same update. Dropout is
turned off so the two paths are comparable draw for draw.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recbole_ext import compat  # noqa: E402,F401  (numpy aliases before RecBole)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def table(result: dict) -> str:
    """The table docs/BENCHMARKS.md shows, from a results file."""
    lines = ["| clients | positions | per-client path | pooled | speedup |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['clients']} | {row['positions']:,} | {row['per_client_s']:.2f} s | "
                     f"{row['pooled_s']:.2f} s | {row['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "yamls" / "amazon" / "stage1.yaml"))
    parser.add_argument("--clients", default="128,512", help="comma-separated clients per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--table", metavar="FILE.json", help="print the Markdown table of a results file; measure nothing")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return

    from recbole_ext.config import load_config
    from recbole_ext.federated.server import aggregate
    from recbole_ext.federated.vectorized import VectorizedBackend
    from recbole_ext.pipeline import Stage
    from recbole_ext.runs import machine_info

    cfg = load_config(args.config, ["loss.type=ce", "optim.clip_grad_norm=null", "model.hidden_dropout_prob=0.0",
                                    "model.attn_dropout_prob=0.0", "run_dir=/tmp/pooled-round-benchmark", *args.set])
    stage = Stage(cfg, args.config)
    windows = stage.windows
    global_params = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    pooled = VectorizedBackend(stage.model, windows, cfg)
    per_client = VectorizedBackend(stage.model, windows, cfg)
    assert pooled.pooled, "the config does not allow the pooled round"
    per_client.pooled = False

    def round_of(backend, clients):
        return aggregate(backend.train_clients(clients, global_params, 1), global_params, 1, cfg["federated"])[0]

    rows = []
    rng = np.random.default_rng(cfg["seed"])
    for count in (int(c) for c in args.clients.split(",")):
        clients = rng.choice(windows.clients, size=min(count, len(windows.clients)), replace=False)
        best = {"pooled": float("inf"), "per_client": float("inf")}
        updates = {}
        for _ in range(args.repeats):
            for name, backend in (("per_client", per_client), ("pooled", pooled)):
                start = time.perf_counter()
                updates[name] = round_of(backend, clients)
                best[name] = min(best[name], time.perf_counter() - start)
        difference = max(float((updates["pooled"][n] - updates["per_client"][n]).abs().max()) for n in global_params)
        scale = max(float(updates["per_client"][n].abs().max()) for n in global_params)
        rows.append({"clients": len(clients), "positions": int(windows.num_targets[clients].sum()),
                     "per_client_s": round(best["per_client"], 3), "pooled_s": round(best["pooled"], 3),
                     "speedup": round(best["per_client"] / best["pooled"], 2),
                     "max_update_difference": difference, "max_update": scale})
        print(json.dumps(rows[-1]), flush=True)
    result = {"config": args.config, "dataset": cfg["data"]["dataset"], "sets": args.set,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "machine": machine_info(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
