"""The run folder: config.yaml, metrics.jsonl, summary.json and checkpoints.

Checkpoints hold tensors and plain metadata only, so they load with `torch.load(weights_only=True)`.
Files are written to a temporary name and renamed, so an interrupted run never leaves half a file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .config import dump

CHECKPOINT = "best.pt"


def _atomic_write(path: Path, write) -> None:
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
        _atomic_write(self.path / "config.yaml", lambda p: p.write_text(dump(config)))

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.path / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))

    def save_checkpoint(self, state_dict: dict, meta: dict, name: str = CHECKPOINT) -> Path:
        path = self.path / name
        payload = {"state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()}, "meta": meta}
        _atomic_write(path, lambda p: torch.save(payload, p))
        return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
