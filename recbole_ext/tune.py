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

trials.csv, best.yaml and the figures are written by analysis/sweep_report.py.

Ray is imported inside the functions that use it: nothing else in the project needs it.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import compat  # noqa: F401  (numpy aliases before any RecBole import, in the driver and in trials)
from .analysis.sweep_report import metric_key, report, reported_metrics, row_of, trial_line, units_of, values_text
from .config import dump, load_config, with_values
from .defaults import ray_runtime_env
from .errors import UserError
from .runs import CHECKPOINT, STATE, entry_names, listing, read_metrics

SWEEP_CONFIG = "sweep.yaml"
HOLD_ENV = "UR4REC_TUNE_HOLD"  # tests only: see _Reporter.hold


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
        cfg = load_config(sweep_dir / SWEEP_CONFIG, saved=True)
        report(cfg, sweep_dir, _saved_trials(sweep_dir), final=False, planned=_planned_trials(cfg))
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
    return report(cfg, sweep_dir, trials, final=True, planned=_planned_trials(cfg))




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
    # (a test's hold is passed on too, as a cluster's workers do not share our environment)
    runtime_env = ray_runtime_env({HOLD_ENV: os.environ[HOLD_ENV]} if os.environ.get(HOLD_ENV) else None)
    local = {} if t["address"] else {"num_cpus": t["num_cpus"], "include_dashboard": False}
    ray.init(address=t["address"], log_to_driver=False, runtime_env=runtime_env, **local)
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
        scheduler = ASHAScheduler(time_attr="round", max_t=units_of(cfg), grace_period=min(t["grace_period"],
                                  units_of(cfg)), reduction_factor=t["reduction_factor"], stop_last_trials=False)
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
                      f"({values_text(trial.config, cfg)})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, error=None, **info):
            self.catch_up(trials, trial)
            row = row_of(cfg, Path(trial.path), trial.config, trial.last_result, error)
            self.record(row, trial.trial_id)
            print(trial_line(row, cfg), flush=True)
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
        self.held = False

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
        self.hold(index)
        return self.diverged_round is not None

    def hold(self, index: int) -> None:
        """A hook for tests only; without $UR4REC_TUNE_HOLD a run is unchanged. With it set to PATH, the
        first validation round of a trial whose run folder already holds a resumable state (state.pt,
        which a round saves after its callback: with state_every and eval.every 1, round 2) writes
        PATH.<trial folder name> after reporting, and waits while that file exists. So a test can
        interrupt a trial that is provably mid-run and resumable (Tune then kills the held worker after
        its 10 s stop timeout), or let it go on by deleting the file."""
        path = os.environ.get(HOLD_ENV)
        if not path or self.held or not (self.run_dir / STATE).is_file():
            return
        self.held = True
        marker = Path(f"{path}.{self.run_dir.parent.name}")
        marker.write_text(f"{index}\n")  # the round it holds after
        while marker.exists():
            time.sleep(0.2)


def diverges(loss: float, first_loss: float, factor: float) -> bool:
    return not math.isfinite(loss) or loss > factor * first_loss




def _flat_metrics(valid: dict | None, cfg: dict) -> dict:
    """Validation metrics as flat result keys (`full_ndcg@10`, ...). Before any validation a diverged
    trial reports the worst value, as Tune needs the metric in every report."""
    worst = 0.0 if cfg["tune"]["mode"] == "max" else 1.0
    return {f"{p}_{m}": valid[p][m] if valid else worst for p in ("full", "uni100") for m in reported_metrics(cfg)}



































