"""Stock RecBole sequential models (SASRec, GRU4Rec), trained centrally by RecBole's own `Trainer`,
on exactly the data, leave-one-out split and evaluation of our stage runs; and popularity (`Pop`,
popularity.py), which trains nothing and is scored the same way.

The data comes through `pipeline.Split` (the same filtering, split and RecBole training loader of
every prefix as a stage of the same config), the model is RecBole's class with its own CE loss, and
each epoch is RecBole's `Trainer._train_epoch`, run as the unit of the loop our stages use
(`training.RoundTrainer`), so a baseline resumes from its last finished epoch. Validation and the
final test use our `TwoProtocolEvaluator`, so the uni100 negatives are the ones our stage runs of
the same seed use. The run folder has the layout ours have, so `run.py report` reads it unchanged.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from .. import compat
from ..errors import UserError
from ..pipeline import Split, recbole_settings
from ..runs import OPTIONS, atomic_write, check_fresh
from ..training import RoundTrainer, final_evaluation

# The config keys each trained model reads; summary.json records their values.
MODELS = {
    "SASRec": ("n_layers", "n_heads", "hidden_size", "inner_size", "hidden_dropout_prob", "attn_dropout_prob"),
    "GRU4Rec": ("embedding_size", "hidden_size", "num_layers", "dropout_prob"),
}
POPULARITY = "Pop"  # items ranked by their training interactions: no training, no options


def model_name(text: str) -> str:
    """The canonical model name for `text` (case-insensitive)."""
    for name in (*MODELS, POPULARITY):
        if text.lower() == name.lower():
            return name
    raise UserError(f"--model {text!r}: not a baseline model; choose one of {', '.join(MODELS)}, {POPULARITY}")


def baseline_settings(cfg: dict, model: str, epochs: int, learning_rate: float | None,
                      batch_size: int | None) -> dict:
    settings = recbole_settings(cfg)
    # optim.learning_rate is tuned for our trainers (a federated client's SGD step); the stock model
    # trains with RecBole's learner and RecBole's default rate unless one is asked for.
    del settings["learning_rate"]
    if learning_rate is not None:
        settings["learning_rate"] = learning_rate
    if batch_size is not None:
        settings["train_batch_size"] = batch_size
    if model == "GRU4Rec":
        # Same width and dropout as our backbone; GRU4Rec's own defaults (64/128, 0.3) differ.
        settings["embedding_size"] = cfg["model"]["hidden_size"]
        settings["dropout_prob"] = cfg["model"]["hidden_dropout_prob"]
    settings["epochs"] = epochs
    return settings


class _UntilDeadline:
    """RecBole's training loader, cut short at `deadline`: `_train_epoch` ends when iteration does.
    At least one batch always runs, so every epoch that starts has something to validate."""

    def __init__(self, loader, deadline: float):
        self.loader, self.deadline = loader, deadline
        self.batches, self.cut = 0, False

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            if self.batches and time.time() >= self.deadline:
                self.cut = True
                return
            self.batches += 1
            yield batch


class BaselineTrainer(RoundTrainer):
    """RecBole's own epoch (`Trainer._train_epoch`: its optimizer, CE loss and loader) as the unit of
    the loop our stages use, so a baseline validates, keeps its best checkpoint, stops early and
    resumes exactly as they do. The time limit cuts the epoch it falls in, which is still validated."""

    unit = "epoch"

    def __init__(self, recbole_config, model, settings, run, meta, epochs: int, deadline: float, limits: str,
                 loader_generator):
        super().__init__(recbole_config, model, settings, run, meta)
        self.epochs, self.deadline, self.limits = epochs, deadline, limits
        self.loader_generator = loader_generator
        self.batches = None

    def units(self) -> int:
        return self.epochs

    def train_unit(self, index, train_data, show_progress):
        self.batches = _UntilDeadline(train_data, self.deadline)
        total = self._train_epoch(self.batches, index - 1, show_progress=show_progress)
        return {"loss": total / self.batches.batches}, 0

    def unit_record(self, stats: dict) -> dict:
        return {"loss": stats["loss"], "batches": self.batches.batches, "batches_per_epoch": len(self.batches)}

    def stop_reason(self) -> str | None:
        last = self.records[-1]  # read from the records, so a resumed run's summary still says why
        if last["batches"] < last["batches_per_epoch"]:
            return (f"the {self.limits} limit cut epoch {last['epoch']} after {last['batches']} of "
                    f"{last['batches_per_epoch']} batches")
        if self.out_of_time():
            return f"the {self.limits} limit was reached after epoch {self.completed}"
        return super().stop_reason()

    def out_of_time(self) -> bool:
        """Stopped (or about to stop) by the time limit before its epoch budget was spent."""
        last = self.records[-1]
        return last["batches"] < last["batches_per_epoch"] or (
            time.time() >= self.deadline and self.completed < self.epochs)

    # RecBole's loader draws each epoch's order from its own generator, which a resumed run must continue.
    def extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "loader_rng": self.loader_generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader_generator.set_state(state["loader_rng"])


class Baseline:
    """A stock model and our split, built and checked; `run()` trains (or resumes), tests and writes
    the run folder."""

    def __init__(self, cfg: dict, where: str, model: str, epochs: int, max_minutes: float | None = None,
                 learning_rate: float | None = None, batch_size: int | None = None):
        from recbole.utils import init_seed

        from .. import stages

        self.model_name = model_name(model)
        _check_budget(epochs, max_minutes, learning_rate, batch_size)
        self.cfg, self.epochs, self.max_minutes, self.started = cfg, epochs, max_minutes, time.time()
        self.options = {"model": self.model_name, "learning_rate": learning_rate, "batch_size": batch_size}
        model_class = compat.import_sequential(self.model_name)
        settings = baseline_settings(cfg, self.model_name, epochs, learning_rate, batch_size)
        self.split = Split.load(cfg, where, model_class, settings)
        init_seed(cfg["seed"], True)
        self.model = model_class(self.split.rb_config, self.split.train.dataset).to(self.split.rb_config["device"])
        self.evaluator = self.split.evaluator(cfg)
        self.groups: dict[str, int] = {}
        for name, param in self.model.named_parameters():
            self.groups[stages.group_of(name)] = self.groups.get(stages.group_of(name), 0) + param.numel()
        self.fingerprint = stages.vocabulary_fingerprint(self.split.item_tokens)

    def hyperparameters(self) -> dict:
        rb = self.split.rb_config
        return {k: rb[k] for k in ("learner", "learning_rate", "train_batch_size", "weight_decay", "loss_type",
                                   "MAX_ITEM_LIST_LENGTH", *MODELS[self.model_name])}

    def describe(self) -> str:
        ds = self.split.dataset
        users = int(np.count_nonzero(np.diff(ds.sequence_offsets)))
        hp = ", ".join(f"{k} {v}" for k, v in self.hyperparameters().items())
        return (f"baseline {self.model_name} (stock RecBole, centralized) on {self.cfg['data']['dataset']}: "
                f"{users} users, {len(self.split.item_tokens) - 1} items, {len(self.split.train)} batches per "
                f"epoch; {sum(self.groups.values()):,} trainable parameters\n  {hp}\n  budget: {self._limits()}")

    def _limits(self) -> str:
        minutes = f" or {self.max_minutes:g} minutes of training and validation in this session, whichever " \
                  f"comes first" if self.max_minutes else ""
        return f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}{minutes}"

    def run(self, show_progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
        from ..runs import RunFolder, machine_info

        cfg = self.cfg
        run = RunFolder(cfg["run_dir"])
        if resume:
            state = run.load_state()
            _check_options(run.path, self.options, self.epochs)
        else:
            run.create(cfg, overwrite, "baseline")
        atomic_write(run.path / OPTIONS, lambda p: p.write_text(json.dumps(
            {**self.options, "epochs": self.epochs}, indent=2) + "\n"))
        meta = {"dataset": cfg["data"]["dataset"], "item_vocabulary": self.fingerprint,
                "n_items": len(self.split.item_tokens), "stage": None, "model": self.model_name,
                "hidden_size": cfg["model"]["hidden_size"]}
        # Validation after every epoch (a stage file's eval.every counts rounds); state after each too.
        settings = {**cfg, "eval": {**cfg["eval"], "every": 1}, "state_every": 1}
        deadline = time.time() + 60 * self.max_minutes if self.max_minutes else math.inf
        limits = f"{self.max_minutes:g}-minute" if self.max_minutes else ""
        trainer = BaselineTrainer(self.split.rb_config, self.model, settings, run, meta, self.epochs, deadline,
                                  limits, self.split.train.generator)
        earlier_seconds = 0.0
        if resume:
            trainer.resume_from(state)
            earlier_seconds = sum(record["seconds"] for record in trainer.records)
        trainer.fit(self.split.train, self.evaluator, show_progress=show_progress)
        final = trainer.evaluate(self.evaluator)
        stopped = trainer.stop_reason() if trainer.records else None
        # what a script reads to decide whether to resume: "time" goes on with the same command
        stopped_by = None if not stopped else "time" if trainer.out_of_time() else "patience"
        ran = f"ran {trainer.completed} epoch{'s' if trainer.completed != 1 else ''}"
        budget = f"budget {self._limits()}; " + (f"{ran}, stopped early: {stopped}." if stopped else f"{ran}.")
        summary = {"stage": None, "name": cfg["name"], "trainer": "centralized", "model": self.model_name,
                   "dataset": cfg["data"]["dataset"], "trainable_params": sum(self.groups.values()),
                   "trainable_groups": self.groups, "best_round": trainer.best_round, "valid": trainer.best_valid,
                   "test": final["test"].metrics, "slices": {s: r.slices() for s, r in final.items()},
                   "wall_seconds": round(time.time() - self.started + earlier_seconds, 1),
                   "epochs_run": trainer.completed, "stopped_by": stopped_by, "budget": budget,
                   "hyperparameters": self.hyperparameters(), "seed": cfg["seed"],
                   "machine": machine_info(cfg["device"])}
        run.write_summary(summary)
        return summary


def popularity_run(cfg: dict, where: str, overwrite: bool = False) -> dict:
    """Score `cfg`'s split by popularity on both protocols, write the run folder, return its summary."""
    from ..model.ur4rec_moe import UR4RecMoE
    from .popularity import Popularity, training_counts
    from ..runs import RunFolder, machine_info

    started = time.time()
    # A stage's own model class and settings, so the split and the uni100 negatives are its runs'.
    split = Split.load(cfg, where, UR4RecMoE, recbole_settings(cfg))
    evaluator = split.evaluator(cfg)
    model = Popularity(training_counts(split))
    run = RunFolder(cfg["run_dir"])
    run.create(cfg, overwrite, "baseline")
    atomic_write(run.path / OPTIONS, lambda p: p.write_text(json.dumps({"model": POPULARITY}) + "\n"))
    final = final_evaluation(evaluator, model, run)
    summary = {"stage": None, "name": cfg["name"], "trainer": "none", "model": POPULARITY,
               "dataset": cfg["data"]["dataset"], "trainable_params": 0, "trainable_groups": {},
               "best_round": None, "valid": final["valid"].metrics, "test": final["test"].metrics,
               "slices": {s: r.slices() for s, r in final.items()}, "wall_seconds": round(time.time() - started, 1),
               "epochs_run": 0, "stopped_by": None,
               "budget": "none: every item scores its number of training interactions.",
               "hyperparameters": {}, "seed": cfg["seed"], "machine": machine_info(cfg["device"])}
    run.write_summary(summary)
    return summary


