#!/usr/bin/env python
"""Federated round speed, memory and evaluation cost, against stock RecBole, in one process.

    python benchmarks/federated_round.py --quick --out docs/benchmarks-cpu.json     # ~3 min on 2 cores
    python benchmarks/federated_round.py --out results.json                        # everything, ML-1M too

Every variant is timed in this one process, side by side, so the ratios compare like with like on a
shared or busy machine (the load average is recorded before and after). What is measured, and how
to read the JSON, is in docs/BENCHMARKS.md. Item features are synthetic (seeded random 384-d text
and 512-d image vectors for every item): costs depend on their shapes, not their values, and the
image path (ML-100K and ML-1M have no images here) is exercised at full cost.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recbole_ext import compat  # noqa: E402  (numpy aliases before RecBole)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

SHARED_ML1M = ROOT.parent / "shared" / "data" / "ml-1m"
BACKENDS = ("sequential", "vectorized", "ray")
STAGE_FILES = {1: "stage1.yaml", 2: "stage2.yaml", 3: "stage3.yaml"}


# ----------------------------------------------------------------------------- measuring
class PeakRSS(contextlib.AbstractContextManager):
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.005)

    def __enter__(self):
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    def record(self) -> dict:
        out = {"peak_rss_mib": round(self.peak / 2 ** 20), "peak_rss_increase_mib": round((self.peak - self.start) / 2 ** 20)}
        if torch.cuda.is_initialized():
            out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
        return out


def timed(fn, repeats: int) -> tuple[float, dict]:
    """Fastest of `repeats` calls (the least disturbed by other load), and the peak memory."""
    best = math.inf
    with PeakRSS() as memory:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()  # GPU work is asynchronous: wait for it before reading the clock
            best = min(best, time.perf_counter() - start)
    return best, memory.record()


def machine(device: str) -> dict:
    from recbole_ext.runs import machine_info

    return {**machine_info(device), "load_average_start": [round(x, 2) for x in os.getloadavg()]}


# ----------------------------------------------------------------------------- data
def prepare_data(folder: Path, with_ml1m: bool) -> list[str]:
    from recbole_ext.data import prepare

    datasets = []
    if not (folder / "ml-100k" / "ml-100k.inter").is_file():
        prepare.copy_ml100k(folder)
    datasets.append("ml-100k")
    if with_ml1m and SHARED_ML1M.is_dir():
        if not (folder / "ml-1m" / "ml-1m.inter").is_file():
            prepare.convert_ml1m_shared(str(SHARED_ML1M), str(folder))
        datasets.append("ml-1m")
    for name in datasets:
        tokens = [line.split("\t", 1)[0] for line in (folder / name / f"{name}.item").read_text().splitlines()[1:]]
        for kind, width, seed in (("text", 384, 1), ("image", 512, 2)):
            path = folder / name / f"bench_{kind}.npz"
            if not path.is_file():
                emb = np.random.default_rng(seed).standard_normal((len(tokens), width)).astype(np.float32)
                np.savez(path, ids=np.array(tokens), emb=emb)
    return datasets


def build_stage(stage: int, dataset: str, data: Path, work: Path, device: str = "cpu"):
    from recbole_ext.config import load_config
    from recbole_ext.pipeline import Stage

    cfg = load_config(ROOT / "yamls" / STAGE_FILES[stage], [
        f"data.path={data}", f"data.dataset={dataset}", "load=[]", f"run_dir={work / f'{dataset}-{stage}'}",
        f"device={device}", "federated.cohort_size=null",  # 64 on a CPU, sized to its memory on a GPU
        f"data.text_features={data / dataset / 'bench_text.npz'}",
        f"data.image_features={data / dataset / 'bench_image.npz'}"])
    return Stage(cfg, f"benchmark stage {stage}")


# ----------------------------------------------------------------------------- the project's training
def bench_rounds(stage_obj, stage: int, dataset: str, client_counts, backends, repeats: int, records: list,
                 note, floor: bool) -> None:
    """Seconds per round for each backend and number of clients. Backends take turns within each
    repeat (the fastest repeat counts), so a burst of other load hits them alike. `floor`: also time
    the same clients' windows as one centralized all-position batch (one train_step, no per-client
    work)."""
    from recbole_ext.federated.backends import BACKENDS as MAKE
    from recbole_ext.federated.server import aggregate

    model, windows, cfg = stage_obj.model, stage_obj.windows, stage_obj.cfg
    global_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rng = np.random.default_rng(cfg["seed"])
    samples = {count: rng.choice(windows.clients, size=min(count, len(windows.clients)), replace=False)
               for count in client_counts}
    made, setup = {}, {}
    for name in backends:
        start = time.perf_counter()
        made[name] = MAKE[name](model, windows, cfg)
        setup[name] = round(time.perf_counter() - start, 2)
        made[name].train_clients(samples[min(client_counts)][:2], global_params, 0)  # warm-up
    # A round as the trainer runs it: the backend trains the clients, the server aggregates their sums.
    variants = {name: (lambda b: lambda clients: aggregate(b.train_clients(clients, global_params, 1), global_params,
                                                          1, cfg["federated"]))(b)
                for name, b in made.items()}
    if floor:
        variants["centralized_batch"] = lambda clients: centralized_step(stage_obj, clients, global_params)
        variants["centralized_batch"](samples[min(client_counts)][:2])
    base = {"dataset": dataset, "stage": stage, "threads": torch.get_num_threads()}
    for count, clients in samples.items():
        best = {name: (math.inf, None) for name in variants}
        for _ in range(repeats):
            for name, run in variants.items():
                seconds, memory = timed(lambda: run(clients), 1)
                if seconds < best[name][0]:
                    best[name] = (seconds, memory)
        targets = int(windows.num_targets[clients].sum())
        for name, (seconds, memory) in best.items():
            record = {"kind": "round", **base, "backend": name, "clients": len(clients), "targets": targets,
                      "seconds": round(seconds, 4), "client_updates_per_s": round(len(clients) / seconds, 2),
                      "epoch_equivalent_seconds": round(float(seconds * windows.num_targets.sum() / targets), 2),
                      **memory}
            if name == "centralized_batch":
                record = {**record, "kind": "centralized_batch"}
                del record["backend"], record["client_updates_per_s"], record["epoch_equivalent_seconds"]
            else:
                record["setup_seconds"] = setup[name]
            records.append(record)
            note(record)
    for backend in made.values():
        if hasattr(backend, "close"):
            backend.close()


def centralized_step(stage_obj, clients, global_params) -> None:
    """One optimizer step over all windows of `clients` as one batch, then the parameters restored."""
    from recbole_ext.local.steps import positions_per_pass, train_step
    from recbole_ext.local.optim import LocalOptimizer

    model, windows, cfg = stage_obj.model, stage_obj.windows, stage_obj.cfg
    index = windows.windows_of(clients)
    owners = np.repeat(clients, np.diff(windows.window_offsets)[clients]).tolist()
    optimizer = LocalOptimizer(model, cfg["optim"])
    train_step(model, optimizer, windows, index, owners, cfg["loss"],
               torch.Generator(windows.device).manual_seed(0), positions_per_pass(model, cfg))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in global_params:
                param.copy_(global_params[name])


def bench_stage2_cache(stage_obj, dataset: str, records: list, note) -> None:
    from recbole_ext.federated.backbone_cache import BackboneCache

    cache = BackboneCache(stage_obj.model, stage_obj.windows.inputs)
    seconds, memory = timed(cache.states, 1)
    records.append({"kind": "stage2_backbone_cache", "dataset": dataset, "windows": len(stage_obj.windows.inputs),
                    "seconds": round(seconds, 3), **memory})
    note(records[-1])


def bench_evaluation(stage_obj, stage: int, dataset: str, repeats: int, records: list, note) -> None:
    """Both protocols (the project's evaluator) against a full-ranking pass alone (the same loop
    with the sampled gather left out)."""
    from recbole.evaluator import Collector

    evaluator, model = stage_obj.evaluator, stage_obj.model
    device = next(model.parameters()).device

    @torch.no_grad()
    def full_only():
        model.eval()
        collector = Collector(evaluator.config)
        for interaction, history_index, positive_u, positive_i in evaluator.loaders["valid"]:
            scores = model.full_sort_predict(interaction.to(device)).view(-1, evaluator.n_items)
            scores[:, 0] = float("-inf")
            if history_index is not None:
                scores[history_index] = float("-inf")
            collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
        return evaluator.evaluator.evaluate(collector.get_data_struct())

    full_only()
    for protocols, fn in (("full", full_only), ("full+uni100", lambda: evaluator.evaluate(model, "valid"))):
        seconds, memory = timed(fn, repeats)
        records.append({"kind": "validation", "dataset": dataset, "stage": stage, "implementation": "ur4rec-moe",
                        "protocols": protocols, "seconds": round(seconds, 4), **memory})
        note(records[-1])


# ----------------------------------------------------------------------------- stock RecBole
def recbole_sasrec(dataset: str, data: Path, work: Path, hidden: int, max_len: int):
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    sasrec = compat.import_sasrec()
    settings = {
        "data_path": str(data), "checkpoint_dir": str(work / "recbole"), "MAX_ITEM_LIST_LENGTH": max_len,
        "hidden_size": hidden, "train_batch_size": 256, "eval_batch_size": 4096, "loss_type": "CE",
        "train_neg_sample_args": None, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                      "mode": {"valid": "uni100", "test": "full"}},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10", "device": "cpu",
        "use_gpu": False, "show_progress": False, "seed": 2020, "reproducibility": True, "epochs": 1}
    config = compat.recbole_config(sasrec, dataset, settings)
    init_seed(config["seed"], True)
    with compat.writes_into(work / "recbole"):
        train, valid, test = data_preparation(config, create_dataset(config))
        model = sasrec(config, train._dataset)
        trainer = Trainer(config, model)
    return trainer, train, valid, test, {k: config[k] for k in ("hidden_size", "inner_size", "n_layers", "n_heads",
                                                                "MAX_ITEM_LIST_LENGTH", "train_batch_size",
                                                                "hidden_dropout_prob", "loss_type")}


def bench_recbole(dataset: str, data: Path, work: Path, hidden: int, max_len: int, batches: int | None,
                  eval_batches: int | None, records: list, note) -> None:
    """RecBole's own SASRec epoch (its `_train_epoch`, prefix augmentation) and its evaluation paths;
    with `batches` set, a fixed number of batches timed and scaled to the whole epoch (or pass)."""
    from recbole.data.dataloader import FullSortEvalDataLoader

    trainer, train, valid, test, used = recbole_sasrec(dataset, data, work, hidden, max_len)
    total = len(train)
    trainer._train_epoch(itertools.islice(train, 1), 0)  # warm-up
    count = total if batches is None else min(batches, total)
    with PeakRSS() as memory:
        start = time.perf_counter()
        trainer._train_epoch(itertools.islice(train, count), 0)
        seconds = time.perf_counter() - start
    records.append({"kind": "recbole_epoch", "dataset": dataset, "implementation": "recbole SASRec (stock)",
                    "config": used, "batches_timed": count, "batches_per_epoch": total,
                    "scaled_to_epoch": count < total, "seconds": round(seconds * total / count, 2), **memory.record()})
    note(records[-1])

    @torch.no_grad()
    def stock_eval(loader, limit):
        """RecBole's Trainer.evaluate loop (same calls) over the first `limit` batches."""
        trainer.model.eval()
        trainer.tot_item_num = loader._dataset.item_num
        full = isinstance(loader, FullSortEvalDataLoader)
        if full and trainer.item_tensor is None:
            trainer.item_tensor = loader._dataset.get_item_feature()
        batch_eval = trainer._full_sort_batch_eval if full else trainer._neg_sample_batch_eval
        for batched in itertools.islice(loader, limit):
            interaction, scores, positive_u, positive_i = batch_eval(batched)
            trainer.eval_collector.eval_batch_collect(scores, interaction, positive_u, positive_i)

    for protocol, loader in (("uni100", valid), ("full", test)):
        limit = len(loader) if eval_batches is None else min(eval_batches, len(loader))
        with PeakRSS() as memory:
            start = time.perf_counter()
            stock_eval(loader, limit)
            seconds = time.perf_counter() - start
        records.append({"kind": "validation", "dataset": dataset, "implementation": "recbole SASRec (stock)",
                        "protocols": protocol, "batches_timed": limit, "batches_per_pass": len(loader),
                        "scaled_to_pass": limit < len(loader), "seconds": round(seconds * len(loader) / limit, 3),
                        **memory.record()})
        note(records[-1])


