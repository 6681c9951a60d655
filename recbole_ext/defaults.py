"""The default of every config key: `yamls/base.yaml`, the one place a default is written.

A module of the base layer, so that the model and the memory, which sit below `config.py`, take their
defaults from the same file as the stage configs do.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

BASE = Path(__file__).resolve().parents[1] / "yamls" / "base.yaml"
# Ray ships this package to its workers without yamls/ (on a cluster the project is not there at all),
# so the driver sends base.yaml's text along in this variable (`ray_runtime_env`).
TEXT_ENV = "UR4REC_BASE_YAML"


def base_defaults() -> dict:
    """`yamls/base.yaml` as a nested dict (read anew: the caller may change it)."""
    text = os.environ.get(TEXT_ENV)
    return yaml.safe_load(BASE.read_text() if text is None else text)


def ray_runtime_env(env_vars: dict | None = None) -> dict:
    """The runtime env of a Ray job that runs this package's code on its workers: the package itself
    and the defaults it reads (plus `env_vars`)."""
    return {"py_modules": [str(Path(__file__).resolve().parent)],
            "env_vars": {TEXT_ENV: BASE.read_text(), **(env_vars or {})}}
