"""Finished run folders -> machine-readable result records, a Markdown table over seeds, and the
figures of docs/RESULTS.md.

One record per (run, protocol, split) with `model`, `trainer`, `stage`, `variant`, `seed`,
`protocol`, `split`, `metrics` (the summary's numbers) and `slices` (slice label -> {users, metrics};
null for runs written before slices existed), plus context read from the run folder
(`run`, `dataset`, `trainable_params`, `bytes_up_per_round`, `rounds`, `best_round`, `wall_seconds`,
`machine`, `finished`), null where the folder does not tell. Runs written before a summary key existed fall
back to config.yaml and metrics.jsonl.

The variant is inferred from the run's config.yaml:
  * stage 1 (without `model.item_content`) and any stock baseline is "full": the ID model is the whole model there;
  * with `model.align` or `model.experts` on, both `data.text_features` and `data.image_features`
    set is "full", text only "text_only", image only "image_only", neither "id_only";
  * `model.memory.st_k + lt_k == 0` with the experts on is "no_memory", joined to the modality part
    with "+" unless that is "full" (e.g. "text_only+no_memory");
  * `model.item_content` on adds "item_content" the same way (e.g. "text_only+item_content").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..defaults import base_defaults
from ..errors import UserError
from ..runs import CHECKPOINT, read_checkpoint, read_metrics
from .plotting import pyplot
from .report import METRICS, UNI100_NOTE, read_summary

OUR_MODEL = "UR4Rec-MoE"
PROTOCOLS = ("full", "uni100")
SPLITS = ("valid", "test")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="run.py results",
        description="Result records (JSON) of run folders, a Markdown table of test metrics (mean ± std over "
                    "seeds) on stdout, and with --plots the validation curves and router-weight histograms.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", required=True, help="JSON file for the records, e.g. docs/results/ml-1m.json")
    parser.add_argument("--plots", metavar="DIR", help="write valid_ndcg10.png and router_weights.png here, and "
                                                       "the router weights' summary to <out stem>-router.json")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="a run without summary.json contributes its best validation round (finished: false)")
    args = parser.parse_args(argv)

    runs = load_runs(args.run_dirs, args.allow_unfinished)
    recs = [r for run in runs for r in records(run)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recs, indent=2) + "\n")
    note(f"{len(recs)} records -> {out}")
    print(tables(recs))
    if args.plots:
        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        plot_validation(runs, folder / "valid_ndcg10.png")
        router = router_summaries(runs)
        if router:
            plot_router(router, folder / "router_weights.png")
            path = out.with_name(f"{out.stem}-router.json")
            path.write_text(json.dumps([{k: v for k, v in r.items() if k != "weights"} for r in router],
                                       indent=2) + "\n")
            note(f"router weights' summary -> {path}")
        else:
            note("router_weights.png skipped: no stage-3 run with a best.pt among the runs given")


def tables(recs: list[dict]) -> str:
    """What `run.py results` prints: the seed table, the compute table and the slice table, from records
    alone, so a committed table can be checked against its committed records."""
    parts = [markdown_table(recs), compute_table(recs), slice_table(recs)]
    return "\n\n".join(part for part in parts if part)


def note(text: str) -> None:
    # stdout carries only the Markdown table, so it can be redirected into a file as it is
    print(text, file=sys.stderr)


# ---------------------------------------------------------------------------------------- run folders
@dataclass
class Run:
    path: Path
    label: str           # the run folder's name, or a longer tail of its path where names collide
    config: dict         # config.yaml; {} when absent (a baseline folder may not write one)
    metrics: list[dict]  # metrics.jsonl lines
    summary: dict | None  # None: unfinished
    meta: dict           # an unfinished run's best.pt metadata (model, stage, dataset), else {}

    def given(self, key: str):
        """A summary key (an unfinished run's checkpoint metadata); None when absent."""
        return (self.summary if self.summary is not None else self.meta).get(key)

    @property
    def model(self) -> str:
        return self.given("model") or OUR_MODEL

    @property
    def stage(self) -> int | None:
        # a baseline's summary says stage null, while its config.yaml may still carry the default 1
        known = self.summary if self.summary is not None else self.meta
        if "stage" in known:
            return known["stage"]
        return None if self.model != OUR_MODEL else self.config.get("stage")

    @property
    def seed(self):
        return _first(self.given("seed"), self.config.get("seed"))

    @property
    def dataset(self):
        return _first(self.given("dataset"), (self.config.get("data") or {}).get("dataset"))

    @property
    def trainer(self) -> str:
        if self.given("trainer"):
            return self.given("trainer")
        if self.metrics:  # the unit trained tells: federated rounds, centralized epochs
            return "federated" if self.rounds else "centralized"
        return self.config.get("trainer", base_defaults()["trainer"])

    @property
    def rounds(self) -> list[dict]:
        return [line for line in self.metrics if "round" in line]


def _first(*values):
    return next((v for v in values if v is not None), None)


def load_runs(run_dirs: list[str], allow_unfinished: bool = False) -> list[Run]:
    paths = [Path(d) for d in run_dirs]
    runs = []
    for path, label in zip(paths, _labels(paths)):
        if not path.is_dir():
            raise UserError(f"{path}: not a run folder")
        try:
            summary = read_summary(path)
        except UserError as err:
            if not allow_unfinished:
                raise UserError(f"{err} Pass --allow-unfinished to take its best validation round "
                                f"instead.") from None
            summary = None
        config_path = path / "config.yaml"
        config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
        metrics = read_metrics(path) if (path / "metrics.jsonl").is_file() else []
        # a baseline's config.yaml is the stage file it copied, so without a summary only its
        # checkpoint tells it apart from our stage 1
        meta = (read_checkpoint(str(path / CHECKPOINT))["meta"]
                if summary is None and (path / CHECKPOINT).is_file() else {})
        runs.append(Run(path, label, config, metrics, summary, meta))
    return runs


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, lengthened to the path below the folders' common parent where two collide
    (e.g. seed1/stage3 and seed2/stage3)."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    return [str(p.relative_to(root)) if p != root else p.name for p in resolved]


# -------------------------------------------------------------------------------------------- records
def infer_variant(config: dict, stage: int | None, baseline: bool = False) -> str:
    """The rule in the module docstring."""
    model = config.get("model") or {}
    content = bool(model.get("item_content"))
    if baseline or (stage in (None, 1) and not content) or not (model.get("align") or model.get("experts") or content):
        return "full"
    data = config.get("data") or {}
    text, image = bool(data.get("text_features")), bool(data.get("image_features"))
    modality = {(True, True): "full", (True, False): "text_only", (False, True): "image_only",
                (False, False): "id_only"}[(text, image)]
    memory = model.get("memory") or {}
    no_memory = bool(model.get("experts")) and memory.get("st_k", 1) + memory.get("lt_k", 1) == 0
    parts = [p for p in (modality, "no_memory" if no_memory else "", "item_content" if content else "")
             if p and p != "full"]
    return "+".join(parts) or "full"


def records(run: Run) -> list[dict]:
    """The run's records: valid and test per protocol from summary.json, or for an unfinished run its
    best validation round from metrics.jsonl (none before its first validation)."""
    baseline = run.model != OUR_MODEL
    if not baseline and run.stage not in (None, 1) and not run.config:
        raise UserError(f"{run.path / 'config.yaml'}: missing, so the variant of this stage-{run.stage} run "
                        f"cannot be told")
    federated = run.trainer == "federated"
    rounds = run.rounds
    context = {
        "model": run.model, "trainer": run.trainer, "stage": run.stage,
        "variant": infer_variant(run.config, run.stage, baseline), "seed": run.seed,
    }
    extra = {
        "run": run.label, "name": _first(run.given("name"), run.config.get("name")), "dataset": run.dataset,
        "trainable_params": _first(run.given("trainable_params"), next(
            (line["trainable_params"] for line in run.metrics if "trainable_params" in line), None)),
        "bytes_up_per_round": (sum(r["bytes_up"] for r in rounds) / len(rounds)
                               if federated and rounds and all("bytes_up" in r for r in rounds) else None),
        "rounds": _first(run.given("rounds_run"), len(rounds) or None) if federated else None,
        "best_round": run.given("best_round") if federated else None,
        "wall_seconds": run.given("wall_seconds"),
        "machine": run.given("machine"),
        "finished": run.summary is not None,
    }
    if run.summary is not None:
        missing = [f"{s}.{p}" for p in PROTOCOLS for s in SPLITS if p not in (run.summary.get(s) or {})]
        if missing:
            raise UserError(f"{run.path / 'summary.json'}: no {', '.join(missing)} metrics")
        slices = run.summary.get("slices") or {}
        return [{**context, "protocol": p, "split": s, "metrics": run.summary[s][p],
                 "slices": (slices.get(s) or {}).get(p), **extra} for p in PROTOCOLS for s in SPLITS]
    best = best_validation(run)
    if best is None:
        note(f"{run.path}: unfinished and never validated; no records")
        return []
    return [{**context, "protocol": p, "split": "valid", "metrics": best["valid"][p],
             "slices": (best.get("slices") or {}).get(p), **extra} for p in PROTOCOLS]


def best_validation(run: Run) -> dict | None:
    """The metrics line the run's early stopping would keep: the first best on its eval metric."""
    ev = {**base_defaults()["eval"], **(run.config.get("eval") or {})}
    protocol, metric = ev["protocol"], ev["metric"]
    best = None
    for line in run.metrics:
        if "valid" in line and (best is None or line["valid"][protocol][metric] > best["valid"][protocol][metric]):
            best = line
    return best


# -------------------------------------------------------------------------------------- the table
def aggregate(recs: list[dict], split: str = "test") -> list[dict]:
    """Rows of mean and sample std (n - 1) over the runs of each config name/model/trainer/stage/variant
    (and dataset), per protocol and metric, in the order the groups first appear. The config's `name`
    keeps apart runs of one stage with other settings (e.g. another learning rate); the seeds of one
    setting share it."""
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        if r["split"] == split:
            key = (r["dataset"], r.get("name"), r["model"], r["trainer"], r["stage"], r["variant"])
            groups.setdefault(key, []).append(r)
    rows = []
    for (dataset, name, model, trainer, stage, variant), members in groups.items():
        seeds = {}
        for r in members:
            seeds.setdefault(r["run"], r["seed"])
        if len(set(seeds.values())) < len(seeds):
            note(f"{model} {trainer} stage {stage} {variant}: runs {', '.join(seeds)} repeat a seed; "
                 f"each counts as one")
        cells = {}
        for protocol in PROTOCOLS:
            for metric in METRICS:
                values = [r["metrics"][metric] for r in members if r["protocol"] == protocol]
                cells[(protocol, metric)] = _mean_std(values)
        rows.append({"dataset": dataset, "name": name, "model": model, "trainer": trainer, "stage": stage,
                     "variant": variant, "n": len(seeds), "cells": cells})
    return rows


def _mean_std(values: list[float]) -> tuple[float, float | None] | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _group_cells(row: dict, several: bool) -> list[str]:
    return ([str(row["dataset"])] if several else []) + [
        row["name"] or "–", row["model"], row["trainer"], "–" if row["stage"] is None else str(row["stage"]),
        row["variant"]]


def markdown_table(recs: list[dict]) -> str:
    rows = aggregate(recs)
    several = len({r["dataset"] for r in rows}) > 1
    head = (["dataset"] if several else []) + ["config", "model", "trainer", "stage", "variant"]
    head += [f"{p} {METRICS[m]}" for p in PROTOCOLS for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = _group_cells(row, several)
        cells += [_cell(row["cells"][(p, m)], row["n"]) for p in PROTOCOLS for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", UNI100_NOTE])


SLICE_METRICS = ("hit@10", "ndcg@10")


def slice_table(recs: list[dict]) -> str:
    """Test HR@10 and NDCG@10 of both protocols per slice (evaluation.py), mean ± std over the seeds of
    each row of the main table, with the slice's users; "" when no run reports slices."""
    groups: dict[tuple, dict] = {}
    for row in aggregate(recs):
        key = (row["dataset"], row["name"], row["model"], row["trainer"], row["stage"], row["variant"])
        groups[key] = {"row": row, "slices": {}}
    for r in recs:
        if r["split"] != "test" or not r.get("slices"):
            continue
        key = (r["dataset"], r.get("name"), r["model"], r["trainer"], r["stage"], r["variant"])
        for label, part in r["slices"].items():
            entry = groups[key]["slices"].setdefault(label, {"users": set(), "values": {}})
            entry["users"].add(part["users"])
            for m in SLICE_METRICS:
                entry["values"].setdefault((r["protocol"], m), []).append(part["metrics"][m])
    if not any(g["slices"] for g in groups.values()):
        return ""
    several = len({key[0] for key in groups}) > 1
    head = (["dataset"] if several else []) + ["config", "model", "trainer", "stage", "variant", "slice", "users"]
    head += [f"{p} {METRICS[m]}" for p in PROTOCOLS for m in SLICE_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in groups.values():
        row = group["row"]
        for label, entry in group["slices"].items():
            users = sorted(entry["users"])  # the same in every seed's run of one split, unless max_users differs
            count = str(users[0]) if len(users) == 1 else f"{users[0]}–{users[-1]}"
            cells = _group_cells(row, several) + [label, count]
            cells += [_cell(_mean_std(entry["values"].get((p, m), [])), len(entry["values"].get((p, m), [])))
                      for p in PROTOCOLS for m in SLICE_METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(["Test metrics per slice (target item's training interactions; user's training-history "
                      "length):", "", *lines])


def compute_table(recs: list[dict]) -> str:
    """One row per run: what it cost (parameters trained, bytes each round sent up, rounds, time, machine)."""
    lines = ["| run | trainable params | MB up per round | rounds | wall s | machine |", "|---|---|---|---|---|---|"]
    for rec in {r["run"]: r for r in recs}.values():
        machine = rec["machine"] or {}
        where = (f"{machine.get('cores')} cores ({machine.get('cpu')}), {machine.get('threads')} threads"
                 + (f", {machine['gpu']}" if machine.get("gpu") else "") if machine else "–")
        mb = "–" if rec["bytes_up_per_round"] is None else f"{rec['bytes_up_per_round'] / 1e6:.1f}"
        cells = [rec["run"], "–" if rec["trainable_params"] is None else f"{rec['trainable_params']:,}", mb,
                 "–" if rec["rounds"] is None else str(rec["rounds"]),
                 "–" if rec["wall_seconds"] is None else f"{rec['wall_seconds']:.0f}", where]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value, n: int) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f} ({n} seeds)"


# -------------------------------------------------------------------------------------------- plots
def round_offsets(runs: list[Run]) -> dict[Path, int]:
    """Where each federated run's rounds start on a common axis: a run continues after the last round
    of the given run whose checkpoint its config loads (stage 2 after stage 1, stage 3 after stage 2),
    so a chain reads as one curve; a run loading none of the given runs starts at 0."""
    federated = {run.path.resolve(): run for run in runs if run.trainer == "federated"}
    offsets: dict[Path, int] = {}

    def offset(path: Path, seen: tuple = ()) -> int:
        if path not in offsets:
            starts = [0]
            for entry in federated[path].config.get("load") or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("checkpoint"), str):
                    continue  # not our load list (a baseline's config)
                parent = Path(entry["checkpoint"]).resolve().parent
                if parent in federated and parent not in seen and parent != path:
                    last = max((line["round"] for line in federated[parent].rounds), default=0)
                    starts.append(offset(parent, seen + (path,)) + last)
            offsets[path] = max(starts)
        return offsets[path]

    return {run.path: offset(run.path.resolve()) for run in runs if run.trainer == "federated"}


def plot_validation(runs: list[Run], path: Path) -> None:
    """Validation NDCG@10 per round of every federated run: full protocol solid, uni100 dashed. Where
    runs continue others (stages 2 and 3), a second panel zooms in on the full protocol from just
    before the first continuation, where the differences between stages are a few thousandths."""
    federated = [run for run in runs if run.trainer == "federated" and any("valid" in r for r in run.rounds)]
    if not federated:
        note(f"{path.name} skipped: no federated run with validation rounds among the runs given")
        return
    plt = pyplot()
    offsets = round_offsets(federated)
    chained = [offset for offset in offsets.values() if offset]
    fig, axes = plt.subplots(1, 2 if chained else 1, figsize=(13 if chained else 8, 4.8), squeeze=False)
    whole, zoom = axes[0][0], (axes[0][1] if chained else None)
    zoom_from = min(chained) * 0.9 if chained else None
    palette = plt.get_cmap("tab10" if len(federated) <= 10 else "tab20")
    for i, run in enumerate(federated):
        validated = [r for r in run.rounds if "valid" in r]
        x = [offsets[run.path] + r["round"] for r in validated]
        full = [r["valid"]["full"]["ndcg@10"] for r in validated]
        color = palette(i % palette.N)
        whole.plot(x, full, color=color, marker=".", label=run.label)
        whole.plot(x, [r["valid"]["uni100"]["ndcg@10"] for r in validated], color=color, marker=".",
                   linestyle="--")
        if zoom is not None:
            kept = [(a, b) for a, b in zip(x, full) if a >= zoom_from]
            if kept:
                zoom.plot(*zip(*kept), color=color, marker=".", label=run.label)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("round, cumulative over the stages of a chain" if chained else "round")
        ax.set_ylabel("validation NDCG@10")
        ax.grid(alpha=0.3)
    whole.set_title("full ranking (solid), 100 sampled negatives (dashed)")
    whole.legend(loc="best", fontsize=8)
    if zoom is not None:
        zoom.set_title(f"full ranking, from round {zoom_from:.0f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    note(f"-> {path}")


def router_summaries(runs: list[Run]) -> list[dict]:
    """Per stage-3 run: the router's visual weight r_v of every item with a modality, and its summary."""
    out = []
    for run in runs:
        if run.stage != 3 or run.model != OUR_MODEL:
            continue
        if not (run.path / CHECKPOINT).is_file():
            note(f"{run.path}: no {CHECKPOINT}, left out of the router weights")
            continue
        weights = router_visual_weights(run.path)
        if weights.size == 0:
            note(f"{run.path}: no item has image or text features, left out of the router weights")
            continue
        import numpy as np

        q25, median, q75 = (float(q) for q in np.quantile(weights, [0.25, 0.5, 0.75]))
        out.append({"run": run.label, "variant": infer_variant(run.config, 3), "seed": run.seed,
                    "items": int(weights.size), "mean": float(weights.mean()), "q25": q25, "median": median,
                    "q75": q75, "fraction_visual_above_half": float((weights > 0.5).mean()), "weights": weights})
    return out


def router_visual_weights(run_dir: Path):
    """r_v of every item with at least one modality, from the run's best checkpoint: the model is
    rebuilt from its config.yaml (features and memory included) and takes every group from best.pt."""
    import torch

    from .. import stages
    from ..config import load_config
    from ..pipeline import Stage

    config_path = run_dir / "config.yaml"
    # best.pt holds every parameter, so the checkpoints the run started from are not needed (or read)
    stage = Stage(load_config(config_path, ["load=[]", f"run_dir={run_dir}"], saved=True), str(config_path))
    groups = list(dict.fromkeys(stages.group_of(n) for n, _ in stage.model.named_parameters()))
    stages.load_groups(stage.model, [{"checkpoint": str(run_dir / CHECKPOINT), "groups": groups}],
                       stage.fingerprint)
    stage.model.eval()
    with torch.no_grad():
        table = stage.model.route_table()
    return table[stage.model.available.any(dim=1), 0].cpu().numpy()


def plot_router(router: list[dict], path: Path) -> None:
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    bins = np.linspace(0.0, 1.0, 21)
    for i, r in enumerate(router):
        # weighted to fractions, so catalogues of different sizes share the y axis
        ax.hist(r["weights"], bins=bins, weights=np.full(r["items"], 1.0 / r["items"]), histtype="step",
                linewidth=1.5, color=f"C{i % 10}",
                label=f"{r['run']} (mean {r['mean']:.2f}, {r['fraction_visual_above_half']:.0%} > 0.5)")
    ax.set_xlabel("router visual weight r_v (r_t = 1 - r_v)")
    ax.set_ylabel("fraction of items")
    ax.set_title("router weights over items with a modality, end of stage 3")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    note(f"-> {path}")