# ----------------------------------------------------------------------------- summary
def find(records, **match):
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def ratio(numerator, denominator):
    if numerator is None or denominator is None:
        return None
    return round(float(numerator["seconds"]) / float(denominator["seconds"]), 2)


RATIO_DEFINITIONS = {
    "epoch_vs_recbole": "stock RecBole SASRec epoch seconds / federated epoch-equivalent seconds (stage 1, "
                        "256 clients, ML-100K, the fastest backend: see ratio_details): how many times "
                        "faster the federated epoch is",
    "vectorized_vs_sequential": "sequential / vectorized round seconds (stage 1, 256 clients, ML-100K): how many "
                                "times more client updates per second vectorized makes",
    "stage3_vs_stage2": "stage-3 / stage-2 round seconds (vectorized, same clients, ML-100K): how many times "
                        "faster a stage-2 round is than a stage-3 round",
    "ray_vs_vectorized": "ray (2 local workers) / vectorized round seconds (stage 1, 256 clients, ML-100K): cost",
    "eval_both_vs_full": "both protocols / full ranking alone, validation seconds (stage 1 model, ML-100K): cost",
    "round_vs_centralized": "vectorized round / the same windows as one centralized batch, seconds (stage 1, "
                            "256 clients, ML-100K): cost",
}


