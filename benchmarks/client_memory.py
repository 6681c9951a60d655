#!/usr/bin/env python
"""Peak memory of one client's gradient on the heaviest ML-1M user in stage 3: the whole client in one
pass against parts of `federated.cohort_positions` positions (null: the stage's default), and how far
the two gradients are apart.

    python benchmarks/client_memory.py --out docs/benchmarks-client-memory.json

Needs the prepared ML-1M (`run.py prepare ml1m`, as experiments/ml1m.sh does) and the team's MiniLM
text features; the model is untrained (memory does not depend on the weights), with gamma at 0.5 so
the experts' part of the gradient is not zero. Parts are measured first: a pass frees its tensors
when it ends, so the later, larger one-pass peak is not hidden by the earlier one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from recbole_ext import compat  # noqa: E402,F401  (numpy aliases before RecBole)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from federated_round import PeakRSS  # noqa: E402
from recbole_ext.config import load_config  # noqa: E402
from recbole_ext.local.steps import backward_in_parts, draw_negatives, positions_per_pass  # noqa: E402
from recbole_ext.pipeline import Stage  # noqa: E402
from recbole_ext.runs import machine_info  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "ml-1m" / "features" / "minilm_l6_title_genres.npz"


def gradient(stage, index, user, max_positions):
    model, w = stage.model, stage.windows
    model.zero_grad(set_to_none=True)
    targets = w.targets[index]
    owner = torch.zeros(int((targets > 0).sum()), dtype=torch.long)
    negatives = draw_negatives(w, [user], owner, stage.cfg["loss"]["num_negatives"], torch.Generator().manual_seed(0))
    with PeakRSS() as peak:
        backward_in_parts(model, w.inputs[index], targets, w.mem_rows[index], negatives, max_positions)
    return peak, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--text-features", default=str(TEXT))
    args = parser.parse_args()
    cfg = load_config(ROOT / "yamls" / "ml1m" / "stage3.yaml",
                      ["load=[]", "model.gating_init=0.5", f"data.text_features={args.text_features}",
                       "run_dir=/tmp/client-memory-unused"])
    stage = Stage(cfg, "yamls/ml1m/stage3.yaml")
    stage.model.eval()  # the same masks in both passes: no dropout
    w = stage.windows
    user = int(w.clients[np.argmax(w.num_targets[w.clients])])
    index = w.windows_of([user])
    limit = positions_per_pass(stage.model, cfg)
    parts_peak, parts = gradient(stage, index, user, limit)
    whole_peak, whole = gradient(stage, index, user, 10 ** 9)
    worst = max(float((parts[n] - whole[n]).abs().max()) for n in whole)
    scale = max(float(whole[n].abs().max()) for n in whole)
    record = {"user_positions": int(w.num_targets[user]), "windows": len(index), "positions_per_pass": limit,
              "in_parts": parts_peak.record(), "one_pass": whole_peak.record(),
              "max_abs_gradient_difference": worst, "max_abs_gradient": scale, "machine": machine_info()}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
