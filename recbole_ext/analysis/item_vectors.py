"""`run.py items RUN_DIR`: a trained run's item vectors, by how often each item was trained on.

For the items in each slice of training interactions (the slices of the targets in `run.py compare`):
how many there are, the mean norm of their ID embeddings e_i and, for a model with `item_content`, of
their content vectors c_i and score vectors e_i + c_i, and the mean cosine of e_i and c_i. A negative
cosine means the IDs learnt to cancel part of the content (whether that is what holds an item back is
for `run.py compare` to say). The padding item is left out; the run folder is only read.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

COLUMNS = ("items", "id_norm", "content_norm", "vector_norm", "cosine")


def slice_table(ids: np.ndarray, content: np.ndarray | None, counts: np.ndarray, bins) -> dict:
    """{slice label: {column: value}} for the item rows `ids` [n, H], `content` [n, H] or None and
    their training interactions `counts` [n], sliced at the lower edges `bins` after 0."""
    from ..evaluation import item_count_slices

    index, labels = item_count_slices(counts, bins)
    table = {}
    for k, label in enumerate(labels):
        rows = index == k
        if not rows.any():
            continue
        e = ids[rows]
        e_norm = np.linalg.norm(e, axis=1)
        entry = {"items": int(rows.sum()), "id_norm": float(e_norm.mean())}
        if content is not None:
            c = content[rows]
            c_norm = np.linalg.norm(c, axis=1)
            entry.update(content_norm=float(c_norm.mean()),
                         vector_norm=float(np.linalg.norm(e + c, axis=1).mean()),
                         cosine=float(((e * c).sum(axis=1) / np.maximum(e_norm * c_norm, 1e-12)).mean()))
        table[label] = entry
    return table


def item_vectors(run_dir: str, bins=None) -> dict:
    """The slice table of the run's best checkpoint; `bins`: lower edges after 0 (default: the run's
    `eval.item_count_bins`)."""
    from ..pipeline import trained_stage

    stage = trained_stage(run_dir)
    model = stage.model.eval()
    with torch.no_grad():
        ids = model.item_embedding.weight.float().cpu().numpy()
        content = model.content_vectors().float().cpu().numpy() if model.use_content else None
    real = slice(1, None)  # row 0 is RecBole's padding item
    return slice_table(ids[real], None if content is None else content[real],
                       stage.evaluator.item_counts[real],
                       stage.evaluator.item_count_bins if bins is None else bins)


def table(result: dict) -> str:
    present = [c for c in COLUMNS if any(c in entry for entry in result.values())]
    lines = ["| slice | " + " | ".join(present) + " |", "|" + "---|" * (1 + len(present))]
    for label, entry in result.items():
        cells = [str(entry[c]) if c == "items" else f"{entry[c]:.3f}" for c in present]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from ..evaluation import item_count_edges

    parser = argparse.ArgumentParser(prog="run.py items", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--item-count-bins", metavar="E,E,...",
                        help="slice the items by these lower edges after 0 instead of the run's own "
                             "eval.item_count_bins, e.g. 10")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers here")
    args = parser.parse_args(argv)
    bins = item_count_edges(args.item_count_bins) if args.item_count_bins else None
    result = item_vectors(args.run_dir, bins)
    print(f"{args.run_dir}: item vectors of the best checkpoint by the item's training interactions")
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run_dir, "slices": result}, indent=2) + "\n")
