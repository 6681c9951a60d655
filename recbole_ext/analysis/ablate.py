"""`run.py ablate RUN_DIR`: how much each score term of a trained run carries, on validation.

The run's best checkpoint is scored with every term it has, then with one term switched off at a time:
the experts (gamma F_i, by gamma = 0), the align term (beta A_i, by beta = 0), the item content
(<s, c_i>). A term that carries weight costs metrics when it is switched off; one that does not leaves
them unchanged. Decide on validation (the default split); the run folder is only read.
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UserError

METRICS = ("hit@10", "ndcg@10")


def _term(model, term: str, value=None):
    """The value that switches `term` on or off (gamma, beta, use_content); sets it when `value` is given."""
    if term == "experts":
        if value is not None:
            with torch.no_grad():
                model.gamma.copy_(value)
        return model.gamma.detach().clone()
    name = {"align": "beta", "content": "use_content"}[term]
    if value is not None:
        setattr(model, name, value)
    return getattr(model, name)


@contextmanager
def switched_off(model, term: str):
    """The model with one score term off, restored on exit."""
    saved = _term(model, term)
    try:
        _term(model, term, {"experts": torch.zeros(()), "align": 0.0, "content": False}[term])
        yield model
    finally:
        _term(model, term, saved)


def terms_of(model) -> list[str]:
    return [term for term, on in (("experts", model.use_experts), ("align", model.use_align),
                                  ("content", model.use_content)) if on]


def ablate(run_dir: str, split: str = "valid") -> dict:
    """{"all terms" or "<term> off": {protocol: {metric: value}}} for the run's best checkpoint."""
    from ..pipeline import trained_stage

    folder = Path(run_dir)
    stage = trained_stage(run_dir)
    if not terms_of(stage.model):
        raise UserError(f"{folder}: the model scores by its ID embedding alone (no align, experts or "
                        f"item_content): there is no term to switch off")
    results = {"all terms": stage.evaluator.evaluate(stage.model, split)}
    for term in terms_of(stage.model):
        with switched_off(stage.model, term):
            results[f"{term} off"] = stage.evaluator.evaluate(stage.model, split)
    return results


def table(results: dict) -> str:
    head = "| model | " + " | ".join(f"{p} {m}" for p in ("full", "uni100") for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(METRICS))]
    reference = results["all terms"]
    for name, metrics in results.items():
        cells = []
        for protocol in ("full", "uni100"):
            for metric in METRICS:
                value = metrics[protocol][metric]
                delta = value - reference[protocol][metric]
                cells.append(f"{value:.4f}" if name == "all terms" else f"{value:.4f} ({delta:+.4f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run.py ablate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers here")
    args = parser.parse_args(argv)
    results = ablate(args.run_dir, args.split)
    print(f"{args.run_dir}, {args.split}: each score term switched off in turn (difference to all terms)")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run_dir, "split": args.split, "results": results},
                                              indent=2) + "\n")