def _check_budget(epochs, max_minutes, learning_rate, batch_size) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"--epochs {epochs!r}: must be a whole number of at least 1")
    if max_minutes is not None and not max_minutes > 0:
        raise UserError(f"--max-minutes {max_minutes!r}: must be positive")
    if learning_rate is not None and not learning_rate > 0:
        raise UserError(f"--learning-rate {learning_rate!r}: must be positive")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size!r}: must be at least 1")


def _check_options(folder: Path, options: dict, epochs: int) -> None:
    """A resumed baseline keeps its model and options; its epoch budget may grow, not shrink."""
    path = folder / OPTIONS
    if not path.is_file():
        raise UserError(f"{folder}: not a baseline run folder to resume (no {OPTIONS})")
    saved = json.loads(path.read_text())
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in options.items() if saved.get(k) != v]
    if changed:
        raise UserError(f"{path}: the baseline was started with other options: {', '.join(changed)}")
    if epochs < saved["epochs"]:
        raise UserError(f"{path}: a resumed baseline's budget can grow, not shrink: --epochs {saved['epochs']} "
                        f"-> {epochs}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="run.py baseline",
        description="Train a stock RecBole model (centralized) on a stage config's data, split and evaluation.")
    parser.add_argument("--config", required=True, help="stage file whose data, seed, model sizes, eval and "
                                                        "run_dir the baseline takes, e.g. yamls/stage1.yaml")
    parser.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}, or {POPULARITY} "
                                                        f"(popularity: trains nothing, takes no other option)")
    parser.add_argument("--epochs", type=int, help="epoch budget (required, except for Pop)")
    parser.add_argument("--max-minutes", type=float, help="time budget for training and validation; the "
                                                          "epoch it ends in is cut short and still validated")
    parser.add_argument("--learning-rate", type=float, help="Adam's learning rate (default: RecBole's, 0.001)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: RecBole's, 2048)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.dataset=ml-1m (repeatable)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", metavar="RUN_DIR",
                       help="continue this baseline from its last finished epoch (the same command, with "
                            "--epochs as large or larger and any --max-minutes)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace an earlier baseline in the run folder (only its files; a folder holding "
                            "anything else is refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from ..config import check_resumable, load_config
    from .report import format_summary

    name = model_name(args.model)
    training = {"--epochs": args.epochs, "--max-minutes": args.max_minutes, "--learning-rate": args.learning_rate,
                "--batch-size": args.batch_size, "--resume": args.resume}
    if name == POPULARITY:
        given = [flag for flag, value in training.items() if value is not None]
        if given:
            raise UserError(f"--model {POPULARITY} trains nothing: drop {', '.join(given)}")
    elif args.epochs is None:
        raise UserError(f"--model {name} needs --epochs (its epoch budget)")
    else:
        _check_budget(args.epochs, args.max_minutes, args.learning_rate, args.batch_size)
    # Naming the run first gives it runs/baseline-<model> unless the file or --set chooses a folder.
    cfg = load_config(args.config, [f"name=baseline-{name.lower()}", *args.set]
                      + ([f"run_dir={args.resume}"] if args.resume else []))
    if args.resume:
        check_resumable(cfg)
    else:
        check_fresh(cfg["run_dir"], args.overwrite, "baseline")
    if name == POPULARITY:
        summary = popularity_run(cfg, args.config, args.overwrite)
    else:
        baseline = Baseline(cfg, args.config, name, args.epochs, args.max_minutes, args.learning_rate,
                            args.batch_size)
        print(baseline.describe(), flush=True)
        summary = baseline.run(show_progress=not args.quiet, resume=bool(args.resume), overwrite=args.overwrite)
        print(summary["budget"])
    print(format_summary(summary))
    print(f"run folder: {cfg['run_dir']}")
