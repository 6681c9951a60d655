"""The loop both trainers share: train a unit (a federated round or a centralized epoch), validate
every N units, keep the best checkpoint, stop early, log one metrics line per unit, test once."""
from __future__ import annotations

import time

import torch
from recbole.trainer import Trainer
from tqdm import tqdm

from . import compat
from .runs import CHECKPOINT, RunFolder
from .stages import read_checkpoint


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
        self.best_round = None
        self.best_valid = None

    def units(self) -> int:
        raise NotImplementedError

    def train_unit(self, index: int, train_data, show_progress: bool) -> tuple[dict, int]:
        """Train one unit; return (mean loss/gate stats, bytes uploaded)."""
        raise NotImplementedError

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=True, callback_fn=None):
        """train_data: TrainingWindows; valid_data: a TwoProtocolEvaluator. `callback_fn(record)` sees
        every metrics line (Ray Tune reports through it)."""
        ev = self.settings["eval"]
        best_score, stale = None, 0
        bar = tqdm(range(1, self.units() + 1), desc=f"{self.unit}s", disable=not show_progress)
        for index in bar:
            start = time.time()
            stats, bytes_up = self.train_unit(index, train_data, show_progress)
            record = {self.unit: index, **_record_stats(stats), "gamma": float(self.model.gamma),
                      "trainable_params": self.trainable_params, "bytes_up": bytes_up}
            if index % ev["every"] == 0 or index == self.units():
                record["valid"] = valid_data.evaluate(self.model, "valid")
                score = record["valid"][ev["protocol"]][ev["metric"]]
                if best_score is None or score > best_score:
                    best_score, stale = score, 0
                    self.best_round, self.best_valid = index, record["valid"]
                    self.run.save_checkpoint(self.model.state_dict(), {**self.meta, "round": index})
                else:
                    stale += 1
                bar.set_postfix(loss=f"{record['loss']:.4f}", **{ev["metric"]: f"{score:.4f}"},
                                best=f"{best_score:.4f}")
            record["seconds"] = round(time.time() - start, 3)
            self.run.append_metrics(record)
            if callback_fn is not None:
                callback_fn(record)
            if stale >= ev["patience"]:
                tqdm.write(f"early stop: no {ev['metric']} gain in {stale} validations")
                break
        return best_score, self.best_valid

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """eval_data: a TwoProtocolEvaluator; scores the test split once, from the best checkpoint."""
        if load_best_model:
            state = read_checkpoint(model_file or str(self.run.path / CHECKPOINT))["state_dict"]
            self.model.load_state_dict(state)
        return eval_data.evaluate(self.model, "test")


def _record_stats(stats: dict) -> dict:
    out = {k: float(stats[k]) for k in ("loss", "rec_loss", "align_loss", "lb_loss")}
    router, align = stats.get("router_weights"), stats.get("align_weights")
    out["router_visual"], out["router_text"] = (None, None) if router is None else map(float, router)
    out["align_visual"], out["align_text"] = (None, None) if align is None else map(float, align)
    return out
