"""The run folder: config.yaml, metrics.jsonl, summary.json and checkpoints.

Checkpoints hold tensors and plain metadata only, so they load with `torch.load(weights_only=True)`.
Files are written to a temporary name and renamed, so an interrupted run never leaves half a file.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import psutil
import torch

from .config import dump
from .errors import UserError

CHECKPOINT = "best.pt"
STATE = "state.pt"  # resumable training state


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

    def create(self, config: dict) -> None:
        """Start a fresh run: an earlier run in the same folder is replaced."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self.write_config(config)

    def write_config(self, config: dict) -> None:
        atomic_write(self.path / "config.yaml", lambda p: p.write_text(dump(config)))

    def write_metrics(self, records: list[dict]) -> None:
        """Rewrite metrics.jsonl whole, atomically: it never holds a half line."""
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(self.path / "metrics.jsonl", lambda p: p.write_text(text))

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
        atomic_write(self.path / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))

    def save_checkpoint(self, state_dict: dict, meta: dict, name: str = CHECKPOINT) -> Path:
        path = self.path / name
        payload = {"state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()}, "meta": meta}
        atomic_write(path, lambda p: torch.save(payload, p))
        return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