def epoch_vs_recbole(records, dataset="ml-100k") -> dict:
    """Per backend: stock RecBole epoch / that backend's stage-1 epoch-equivalent at 256 clients."""
    recbole = find(records, kind="recbole_epoch", dataset=dataset)
    if recbole is None:
        return {}
    return {r["backend"]: round(float(recbole["seconds"]) / float(r["epoch_equivalent_seconds"]), 2)
            for r in records if r["kind"] == "round" and r["dataset"] == dataset and r["stage"] == 1
            and r["clients"] == 256}


def ratios(records) -> dict:
    ds = "ml-100k"
    vec1 = find(records, kind="round", dataset=ds, stage=1, backend="vectorized", clients=256)
    stage3_clients = max((r["clients"] for r in records if r["kind"] == "round" and r["stage"] == 3
                          and r["dataset"] == ds and r["backend"] == "vectorized"), default=None)
    by_backend = epoch_vs_recbole(records, ds)
    return {
        "epoch_vs_recbole": max(by_backend.values(), default=None),
        "vectorized_vs_sequential": ratio(find(records, kind="round", dataset=ds, stage=1, backend="sequential",
                                               clients=256), vec1),
        "stage3_vs_stage2": ratio(find(records, kind="round", dataset=ds, stage=3, backend="vectorized",
                                       clients=stage3_clients),
                                  find(records, kind="round", dataset=ds, stage=2, backend="vectorized",
                                       clients=stage3_clients)),
        "ray_vs_vectorized": ratio(find(records, kind="round", dataset=ds, stage=1, backend="ray", clients=256), vec1),
        "eval_both_vs_full": ratio(find(records, kind="validation", dataset=ds, stage=1, protocols="full+uni100"),
                                   find(records, kind="validation", dataset=ds, stage=1, protocols="full")),
        "round_vs_centralized": ratio(vec1, find(records, kind="centralized_batch", dataset=ds, stage=1, clients=256)),
    }


