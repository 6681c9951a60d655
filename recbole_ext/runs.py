"""The run folder: config.yaml, metrics.jsonl, summary.json, checkpoints and per-user metrics.

Checkpoints hold tensors and plain metadata only, so they load with `torch.load(weights_only=True)`.
Files are written to a temporary name and renamed, so an interrupted run never leaves half a file.

A fresh run never deletes what it did not write (`check_fresh`): it goes into a new or empty folder,
or, with --overwrite, in place of an earlier run of its kind, removing only that run's files.
"""
from __future__ import annotations

import json
import os
import platform
import pickle
import shutil
import zipfile
from pathlib import Path

import psutil
import torch
import yaml

from .config import dump
from .errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "best.pt"
STATE = "state.pt"  # resumable training state
OPTIONS = "baseline.json"  # a baseline's model, options and epoch budget (baseline.py)
PER_USER = "per_user_{split}.npz"  # each evaluated user's metrics at the end of a run (evaluation.UserMetrics)
# Everything a run writes into its folder: these files, each also as the `.tmp` that atomic_write
# renames, and RecBole's TensorBoard event files (its Trainer writes them through compat.writes_into).
RUN_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINT, STATE, OPTIONS,
             *(PER_USER.format(split=split) for split in ("valid", "test")))
TENSORBOARD = "log_tensorboard"


def machine_info(device: str = "cpu") -> dict:
    """What a timing or a wall time was measured on, for summaries and benchmark records; `gpu` names
    the card when `device` is a CUDA device."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if cpuinfo.exists() else platform.processor()
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(),
            **({"gpu": torch.cuda.get_device_name(device)} if device.startswith("cuda") else {})}


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`: an interrupted write never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def create(self, config: dict, overwrite: bool = False, kind: str = "stage run") -> None:
        """Start a fresh run (`kind`: "stage run" or "baseline") where `check_fresh` allows it,
        removing the earlier run it replaces."""
        for path in check_fresh(self.path, overwrite, kind):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)

    def write_config(self, config: dict) -> None:
        atomic_write(self.path / CONFIG, lambda p: p.write_text(dump(config)))

    def write_metrics(self, records: list[dict]) -> None:
        """Rewrite metrics.jsonl whole, atomically: it never holds a half line."""
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(self.path / METRICS, lambda p: p.write_text(text))

    def save_state(self, state: dict) -> None:
        atomic_write(self.path / STATE, lambda p: torch.save(state, p))

    def load_state(self) -> dict:
        path = self.path / STATE
        if not path.is_file():
            raise UserError(f"{self.path}: nothing to resume (no {STATE}; was state_every 0, or did the "
                            f"run stop before its first save?)")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise UserError(f"{path}: unreadable resume state ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.path / SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))

    def write_per_user(self, split: str, values) -> None:
        """`values`: an evaluation.UserMetrics of `split`."""
        values.save(self.path / PER_USER.format(split=split))

    def save_checkpoint(self, state_dict: dict, meta: dict, name: str = CHECKPOINT) -> Path:
        path = self.path / name
        payload = {"state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()}, "meta": meta}
        atomic_write(path, lambda p: torch.save(payload, p))
        return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / METRICS) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_fresh(folder: str | Path, overwrite: bool = False, kind: str = "stage run") -> list[Path]:
    """Whether a fresh run (`kind`: "stage run" or "baseline") may go into `folder`: yes if it does
    not exist or is empty; with `overwrite`, also if it holds an earlier run of the same kind and
    nothing else. Otherwise a UserError naming the folder, what is in it and what to do instead.
    Returns the earlier run's files and folders, which the fresh run must remove first (config.yaml
    last, so a removal cut short still leaves a folder recognised as a run)."""
    folder = Path(folder)
    elsewhere = "give this run another folder with --set run_dir=DIR (a new or empty one)"
    if not folder.exists() and not folder.is_symlink():
        return []
    if not folder.is_dir():
        raise UserError(f"{folder}: is not a folder; {elsewhere}")
    ours, theirs = _run_entries(folder)
    resumable = folder / STATE in ours
    if theirs:
        way = f"continue the run there with --resume {folder}, or {elsewhere}" if resumable else elsewhere
        raise UserError(f"{folder}: holds {listing(theirs)}, which no run of this project wrote; a run never "
                        f"deletes what it did not write, with --overwrite or without: {way}")
    if not ours:
        return []
    earlier = ("baseline" if folder / OPTIONS in ours
               else "stage run" if {p.name for p in ours} & {METRICS, SUMMARY, CHECKPOINT, STATE} else None)
    if not overwrite:
        resume = f"continue it with --resume {folder}, " if resumable else ""
        raise UserError(f"{folder}: holds an earlier {earlier or 'run'} ({listing(entry_names(ours))}); {resume}"
                        f"replace it with --overwrite, or {elsewhere}")
    if earlier not in (None, kind):
        raise UserError(f"{folder}: holds a {earlier}, which --overwrite does not replace with a {kind}; "
                        f"give the {kind} its own folder with --set run_dir=DIR")
    return sorted(ours, key=lambda p: p.name == CONFIG)


def listing(names: list[str], shown: int = 5) -> str:
    """`names` for a message: the first few, then how many more."""
    if len(names) > shown:
        return f"{', '.join(names[:shown])} and {len(names) - shown} more"
    return " and ".join(filter(None, [", ".join(names[:-1]), *names[-1:]]))


def entry_names(paths) -> list[str]:
    """Names of folder entries for a message, a folder's with a trailing slash."""
    return [p.name + ("/" if p.is_dir() else "") for p in paths]


def _run_entries(folder: Path) -> tuple[list[Path], list[str]]:
    """`folder`'s entries split into what a run into it wrote and the names of the rest. Nothing
    counts as a run's unless the folder holds a run's config.yaml: a run writes its resolved config,
    whose run_dir names this very folder, while a user's files may well be called summary.json, or
    config.yaml (a stage file). A link is never a run's."""
    ours, theirs = [], []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_symlink():
            theirs.append(name)
        elif entry.is_file() and (name in RUN_FILES or name.endswith(".tmp") and name[:-4] in RUN_FILES):
            ours.append(entry)
        elif entry.is_dir() and name == TENSORBOARD and all(
                not p.is_symlink() and (p.is_dir() or p.name.startswith("events.out.tfevents."))
                for p in entry.rglob("*")):
            ours.append(entry)
        else:
            theirs.append(name + ("/" if entry.is_dir() else ""))
    if folder / CONFIG not in ours or not _written_for(folder):
        return [], sorted(theirs + entry_names(ours))
    return ours, theirs


def _written_for(folder: Path) -> bool:
    """Whether `folder`'s config.yaml is the config of a run into `folder` (a run's run_dir is always
    absolute; a stage file's `run_dir: .` is not)."""
    try:
        saved = yaml.safe_load((folder / CONFIG).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    run_dir = saved.get("run_dir") if isinstance(saved, dict) else None
    return isinstance(run_dir, str) and os.path.isabs(run_dir) and Path(run_dir).resolve() == folder.resolve()


def read_checkpoint(path: str) -> dict:
    """A project checkpoint: tensors and plain metadata only, never code."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found (run the stage that writes it first)") from None
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused: it holds Python objects beyond tensors and plain data, which "
                        f"could run code when loaded. Project checkpoints never do; do not load this "
                        f"file unless you know where it came from.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt: {first[:120]})") from None
    if not isinstance(payload, dict) or set(payload) != {"state_dict", "meta"}:
        raise UserError(f"{path}: not a project checkpoint (expected keys state_dict and meta)")
    return payload
