"""Ray Tune sweeps over stage runs.

`python run.py tune --config yamls/tune_stage2.yaml` samples the config keys declared in `tune.space`,
runs each trial as one in-process stage run (`Stage.run`) that reports every validation round to Tune
(ASHA prunes on those reports), stops a trial whose loss diverges, and writes the sweep folder:

    sweep.yaml      the resolved config the sweep started from (`--resume` reads it back)
    trial_<id>/     Tune's trial folder; run/ inside is the trial's run folder (metrics.jsonl, best.pt, ...)
    trials.csv      one row per trial: its values, status ok|pruned|diverged|error (|unfinished: --report of
                    a sweep still running), best validation metrics
    best.yaml       the config with the winning values, runnable with `run.py --config`
    stability.png   learning rate x projector init gain, each trial's best metric, diverged trials marked
    loss_curves.png training loss per round of the best stable trial, the worst one and the diverged ones

Ray is imported inside the functions that use it: nothing else in the project needs it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import compat  # noqa: F401  (numpy aliases before any RecBole import, in the driver and in trials)
from .config import dump, get, load_config, with_values
from .errors import UserError
from .analysis.plotting import pyplot
from .runs import CHECKPOINT, STATE, entry_names, listing, read_metrics

SWEEP_CONFIG = "sweep.yaml"
_PACKAGE_DIR = Path(__file__).resolve().parent
_PREFERRED_AXES = ("federated.server_lr", "optim.learning_rate", "model.projector_init_gain")
# Stage 2 succeeds when its best validation HR@10 is at most _CRITERION_GAP below stage 1's and its
# last validated round keeps at least 1 - _CRITERION_DROP of its best value of the sweep's metric. The
# hold test is on the fixed validation users: a round's training loss comes from other clients each
# round, so a falling loss says nothing (docs/TUNING.md).
_CRITERION_GAP = 0.05
_CRITERION_DROP = 0.1


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run.py tune", description="Sweep a stage's config with Ray Tune.")
    parser.add_argument("--config", help="sweep file, e.g. yamls/tune_stage2.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set tune.trials=4 (repeatable)")
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep")
    parser.add_argument("--report", metavar="SWEEP_DIR",
                        help="write trials.csv and the plots from the trials so far (of a running, stopped or "
                             "finished sweep); trials that have not ended are 'unfinished'")
    args = parser.parse_args(argv)
    if args.report:
        if args.config or args.set or args.resume:
            raise UserError("--report reads a sweep folder as it is; drop --config, --set and --resume")
        sweep_dir = _sweep_folder(args.report)
        report(load_config(sweep_dir / SWEEP_CONFIG, saved=True), sweep_dir, _saved_trials(sweep_dir), final=False)
        return
    if args.resume:
        if args.config or args.set:
            raise UserError("--resume continues a sweep with the config it started with "
                            "(SWEEP_DIR/sweep.yaml); drop --config and --set")
        sweep_dir = _sweep_folder(args.resume)
        cfg = load_config(sweep_dir / SWEEP_CONFIG, saved=True)
        where = str(sweep_dir / SWEEP_CONFIG)
    elif args.config:
        cfg, where = load_config(args.config, args.set), args.config
        sweep_dir = Path(cfg["tune"]["storage_path"]) / f"{cfg['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        parser.error("--config (a new sweep) or --resume SWEEP_DIR is required")
    sweep(cfg, where, sweep_dir, resume=bool(args.resume))


def _sweep_folder(path: str) -> Path:
    sweep_dir = Path(path).resolve()
    if not (sweep_dir / SWEEP_CONFIG).is_file():
        raise UserError(f"{sweep_dir}: not a sweep folder (it has no {SWEEP_CONFIG})")
    return sweep_dir


def sweep(cfg: dict, where: str, sweep_dir: Path, resume: bool = False) -> list[dict]:
    """Run (or resume) the sweep into `sweep_dir`, write its outputs, print the best trials; return
    the trials.csv rows."""
    from .pipeline import Stage

    if not cfg["tune"]["space"]:
        raise UserError(f"{where}: tune.space is empty; declare at least one key to sweep, e.g. "
                        "optim.learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}")
    _check_trial_device(cfg, where)
    if not resume:
        _check_new(sweep_dir)
        # Build the base config's stage once here, so that a missing checkpoint or feature file stops
        # the sweep with its usual message instead of failing every trial.
        print(Stage(cfg, where).describe(), flush=True)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_CONFIG).write_text(dump(cfg))
    print(f"sweep folder: {sweep_dir}", flush=True)
    _fit(cfg, sweep_dir, resume)
    trials = _saved_trials(sweep_dir)
    if len(trials) < _planned_trials(cfg) or any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        raise SystemExit(f"sweep interrupted; continue it with: python run.py tune --resume {sweep_dir}")
    return report(cfg, sweep_dir, trials, final=True)


def report(cfg: dict, sweep_dir: Path, trials: list, final: bool) -> list[dict]:
    """Write trials.csv, the plots and (`final`: the sweep has ended) best.yaml from Tune's `trials`,
    print the best trials; return the rows."""
    rows = []
    for t in trials:
        row = row_of(cfg, Path(t.path), t.config, t.last_result or {}, t.get_error())
        if t.status not in ("TERMINATED", "ERROR"):
            row["status"] = "unfinished"
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    _write_csv(rows, cfg, sweep_dir / "trials.csv")
    best = ranked(rows, cfg)
    if not final:
        print(f"{sum(r['status'] != 'unfinished' for r in rows)} of {_planned_trials(cfg)} trials ended; "
              "best.yaml is written when the sweep ends")
    elif best and best[0]["status"] in ("ok", "pruned"):
        _write_best(cfg, best[0], sweep_dir)
    else:
        print("no trial finished without diverging or failing: best.yaml not written")
    plot_stability(rows, cfg, sweep_dir / "stability.png")
    plot_loss_curves(rows, cfg, sweep_dir, sweep_dir / "loss_curves.png")
    print(_table(best[:5], cfg))
    print(f"sweep folder: {sweep_dir}")
    return rows


def _check_trial_device(cfg: dict, where: str) -> None:
    """Ray shows a trial only the GPUs it reserved, numbered from 0: a CUDA trial needs
    tune.gpus_per_trial > 0 and device `cuda`; a CPU trial reserves none."""
    device, gpus = cfg["device"], cfg["tune"]["gpus_per_trial"]
    if device.startswith("cuda") and gpus == 0:
        raise UserError(f"{where}: device {device!r} with tune.gpus_per_trial 0: Ray hides every GPU from a "
                        f"trial that reserves none; set tune.gpus_per_trial (e.g. 1, or 0.5 for two trials a GPU)")
    if device.startswith("cuda:"):
        raise UserError(f"{where}: device {device!r}: in a sweep each trial sees its own GPU as `cuda`; "
                        f"set device: cuda")
    if device == "cpu" and gpus > 0:
        raise UserError(f"{where}: tune.gpus_per_trial {gpus:g} with device 'cpu': the trials would hold GPUs "
                        f"they never use; set device: cuda, or tune.gpus_per_trial: 0")


def _check_new(sweep_dir: Path) -> None:
    """A new sweep starts in a folder of its own: Tune and the trials would write over anything there."""
    if not sweep_dir.exists() or sweep_dir.is_dir() and not any(sweep_dir.iterdir()):
        return
    held = "is a file" if not sweep_dir.is_dir() else "already holds " + listing(
        entry_names(sorted(sweep_dir.iterdir())))
    resume = f"continue that sweep with run.py tune --resume {sweep_dir}, or " \
        if (sweep_dir / SWEEP_CONFIG).is_file() else ""
    raise UserError(f"{sweep_dir}: the new sweep's folder {held}; {resume}start this sweep under another name "
                    f"or storage path (--set name=... or --set tune.storage_path=...)")


# ---- the driver: Ray, the Tuner, restore -------------------------------------------------------

def _fit(cfg: dict, sweep_dir: Path, resume: bool) -> None:
    """Run (or continue) the trials."""
    import ray
    from ray import tune

    t = cfg["tune"]
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, our lines only
    # Every report carries a checkpoint and num_to_keep=1 makes each one snapshot the experiment state:
    # that keeps a restore exact, and at a few reports a minute it is no bottleneck, so no warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The trials unpickle `run_trial` by its module, so every worker needs this package: ship it
    # with the job (works for a local Ray and for a cluster, where the project is not installed).
    local = {} if t["address"] else {"num_cpus": t["num_cpus"], "include_dashboard": False}
    ray.init(address=t["address"], log_to_driver=False, runtime_env={"py_modules": [str(_PACKAGE_DIR)]},
             **local)
    try:
        trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg, sweep_dir=str(sweep_dir)),
                                        {"cpu": t["cpus_per_trial"], "gpu": t["gpus_per_trial"]})
        if resume:
            if not tune.Tuner.can_restore(str(sweep_dir)):
                raise UserError(f"{sweep_dir}: Ray Tune cannot restore this sweep (no experiment state)")
            # A failed trial runs again (from its run folder's last saved state, as an unfinished one):
            # what made it fail (a file since fixed, a killed worker) may be gone; if not, it fails again.
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=_param_space(t["space"]),
                               tune_config=_tune_config(cfg),
                               run_config=tune.RunConfig(
                                   name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0,
                                   callbacks=[_progress_callback(cfg)],
                                   checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        tuner.fit()
    finally:
        ray.shutdown()


def _saved_trials(sweep_dir: Path) -> list:
    """The trials as Tune saved them. After Ctrl+C, Tune saves the experiment state (unfinished trials
    PENDING, which is what a restore continues) and only then stops the trials, so the in-memory
    results would show them as terminated; the saved state tells an interrupted sweep from a finished one."""
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(str(sweep_dir)).trials


def _planned_trials(cfg: dict) -> int:
    """Tune runs every grid point once per sample."""
    return cfg["tune"]["trials"] * math.prod(len(spec["values"]) for spec in cfg["tune"]["space"].values()
                                             if spec["type"] == "grid")


def _param_space(space: dict) -> dict:
    from ray import tune

    make = {"loguniform": lambda s: tune.loguniform(s["low"], s["high"]),
            "uniform": lambda s: tune.uniform(s["low"], s["high"]),
            "choice": lambda s: tune.choice(s["values"]),
            "grid": lambda s: tune.grid_search(s["values"])}
    return {key: make[spec["type"]](spec) for key, spec in space.items()}


def _tune_config(cfg: dict):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    t = cfg["tune"]
    scheduler = FIFOScheduler()
    if t["scheduler"] == "asha":
        # stop_last_trials=False: a trial that reaches the last round ends on its own, so it writes
        # its summary like any run.
        scheduler = ASHAScheduler(time_attr="round", max_t=_units(cfg), grace_period=min(t["grace_period"],
                                  _units(cfg)), reduction_factor=t["reduction_factor"], stop_last_trials=False)
    return tune.TuneConfig(
        metric=metric_key(cfg), mode=t["mode"], num_samples=t["trials"], scheduler=scheduler,
        # seeded, so a sweep samples the same trials every time
        search_alg=BasicVariantGenerator(max_concurrent=t["max_concurrent_trials"] or 0, random_state=cfg["seed"]),
        trial_dirname_creator=_trial_dirname)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _progress_callback(cfg: dict):
    """A Tune callback printing one line per ended trial and a sweep status line after it, and a line
    whenever a validation round beats the best so far (defined here, as it subclasses Ray's class)."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            # trial id -> status once ended; trial id -> (metric, trial, round), its best validation
            self.ended, self.bests, self.caught_up = {}, {}, False

        def catch_up(self, trials, current) -> None:
            """A resumed sweep's callback first counts the trials that ended before the restore."""
            if self.caught_up:
                return
            self.caught_up = True
            for t in trials:
                if t is not current and t.status in ("TERMINATED", "ERROR") and t.trial_id not in self.ended:
                    self.record(row_of(cfg, Path(t.path), t.config, t.last_result or {}, t.get_error()), t.trial_id)

        def improve(self, trial_id: str, entry: tuple) -> bool:
            """Keep `entry` (metric, trial, round) as the trial's best if it beats the one held."""
            if not _better(entry[0], self.bests.get(trial_id), cfg):
                return False
            self.bests[trial_id] = entry
            return True

        def record(self, row: dict, trial_id: str) -> None:
            self.ended[trial_id] = row["status"]
            key = f"valid_{metric_key(cfg)}"
            if row["status"] in ("ok", "pruned") and row[key] is not None:
                self.improve(trial_id, (row[key], row["trial"], row["best_round"]))
            else:
                self.bests.pop(trial_id, None)

        def best(self):
            """The best validation so far of the trials that have not diverged or failed, as the ranking."""
            order = sorted(self.bests.values(), key=lambda b: b[0], reverse=cfg["tune"]["mode"] == "max")
            return order[0] if order else None

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.catch_up(trials, trial)
            value = result.get(metric_key(cfg))
            if result.get("diverged") or value is None or math.isnan(value):
                return
            entry = (value, f"trial_{trial.trial_id}", result.get("round"))
            if self.improve(trial.trial_id, entry) and self.best() is entry:
                print(f"sweep: new best valid {metric_key(cfg)} {value:.4f}: {entry[1]} round {entry[2]} "
                      f"({_values_text(trial.config, cfg)})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, error=None, **info):
            self.catch_up(trials, trial)
            row = row_of(cfg, Path(trial.path), trial.config, trial.last_result, error)
            self.record(row, trial.trial_id)
            print(_trial_line(row, cfg), flush=True)
            running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)
            print(sweep_status(self.ended.values(), running, _planned_trials(cfg), self.best(), cfg), flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            # the error file is in the driver's staging folder until Tune syncs it to the sweep folder
            local = Path(trial.error_file) if trial.error_file else None
            error = local.read_text() if local and local.is_file() else trial.get_error()
            self.on_trial_complete(iteration, trials, trial, error=error or "failed")

    return Progress()


def _better(value: float, best, cfg: dict) -> bool:
    return best is None or (value > best[0] if cfg["tune"]["mode"] == "max" else value < best[0])


def sweep_status(ended, running: int, planned: int, best, cfg: dict) -> str:
    """One line: how many trials ended (by status), run and wait, and the best validation so far."""
    ended = list(ended)
    counts = ", ".join(f"{ended.count(s)} {s}" for s in ("ok", "pruned", "diverged", "error"))
    found = f"; best valid {metric_key(cfg)} {best[0]:.4f} ({best[1]}, round {best[2]})" if best else ""
    return (f"sweep: {len(ended)}/{planned} trials ended ({counts}), {running} running, "
            f"{max(planned - len(ended) - running, 0)} waiting{found}")


# ---- one trial, inside a Ray worker ----------------------------------------------------------

def run_trial(values: dict, base: dict, sweep_dir: str) -> None:
    """One trial: the base config with this trial's sampled values, run as one stage run whose
    run folder is `<trial folder>/run`.

    A trial that was still running when the sweep stopped, and that Tune now restores, continues from
    the resumable state its run folder saved last (`state_every`), exactly as if never stopped; one
    stopped before its first save starts again."""
    from ray import tune

    from .pipeline import Stage

    trial = f"trial_{tune.get_context().get_trial_id()}"  # the folder name _trial_dirname gives it
    cfg = with_values(base, {**values, "run_dir": os.path.join(sweep_dir, trial, "run")}, trial)
    resume = (Path(cfg["run_dir"]) / STATE).is_file()
    reporter = _Reporter(cfg, read_metrics(cfg["run_dir"]) if resume else [])
    stage = Stage(cfg, trial)
    try:
        # overwrite: the folder is the trial's own, and holds its earlier start if any
        stage.run(show_progress=False, callback_fn=reporter, resume=resume, overwrite=True)
    except Exception:
        if reporter.diverged_round is None:
            raise
        # After a blow-up the closing test pass may fail (no checkpoint yet, NaN weights); the trial
        # has been reported as diverged, which is what it is.


class _Reporter:
    """`Stage.run`'s per-round callback in a trial: reports each validation round to Tune (with the
    best checkpoint so far) and stops the run when its loss diverges."""

    def __init__(self, cfg: dict, earlier: list[dict]):
        """`earlier`: the metrics records of the rounds run before a resume."""
        self.cfg, self.run_dir = cfg, Path(cfg["run_dir"])
        self.factor = cfg["tune"]["divergence_factor"]
        self.first_loss = earlier[0]["loss"] if earlier else None
        self.diverged_round = None
        self.last_valid = next((r["valid"] for r in reversed(earlier) if "valid" in r), None)

    def __call__(self, record: dict) -> bool:
        from ray import tune

        index = record.get("round", record.get("epoch"))
        if self.first_loss is None:
            self.first_loss = record["loss"]
        if diverges(record["loss"], self.first_loss, self.factor):
            self.diverged_round = index
        elif "valid" not in record:
            return False  # Tune needs the metric in every report, so only validation rounds report
        self.last_valid = record.get("valid", self.last_valid)
        result = {"round": index, "loss": record["loss"], "rec_loss": record["rec_loss"],
                  "align_loss": record["align_loss"], "diverged": self.diverged_round is not None,
                  "diverged_round": self.diverged_round, **_flat_metrics(self.last_valid, self.cfg)}
        with tempfile.TemporaryDirectory() as folder:
            for name in (CHECKPOINT, "metrics.jsonl"):
                if (self.run_dir / name).is_file():
                    shutil.copy(self.run_dir / name, folder)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
        return self.diverged_round is not None


def diverges(loss: float, first_loss: float, factor: float) -> bool:
    return not math.isfinite(loss) or loss > factor * first_loss


def metric_key(cfg: dict) -> str:
    return f"{cfg['tune']['protocol']}_{cfg['tune']['metric']}"


def _flat_metrics(valid: dict | None, cfg: dict) -> dict:
    """Validation metrics as flat result keys (`full_ndcg@10`, ...). Before any validation a diverged
    trial reports the worst value, as Tune needs the metric in every report."""
    worst = 0.0 if cfg["tune"]["mode"] == "max" else 1.0
    return {f"{p}_{m}": valid[p][m] if valid else worst for p in ("full", "uni100") for m in _metrics(cfg)}


def _metrics(cfg: dict) -> list[str]:
    return list(dict.fromkeys(["hit@10", "ndcg@10", cfg["tune"]["metric"]]))


def _units(cfg: dict, values: dict | None = None) -> int:
    """Rounds (or epochs) a run of `cfg` lasts, with a trial's `values` when the sweep varies them."""
    key = "federated.rounds" if cfg["trainer"] == "federated" else "centralized.epochs"
    return (values or {}).get(key, get(cfg, key))


# ---- results: one row per trial, the best config, the plot, the console -------------------------

def row_of(cfg: dict, trial_dir: Path, values: dict, last: dict, error) -> dict:
    """A trial's trials.csv row: `values` are its sampled config values, `last` its last report to Tune,
    `error` what it failed with (or None); the rest comes from its run folder's metrics.jsonl."""
    run_dir = trial_dir / "run"
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    error = _last_line(error)
    if error:
        status = "error"
    elif last.get("diverged"):
        status = "diverged"
    elif (run_dir / "summary.json").is_file() or last.get("round", 0) >= _units(cfg, values):
        status = "ok"  # ended on its own (last round or early stopping), or stopped at its last round
    else:
        status = "pruned"  # stopped by the scheduler before its last round
    protocol, metric = cfg["tune"]["protocol"], cfg["tune"]["metric"]
    sign = 1 if cfg["tune"]["mode"] == "max" else -1
    validated = [r for r in records if "valid" in r and not math.isnan(r["valid"][protocol][metric])]
    best = max(validated, key=lambda r: sign * r["valid"][protocol][metric], default=None)
    row = {"trial": trial_dir.name, **{key: values.get(key) for key in cfg["tune"]["space"]}, "status": status,
           "diverged_round": last.get("diverged_round") if status == "diverged" else None,
           "best_round": best.get("round", best.get("epoch")) if best else None,
           **{f"valid_{p}_{m}": best["valid"][p][m] if best else None
              for p in ("full", "uni100") for m in _metrics(cfg)},
           "rounds_run": len(records),
           "first_loss": records[0]["loss"] if records else None,
           **{f"final_{k}": records[-1][k] if records else None for k in ("loss", "rec_loss", "align_loss")}}
    final = validated[-1]["valid"][protocol][metric] if validated else None
    row[f"final_valid_{protocol}_{metric}"] = final
    stage1 = stage1_hit(cfg)
    row["stage1_valid_hit@10"] = stage1
    if status == "diverged":
        row["criterion"] = "not met"
    elif stage1 is None or len(validated) < 2:  # no trend from a single validation
        row["criterion"] = "unknown"
    else:
        hit_ok = best["valid"][protocol]["hit@10"] >= stage1 - _CRITERION_GAP
        holds = sign * final >= sign * best["valid"][protocol][metric] * (1 - sign * _CRITERION_DROP)
        row["criterion"] = "met" if hit_ok and holds else "not met"
    row["error"] = error
    return row


def stage1_hit(cfg: dict) -> float | None:
    """Stage 1's validation HR@10 on the sweep's protocol, from the summary.json next to the stage-1
    checkpoint this config loads; None when there is none."""
    for entry in cfg["load"]:
        summary = _read_json(Path(entry["checkpoint"]).with_name("summary.json"))
        if summary and summary.get("stage") == 1:
            return summary.get("valid", {}).get(cfg["tune"]["protocol"], {}).get("hit@10")
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(error) -> str | None:
    """The last line of a trial's error (its traceback ends with the exception and its message)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def ranked(rows: list[dict], cfg: dict) -> list[dict]:
    """Trials best first: those that ran stably (ok, pruned) by their best metric, then the rest."""
    key = f"valid_{metric_key(cfg)}"
    sign = 1 if cfg["tune"]["mode"] == "max" else -1
    return sorted(rows, key=lambda r: (r["status"] not in ("ok", "pruned"), r[key] is None,
                                       -sign * (r[key] or 0.0)))


def _write_csv(rows: list[dict], cfg: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


def _write_best(cfg: dict, best: dict, sweep_dir: Path) -> None:
    values = {key: best[key] for key in cfg["tune"]["space"]}
    winner = with_values(cfg, {**values, "name": f"{cfg['name']}-best", "run_dir": str(sweep_dir / "best")},
                         str(sweep_dir / "best.yaml"))
    path = sweep_dir / "best.yaml"
    head = (f"# Best trial of the sweep in {sweep_dir}: {best['trial']}, valid {metric_key(cfg)} "
            f"{best['valid_' + metric_key(cfg)]:.4f} at round {best['best_round']}.\n"
            f"# Run it with: python run.py --config {path}\n")
    path.write_text(head + dump(winner))


def _values_text(values: dict, cfg: dict) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={_short(values.get(k))}" for k in cfg["tune"]["space"])


def _trial_line(row: dict, cfg: dict) -> str:
    values = _values_text(row, cfg)
    key = f"valid_{metric_key(cfg)}"
    found = f", valid {metric_key(cfg)} {row[key]:.4f} (round {row['best_round']})" if row[key] is not None else ""
    extra = (f", diverged in round {row['diverged_round']}" if row["status"] == "diverged"
             else f": {row['error']}" if row["status"] == "error" else "")
    return f"{row['trial']} {row['status']}: {values}{found}{extra}"


def _table(rows: list[dict], cfg: dict) -> str:
    key = f"valid_{metric_key(cfg)}"
    names = [k.rsplit(".", 1)[-1] for k in cfg["tune"]["space"]]
    head = ["trial", *names, "status", key, "best round", "criterion"]
    body = [[r["trial"], *(_short(r[k]) for k in cfg["tune"]["space"]), r["status"],
             "-" if r[key] is None else f"{r[key]:.4f}", str(r["best_round"] or "-"), r["criterion"]] for r in rows]
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths))
    return "\n".join(["best trials:", fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in body])


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_stability(rows: list[dict], cfg: dict, path: Path) -> None:
    """Learning rate x projector init gain (or the first two numeric keys of the space), each trial
    coloured by its best metric; diverged trials a red cross, failed ones a grey square."""
    plt = pyplot()
    space, key = cfg["tune"]["space"], f"valid_{metric_key(cfg)}"
    numeric = [k for k in space
               if rows and all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for r in rows)]
    axes = sorted(numeric, key=lambda k: (k not in _PREFERRED_AXES, _PREFERRED_AXES.index(k)
                                          if k in _PREFERRED_AXES else 0))[:2]
    x_of = (lambda r: r[axes[0]]) if axes else (lambda r: rows.index(r))
    y_of = (lambda r: r[axes[1]]) if len(axes) > 1 else (lambda r: r[key] if r[key] is not None else float("nan"))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    scored = [r for r in rows if r["status"] in ("ok", "pruned") and r[key] is not None]
    if scored:
        points = ax.scatter([x_of(r) for r in scored], [y_of(r) for r in scored], c=[r[key] for r in scored],
                            cmap="viridis", s=70,
                            edgecolors=["black" if r["status"] == "ok" else "none" for r in scored])
        fig.colorbar(points, ax=ax, label=f"best valid {metric_key(cfg)} (ringed: ran every round)")
    for status, marker, color in (("diverged", "x", "red"), ("error", "s", "grey")):
        chosen = [r for r in rows if r["status"] == status]
        if chosen:
            ax.scatter([x_of(r) for r in chosen], [y_of(r) for r in chosen], marker=marker, color=color, s=70,
                       label=status)
        for r in chosen:
            if status == "diverged":
                ax.annotate(f"round {r['diverged_round']}", (x_of(r), y_of(r)), textcoords="offset points",
                            xytext=(0, 8), ha="center", fontsize=8, color="red")
    for axis, name in zip(("x", "y"), axes):
        spec, log = space[name], space[name]["type"] == "loguniform" or _spans_decades([r[name] for r in rows])
        if log:
            getattr(ax, f"set_{axis}scale")("log")
        if "low" in spec:  # show the whole searched range, not only where the samples fell
            low, high = spec["low"], spec["high"]
            pad = (high / low) ** 0.05 if log else 0.05 * (high - low)
            getattr(ax, f"set_{axis}lim")(*((low / pad, high * pad) if log else (low - pad, high + pad)))
    ax.set_xlabel(axes[0] if axes else "trial")
    ax.set_ylabel(axes[1] if len(axes) > 1 else key)
    ax.set_title(f"{cfg['name']}: {len(rows)} trials")
    if any(r["status"] in ("diverged", "error") for r in rows):
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curves(rows: list[dict], cfg: dict, sweep_dir: Path, path: Path, most_diverged: int = 4) -> None:
    """Training loss per round, log scale: the best and the worst trial that ran stably (by the sweep's
    metric) and the `most_diverged` trials that diverged first, each labelled with its values."""
    plt = pyplot()
    colors = {"best": "tab:green", "worst": "tab:blue", "diverged": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    chosen = loss_curve_trials(rows, cfg, most_diverged)
    for row, kind in chosen:
        records = read_metrics(sweep_dir / row["trial"] / "run")
        losses = [r["loss"] if math.isfinite(r["loss"]) else float("nan") for r in records]
        ax.plot([r.get("round", r.get("epoch")) for r in records], losses, color=colors[kind], marker="o", markersize=3,
                label=f"{kind}: {_values_text(row, cfg)}")
    ax.set_yscale("log")
    ax.set_xlabel("round" if cfg["trainer"] == "federated" else "epoch")
    ax.set_ylabel("training loss (mean over the round's clients)")
    ax.set_title(f"{cfg['name']}: training loss")
    if chosen:
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_curve_trials(rows: list[dict], cfg: dict, most_diverged: int) -> list[tuple[dict, str]]:
    """(row, best|worst|diverged) for plot_loss_curves."""
    stable = [r for r in ranked(rows, cfg) if r["status"] in ("ok", "pruned") and r["rounds_run"]]
    diverged = sorted((r for r in rows if r["status"] == "diverged"), key=lambda r: r["diverged_round"] or 0)
    return ([(r, "best") for r in stable[:1]] + [(r, "worst") for r in stable[1:][-1:]]
            + [(r, "diverged") for r in diverged[:most_diverged]])


def _spans_decades(values: list) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 20
