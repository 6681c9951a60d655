"""The loop both trainers share: train a unit (a federated round or a centralized epoch), validate
every N units, keep the best checkpoint, stop early, log one metrics line per unit, test once.

Every `state_every` units the loop saves what it needs to continue exactly (model, optimizer and
sampler state, early-stopping state, every RNG, the metrics so far); `resume_from` picks it up, and
the continued run produces the same metrics, unit by unit, as one never interrupted.
"""
from __future__ import annotations

import json
import random
import time

import numpy as np
import torch
from recbole.trainer import Trainer
from tqdm import tqdm

from . import compat
from .runs import CHECKPOINT, RunFolder, read_checkpoint


class RoundTrainer(Trainer):
    unit = "round"

    def __init__(self, recbole_config, model, settings: dict, run: RunFolder, meta: dict):
        with compat.writes_into(run.path):  # RecBole's Trainer opens log_tensorboard/ in the cwd
            super().__init__(recbole_config, model)
        self.settings = settings
        self.run = run
        self.meta = meta
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.trainable_params = sum(p.numel() for p in self.trainable.values())
        self.completed = 0
        self.finished = False
        self.best_score = None
        self.stale = 0
        self.best_round = None
        self.best_valid = None
        self.records: list[dict] = []

    def units(self) -> int:
        raise NotImplementedError

    def train_unit(self, index: int, train_data, show_progress: bool) -> tuple[dict, int]:
        """Train one unit; return (mean loss/gate stats, bytes uploaded)."""
        raise NotImplementedError

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=True, callback_fn=None):
        """train_data: TrainingWindows; valid_data: a TwoProtocolEvaluator. `callback_fn(record)` sees
        every metrics line after it is written (Ray Tune reports through it); returning True stops
        training there, as early stopping does."""
        ev = self.settings["eval"]
        last = self.completed if self.finished else self.units()  # a stopped run resumed as it was stays stopped
        bar = tqdm(range(self.completed + 1, last + 1), desc=f"{self.unit}s", initial=self.completed,
                   total=self.units(), disable=not show_progress or self.finished)
        for index in bar:
            start = time.time()
            stats, bytes_up = self.train_unit(index, train_data, show_progress)
            record = {self.unit: index, "passes": round(self.passes(index), 4), **self.unit_record(stats),
                      "trainable_params": self.trainable_params, "bytes_up": bytes_up}
            if index % ev["every"] == 0 or index == self.units():
                valid = valid_data.evaluate_users(self.model, "valid")
                record["valid"], record["slices"] = valid.metrics, valid.slices()
                score = record["valid"][ev["protocol"]][ev["metric"]]
                if self.best_score is None or score > self.best_score:
                    self.best_score, self.stale = score, 0
                    self.best_round, self.best_valid = index, record["valid"]
                    self.run.save_checkpoint(self.model.state_dict(), {**self.meta, "round": index})
                else:
                    self.stale += 1
                bar.set_postfix(loss=f"{record['loss']:.4f}", **{ev["metric"]: f"{score:.4f}"},
                                best=f"{self.best_score:.4f}")
            record["seconds"] = round(time.time() - start, 3)
            self.records.append(record)
            self.run.write_metrics(self.records)
            self.completed = index
            stop = bool(callback_fn is not None and callback_fn(record))
            reason = self.stop_reason()
            if reason:
                tqdm.write(f"early stop: {reason}")
                stop = True
            self.finished = stop or index == self.units()
            every = self.settings["state_every"]
            if self.finished or (every and index % every == 0):
                self.run.save_state(self.state())
            if stop:
                break
        return self.best_score, self.best_valid

    def passes(self, index: int) -> float:
        """Passes over the users' training data after `index` units (a centralized epoch is one; a
        federated round is its clients over all users): the x axis on which run.py curves compares
        trainers."""
        return float(index)

    def unit_record(self, stats: dict) -> dict:
        """The training fields of a unit's metrics line."""
        return {**_record_stats(stats), "gamma": float(self.model.gamma.detach())}

    def summary_extra(self) -> dict:
        """Trainer-specific fields of summary.json."""
        return {}

    def stop_reason(self) -> str | None:
        """Why training stops after the unit just trained (None: it goes on to its budget)."""
        ev = self.settings["eval"]
        return f"no {ev['metric']} gain in {self.stale} validations" if self.stale >= ev["patience"] else None

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """eval_data: a TwoProtocolEvaluator. Scores the best checkpoint on valid and on the test split
        (read once, here), writes their per-user values into the run folder and returns
        {split: UserMetrics}."""
        if load_best_model:
            state = read_checkpoint(model_file or str(self.run.path / CHECKPOINT))["state_dict"]
            self.model.load_state_dict(state)
        return final_evaluation(eval_data, self.model, self.run)

    # ------------------------------------------------------------------ resumable state
    def extra_state(self) -> dict:
        """Trainer-specific state (optimizers, samplers): tensors, or JSON text."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state(self) -> dict:
        """Everything needed to continue exactly; tensors and JSON text only (loads weights_only)."""
        plain = {"completed": self.completed, "finished": self.finished, "best_score": self.best_score,
                 "stale": self.stale, "best_round": self.best_round, "best_valid": self.best_valid,
                 "records": self.records, "python_rng": random.getstate(),
                 "numpy_rng": _numpy_global_state()}
        state = {"model": self.model.state_dict(), "torch_rng": torch.get_rng_state(),
                 "plain": json.dumps(plain), "extra": self.extra_state()}
        device = self._device()
        if device.type == "cuda":  # dropout masks on a GPU come from its own generator
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        return state

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def resume_from(self, state: dict) -> None:
        plain = json.loads(state["plain"])
        self.model.load_state_dict(state["model"])
        torch.set_rng_state(state["torch_rng"])
        if self._device().type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self._device())
        version, internal, gauss = plain["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = plain["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        for key in ("completed", "finished", "best_score", "stale", "best_round", "best_valid", "records"):
            setattr(self, key, plain[key])
        # A run that ended on its budget or its patience goes on when resumed with a larger one.
        if self.finished and self.completed < self.units() and self.stale < self.settings["eval"]["patience"]:
            self.finished = False
        self.load_extra_state(state["extra"])


def final_evaluation(evaluator, model, run: RunFolder) -> dict:
    """{split: UserMetrics} of `model` on valid and test, each split's per-user values written into
    `run`, so two runs can be compared user by user (compare.py)."""
    out = {}
    for split in ("valid", "test"):
        out[split] = evaluator.evaluate_users(model, split)
        run.write_per_user(split, out[split])
    return out


def _numpy_global_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _record_stats(stats: dict) -> dict:
    out = {k: float(stats[k]) for k in ("loss", "rec_loss", "align_loss", "lb_loss")}
    router, align = stats.get("router_weights"), stats.get("align_weights")
    out["router_visual"], out["router_text"] = (None, None) if router is None else map(float, router)
    out["align_visual"], out["align_text"] = (None, None) if align is None else map(float, align)
    return out
