"""The default of every config key: `yamls/base.yaml`, the one place a default is written.

A module of the base layer, so that the model and the memory, which sit below `config.py`, take their
defaults from the same file as the stage configs do.
"""
from __future__ import annotations

from pathlib import Path

import yaml

BASE = Path(__file__).resolve().parents[1] / "yamls" / "base.yaml"


def base_defaults() -> dict:
    """`yamls/base.yaml` as a nested dict (read anew: the caller may change it)."""
    return yaml.safe_load(BASE.read_text())