def targets(ratio_values: dict, records, device: str = "cpu") -> dict:
    """Each ratio against its target; on a GPU the round may cost 2x the centralized batch (issue 14),
    on a CPU 1.5x."""
    peak = find(records, kind="round", dataset="ml-1m", stage=3, backend="vectorized", clients=256) or \
        find(records, kind="round", dataset="ml-1m", stage=3, backend="vectorized")
    checks = {"epoch_vs_recbole": (">=", 30), "vectorized_vs_sequential": (">=", 2), "stage3_vs_stage2": (">=", 5),
              "ray_vs_vectorized": ("<=", 1.5), "eval_both_vs_full": ("<=", 1.2),
              "round_vs_centralized": ("<=", 2 if device.startswith("cuda") else 1.5)}
    out = {}
    for key, (op, bound) in checks.items():
        value = ratio_values.get(key)
        out[key] = {"target": f"{op} {bound}", "value": value, "met": None if value is None else
                    bool(value >= bound if op == ">=" else value <= bound)}
    out["ml1m_stage3_peak_gib"] = {"target": "< 6", "value": None if peak is None else
                                   round(peak["peak_rss_mib"] / 1024, 2),
                                   "met": None if peak is None else bool(peak["peak_rss_mib"] < 6 * 1024)}
    return out


