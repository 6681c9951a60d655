"""One stage run: config -> dataset + features + memory -> model -> trainer -> run folder.

Everything that can be wrong with the inputs is checked before the run folder is created, so a bad
config, data file or checkpoint leaves nothing behind.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import compat
from .errors import UserError

TOP_K = 20  # the largest cutoff of the reported metrics
_STAGE_NAMES = {1: "pretrain_sasrec", 2: "align_projectors", 3: "finetune_moe"}


def recbole_settings(cfg: dict) -> dict:
    """The RecBole config for a stage. Evaluation is RecBole's full-sort path; the sampled protocol
    is gathered from it (see evaluation.py)."""
    from .model.ur4rec_moe import model_settings

    data = cfg["data"]
    return {
        "data_path": data["path"], "checkpoint_dir": cfg["run_dir"],
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": data["max_seq_length"],
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [5, 10, TOP_K], "valid_metric": cfg["eval"]["metric"].upper(),
        "eval_batch_size": cfg["eval"]["batch_size"],
        "seed": cfg["seed"], "reproducibility": True, "device": cfg["device"], "use_gpu": cfg["device"] != "cpu",
        "show_progress": False, "learning_rate": cfg["optim"]["learning_rate"],
        **model_settings(cfg),
    }


def check_device(device: str, where: str) -> None:
    """Refuse a CUDA `device` this machine cannot give, before any data is read."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise UserError(f"{where}: device {device!r}: no CUDA device is available to torch {torch.__version__} "
                        f"(a CPU build, or no GPU visible); set device: cpu, or install a CUDA build of torch "
                        f"(docs/DEVICES.md)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"{where}: device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def set_determinism(deterministic: bool) -> None:
    """torch's deterministic kernels on or off for this process (a stage run owns it). cuBLAS needs
    its workspace setting before its first call on a GPU, so this runs before the model moves there.
    An operation without a deterministic CUDA kernel warns (naming itself) rather than stop a run."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # the call imports torch's compiler stack (about a second, in every process: each Flower message
    # is one), so a process that stays at the default, off, does not make it
    if deterministic or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(deterministic, warn_only=True)


@dataclass
class Split:
    """A config's dataset and leave-one-out split as RecBole builds them: every run that reports
    numbers next to ours (stages, stock baselines) loads its data through `Split.load`."""

    rb_config: object
    dataset: object  # UR4RecDataset
    train: object  # RecBole's training loader: every prefix of each user's training sequence
    valid: object  # full-sort evaluation loaders
    test: object
    item_tokens: list  # raw item tokens in internal-id order, [PAD] first

    @classmethod
    def load(cls, cfg: dict, where: str, model_class, settings: dict) -> "Split":
        """`model_class` only tells RecBole's Config which defaults to load; the data and the split do
        not depend on it."""
        from recbole.data import data_preparation
        from recbole.utils import init_seed

        from .data.atomic import check_interactions
        from .data.dataset import UR4RecDataset

        check_device(cfg["device"], where)
        data = cfg["data"]
        inter = Path(data["path"]) / data["dataset"] / f"{data['dataset']}.inter"
        if not inter.is_file():
            raise UserError(f"{where}: data.path/data.dataset point to {inter}, which does not exist "
                            f"(for ML-100K run `python run.py prepare ml100k --out {data['path']}`)")
        check_interactions(inter)
        rb_config = compat.recbole_config(model_class, data["dataset"], settings)
        init_seed(cfg["seed"], True)
        dataset = UR4RecDataset(rb_config, max_users=data["max_users"])
        train, valid, test = data_preparation(rb_config, dataset)
        item_tokens = list(dataset.field2id_token[dataset.iid_field])
        if len(item_tokens) - 1 <= TOP_K:
            raise UserError(f"{inter}: {len(item_tokens) - 1} items; ranking metrics at {TOP_K} need more")
        return cls(rb_config, dataset, train, valid, test, item_tokens)

    def evaluator(self, cfg: dict):
        """Both protocols on valid and test, with `cfg`'s slices; the uni100 negatives depend only on
        the data and the seed."""
        from .evaluation import TwoProtocolEvaluator

        return TwoProtocolEvaluator(self.rb_config, self.dataset, {"valid": self.valid, "test": self.test},
                                    cfg["seed"], cfg["eval"]["item_count_bins"], cfg["eval"]["history_quantiles"],
                                    cfg["eval"]["sample_users"])


def build_model(cfg: dict, rb_config, dataset, side, item_tokens, where: str):
    """(the config's model with its checkpoints' groups loaded and its trainable set applied, {group:
    checkpoint}); `side`: its features and memory (None: from `dataset`, a UR4RecDataset). Built on
    the CPU and then moved, so a run starts from the same weights on every device."""
    from recbole.utils import init_seed

    from .model.ur4rec_moe import UR4RecMoE
    from . import stages

    init_seed(cfg["seed"], True)
    model = UR4RecMoE(rb_config, dataset, side)
    loaded = stages.load_groups(model, cfg["load"], stages.vocabulary_fingerprint(item_tokens))
    stages.apply_trainable(model, cfg["trainable"], where)
    model.set_precision(cfg["precision"])
    return model.to(cfg["device"]), loaded


class Stage:
    """Everything a stage needs, built and checked; `run()` trains, tests and writes the run folder."""

    def __init__(self, cfg: dict, where: str):
        from .data.sequences import build_training_windows
        from .federated.privacy import check_settings as check_privacy_settings
        from .model.ur4rec_moe import UR4RecMoE
        from . import stages

        self.cfg, self.where, self.started = cfg, where, time.time()
        set_determinism(cfg["deterministic"])
        data = cfg["data"]
        split = Split.load(cfg, where, UR4RecMoE, recbole_settings(cfg))
        self.rb_config, self.dataset, self.item_tokens = split.rb_config, split.dataset, split.item_tokens
        # Features and memory come from the dataset (data.*_features, model.memory via recbole_settings).
        self.model, self.loaded = build_model(cfg, self.rb_config, self.dataset, None, self.item_tokens, where)
        self.fingerprint = stages.vocabulary_fingerprint(self.item_tokens)
        if cfg["trainer"] == "federated":  # a bad server_lr_groups pattern stops the run before it starts
            stages.check_server_rate_patterns(self.model, cfg["federated"], where)
            check_privacy_settings(cfg, where)
        windows = build_training_windows(self.dataset, split.train.dataset, data["max_seq_length"])
        self.gradientless = stages.freeze_gradientless(self.model, windows)
        self.windows = windows.to(cfg["device"])
        self.trainable = stages.trainable_counts(self.model)
        stages.check_expectations(self.trainable, cfg["expect"], where)
        self.evaluator = split.evaluator(cfg)

    def describe(self) -> str:
        from . import stages

        c = self.cfg
        text = "yes" if c["data"]["text_features"] else "no"
        image = "yes" if c["data"]["image_features"] else "no (visual expert masked)"
        head = (f"stage {c['stage']} ({_STAGE_NAMES[c['stage']]}), {c['trainer']} on {c['data']['dataset']}: "
                f"{len(self.windows.clients)} users, {len(self.item_tokens) - 1} items; "
                f"text features: {text}; image features: {image}")
        return head + "\n" + stages.describe(self.model, self.trainable, self.loaded, self.gradientless)

    def run(self, show_progress: bool = True, callback_fn=None, resume: bool = False,
            overwrite: bool = False) -> dict:
        from .centralized import CentralizedTrainer
        from .federated.trainer import FederatedTrainer
        from .runs import RunFolder, machine_info

        cfg = self.cfg
        run = RunFolder(cfg["run_dir"])
        if resume:
            state = run.load_state()
        else:
            run.create(cfg, overwrite)
        meta = {"dataset": cfg["data"]["dataset"], "item_vocabulary": self.fingerprint,
                "n_items": len(self.item_tokens), "stage": cfg["stage"],
                "text_dim": cfg["model"]["text_dim"], "image_dim": cfg["model"]["image_dim"],
                "hidden_size": cfg["model"]["hidden_size"]}
        if cfg["trainer"] == "federated":
            trainer = FederatedTrainer(self.rb_config, self.model, cfg, run, meta, self.windows)
        else:
            trainer = CentralizedTrainer(self.rb_config, self.model, cfg, run, meta)
        earlier_seconds = 0.0
        if resume:
            trainer.resume_from(state)
            run.write_config(cfg)  # a grown budget is now the one a later resume must match
            earlier_seconds = sum(record["seconds"] for record in trainer.records)
        trainer.fit(self.windows, self.evaluator, show_progress=show_progress, callback_fn=callback_fn)
        final = trainer.evaluate(self.evaluator)
        summary = {"stage": cfg["stage"], "name": cfg["name"], "trainer": cfg["trainer"], "model": "UR4Rec-MoE",
                   "seed": cfg["seed"], "dataset": cfg["data"]["dataset"],
                   "trainable_params": sum(self.trainable.values()), "trainable_groups": self.trainable,
                   "best_round": trainer.best_round, "rounds_run": trainer.completed, "valid": trainer.best_valid,
                   "test": final["test"].metrics, "slices": {s: r.slices() for s, r in final.items()},
                   "wall_seconds": round(time.time() - self.started + earlier_seconds, 1),
                   "machine": machine_info(), **trainer.summary_extra()}
        run.write_summary(summary)
        return summary


def trained_stage(run_dir: str, sets: list[str] = ()) -> Stage:
    """The Stage of a finished run folder, its model holding the run's best checkpoint; `sets`: config
    overrides. The folder is only read, and nothing is loaded from earlier stages: the checkpoint holds
    every parameter."""
    from .config import load_config
    from .runs import CHECKPOINT, CONFIG, read_checkpoint

    folder = Path(run_dir)
    if not (folder / CONFIG).is_file() or not (folder / CHECKPOINT).is_file():
        raise UserError(f"{folder}: not a run folder with a best checkpoint ({CONFIG} and {CHECKPOINT})")
    stage = Stage(load_config(folder / CONFIG, ["load=[]", *sets], saved=True), str(folder / CONFIG))
    stage.model.load_state_dict(read_checkpoint(str(folder / CHECKPOINT))["state_dict"])
    return stage