def shown(value) -> str:
    """A measured number as the tables show it: three significant figures, whole numbers from 100 on
    (the machines are too noisy for more); a part that was not measured is blank."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, (int, float)):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown(result: dict) -> str:
    """The tables docs/BENCHMARKS.md shows, from a results file: only the parts that run measured."""
    m = result["machine"]
    lines = [f"{m['cores']} cores ({m['cpu']}), torch {m['torch']}, {m['threads']} threads, load average "
             f"{m['load_average_start'][0]} at start, {m['load_average_end'][0]} at end; "
             f"{'--quick' if result['quick'] else 'full run'}, {result['seconds_total']} s in all"]

    def table(header: str, rows: list[str]) -> None:
        if rows:
            lines.extend(["", header, "|" + "---|" * header.count(" | ") + "---|", *rows])

    rounds = [r for r in result["records"] if r["kind"] in ("round", "centralized_batch")]
    rows = []
    for dataset, stage, clients in sorted({(r["dataset"], r["stage"], r["clients"]) for r in rounds}):
        cell = {r.get("backend", "centralized_batch"): r for r in rounds
                if (r["dataset"], r["stage"], r["clients"]) == (dataset, stage, clients)}
        get = lambda name, key="seconds": shown(cell.get(name, {}).get(key))
        rows.append(f"| {dataset} | {stage} | {clients} | {get('sequential')} | {get('vectorized')} | {get('ray')} | "
                    f"{get('centralized_batch')} | {get('vectorized', 'client_updates_per_s')} | "
                    f"{get('vectorized', 'peak_rss_mib')} |")
    table("| dataset | stage | clients | sequential s | vectorized s | ray s | centralized batch s | "
          "vectorized updates/s | vectorized peak RSS MiB |", rows)
    rows = []
    for r in result["records"]:
        if r["kind"] == "validation":
            scaled = f" (scaled from {r['batches_timed']} of {r['batches_per_pass']} batches)" if r.get("scaled_to_pass") else ""
            rows.append(f"| {r['implementation']} | {r['dataset']} | {r.get('stage', '')} | {r['protocols']} | "
                        f"{shown(r['seconds'])}{scaled} |")
    table("| validation | dataset | stage | protocols | seconds |", rows)
    rows = []
    for r in result["records"]:
        if r["kind"] == "recbole_epoch":
            scaled = f" (scaled from {r['batches_timed']} of {r['batches_per_epoch']} batches)" if r["scaled_to_epoch"] else ""
            rows.append(f"| stock RecBole SASRec | {r['dataset']} | {shown(r['seconds'])}{scaled} |")
        elif r["kind"] == "round" and r["stage"] == 1 and r["clients"] == 256:
            rows.append(f"| federated epoch-equivalent, stage 1, {r['backend']} | {r['dataset']} | "
                        f"{shown(r['epoch_equivalent_seconds'])} |")
    table("| epoch | dataset | seconds |", rows)
    ratios = {**result["ratios"], "ML-1M stage 3 peak GiB": result["targets"].get("ml1m_stage3_peak_gib", {}).get("value")}
    targets = {**result["targets"], "ML-1M stage 3 peak GiB": result["targets"].get("ml1m_stage3_peak_gib", {})}
    table("| ratio | value | target | met |",
          [f"| {key} | {shown(value)} | {targets.get(key, {}).get('target', '')} | {shown(targets.get(key, {}).get('met'))} |"
           for key, value in ratios.items() if value is not None])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="ML-100K only; stage 3 at 64 clients only; stages 2-3 timed once (stage 1: the "
                             "faster of two); stock RecBole timed on a few batches and scaled (under 3 minutes on 2 cores)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--table", metavar="FILE.json", help="print the Markdown tables of a results file; measure nothing")
    parser.add_argument("--data", default=str(ROOT / "data"), help="where datasets are (prepared if missing)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS))
    parser.add_argument("--skip-recbole", action="store_true", help="leave out stock RecBole (e.g. on a GPU machine)")
    parser.add_argument("--datasets", default=None,
                        help="comma-separated subset of ml-100k,ml-1m (default: ml-100k, and ml-1m unless --quick)")
    parser.add_argument("--stages", default="1,2,3", help="comma-separated subset of 1,2,3")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the stages train and evaluate "
                                                        "(stock RecBole is timed on the CPU only)")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return 0
    if not args.out:
        parser.error("--out is required (or --table FILE.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine(args.device)
    backends = [b for b in args.backends.split(",") if b]
    data = Path(args.data).resolve()
    wanted = args.datasets.split(",") if args.datasets else None
    datasets = prepare_data(data, with_ml1m=(not args.quick) if wanted is None else "ml-1m" in wanted)
    if wanted is not None:
        datasets = [d for d in datasets if d in wanted]
    records: list[dict] = []

    def result(ratio_values: dict) -> dict:
        return {"machine": {**info, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
                "quick": args.quick, "device": args.device, "datasets": datasets,
                "features": "synthetic: 384-d text and 512-d image vectors for every item (seeded)",
                "seconds_total": round(time.perf_counter() - started, 1),
                "ratios": ratio_values, "ratio_definitions": RATIO_DEFINITIONS,
                "ratio_details": {"epoch_vs_recbole_by_backend": epoch_vs_recbole(records)},
                "targets": targets(ratio_values, records, args.device), "records": records}

    def write(ratio_values: dict) -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result(ratio_values), indent=1) + "\n")

    def note(record):
        print(json.dumps(record), flush=True)
        write(ratios(records))  # as it goes: a run cut short keeps what it measured

    with tempfile.TemporaryDirectory(prefix="ur4rec-bench-") as tmp:
        work = Path(tmp)
        for dataset in datasets:
            for stage in (int(x) for x in args.stages.split(",")):
                # --quick: the faster of two rounds where the ratios are read (stage 1), one elsewhere.
                repeats = 1 if dataset == "ml-1m" or (args.quick and stage > 1) else 2
                stage_obj = build_stage(stage, dataset, data, work, args.device)
                counts = (64,) if (args.quick and stage == 3) else (64, 256)
                # The centralized floor only for stage 1 (for stages 2-3 one batch of all the clients'
                # [positions, candidates, hidden] tensors takes 6-10 GiB).
                bench_rounds(stage_obj, stage, dataset, counts, backends, repeats, records, note, floor=stage == 1)
                if stage == 2:
                    bench_stage2_cache(stage_obj, dataset, records, note)
                # Full ranking with the stage-3 experts scores every (user, item) pair through them:
                # minutes on ML-1M, so ML-1M evaluation is timed in stage 1 only.
                if stage == 1 or (dataset == "ml-100k" and (stage == 2 or not args.quick)):
                    bench_evaluation(stage_obj, stage, dataset, 3 if stage == 1 else repeats, records, note)
                del stage_obj
            if not args.skip_recbole and args.device == "cpu":
                max_len = 50
                hidden = 128
                full_epoch = not args.quick and dataset == "ml-100k"
                bench_recbole(dataset, data, work, hidden, max_len, None if full_epoch else (10 if args.quick else 40),
                              None if full_epoch else (2 if args.quick else 10), records, note)
    ratio_values = ratios(records)
    write(ratio_values)
    print(json.dumps({"ratios": ratio_values, "seconds_total": result(ratio_values)["seconds_total"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
