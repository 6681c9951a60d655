"""Every workaround RecBole 1.2.1 needs on numpy 2, torch >= 2.6 and current Ray, in one place.

RecBole 1.2.1 predates all three. What it trips over, and why each shim is here:

* numpy 2 removed `np.float_`, `np.complex_`, `np.unicode_` (and long ago `np.float`, `np.int`, ...);
  RecBole's `Config` and metric code still use them, so they are aliased back before any RecBole import.
* torch >= 2.6 loads with `weights_only=True` by default; RecBole's own checkpoints pickle the `Config`
  object, so they only load with `weights_only=False`. `load_recbole_checkpoint` does that explicitly,
  for files RecBole itself wrote. The project's own checkpoints never need it.
* Importing any RecBole sequential model imports SINE, whose module switches on autograd anomaly
  detection for the whole process (training runs several times slower); `import_sequential` switches
  it back off.
* `recbole.quick_start` imports Ray Tune at import time and its `run_recbole` cannot find a model
  class outside RecBole; nothing here imports it.
* `Config()` parses `--key=value` from `sys.argv`, so run.py's and pytest's flags would leak into the
  config; `recbole_config` hides them. It also ignores `data_path` for a dataset named `ml-100k`
  (it reads the package's bundled copy); `recbole_config` puts the user's folder back. And it picks
  CUDA whenever a GPU is visible, whatever `device` says, and sets `CUDA_VISIBLE_DEVICES` for the
  whole process; `recbole_config` keeps the device asked for and the variable as it was.
* RecBole's `Trainer` writes `log_tensorboard/` relative to the working directory;
  `writes_into` points it at the run folder.
* A model class outside RecBole gets no default hyper-parameters from `Config` (it reads them from
  `recbole/properties/model/<Name>.yaml` inside its own package), `create_dataset` only looks for a
  dataset class inside `recbole.data.dataset`, and RecBole's `Trainer` cannot reload the best
  checkpoint it saved itself (the `weights_only` default above); `register_model` mends all three
  for a model of this project, so a stock RecBole script can train it.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np

_NUMPY_ALIASES = {
    "float_": np.float64, "complex_": np.complex128, "unicode_": np.str_,
    "float": np.float64, "int": np.int_, "bool": np.bool_, "object": np.object_,
    "str": np.str_, "complex": np.complex128, "unicode": np.str_,
}


def patch_numpy() -> None:
    """Restore the numpy aliases RecBole uses (idempotent)."""
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


patch_numpy()
# RecBole 1.2.1 on pandas 2.x warns about its own inplace fillna on every dataset load; the
# behaviour is correct on pandas < 3 (which requirements.txt pins), so the warning is only noise.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")


def import_sequential(name: str):
    """A stock RecBole sequential model class (`SASRec`, `GRU4Rec`, ...), without the process-wide
    anomaly detection its package turns on."""
    import torch
    from recbole.model import sequential_recommender

    torch.autograd.set_detect_anomaly(False)
    return getattr(sequential_recommender, name)


def import_sasrec():
    return import_sequential("SASRec")


def recbole_config(model_class, dataset: str, config_dict: dict):
    """Build a RecBole `Config` from `config_dict` alone, never from the command line."""
    import torch
    from recbole.config import Config

    saved, visible = sys.argv, os.environ.get("CUDA_VISIBLE_DEVICES")
    sys.argv = saved[:1]
    try:
        config = Config(model=model_class, dataset=dataset, config_dict=config_dict)
    finally:
        sys.argv = saved
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    config["device"] = torch.device(config_dict.get("device", "cpu"))
    if "data_path" in config_dict:
        # For the dataset named "ml-100k", Config silently replaces data_path with the copy inside
        # the RecBole package; honour the folder the user gave.
        config["data_path"] = os.path.join(config_dict["data_path"], dataset)
    return config


_MODEL_DEFAULTS: dict = {}  # model class -> its defaults, read by the Config hook below


def register_model(model_class, defaults: dict, dataset_class) -> None:
    """Make `model_class` (a model outside RecBole) work in a stock RecBole script (idempotent).

    * `Config(model=model_class, ...)` gets `defaults` where RecBole would read a model's YAML of its
      own: over `overall.yaml`, under the dataset's defaults, config files, `config_dict` and the
      command line;
    * `create_dataset(config)` builds `dataset_class` (RecBole picks `recbole.data.dataset.<Model>Dataset`);
    * RecBole's `Trainer` reloads the checkpoints it writes (`evaluate(load_best_model=True)`,
      `resume_checkpoint`), which pickle its `Config` and so need `weights_only=False`.
    """
    import recbole.data.dataset
    from recbole.config import Config

    _MODEL_DEFAULTS[model_class] = defaults
    setattr(recbole.data.dataset, f"{model_class.__name__}Dataset", dataset_class)
    if not getattr(Config._load_internal_config_dict, "_adds_model_defaults", False):
        load_internal = Config._load_internal_config_dict

        def _load_internal_config_dict(self, model, model_class, dataset):
            defaults = _MODEL_DEFAULTS.get(model_class)
            if defaults is None:
                return load_internal(self, model, model_class, dataset)
            update = self._update_internal_config_dict

            def update_then_add_defaults(file):
                loaded = update(file)
                if os.path.basename(file) == "overall.yaml":  # RecBole reads the model's YAML right after it
                    self.internal_config_dict.update(copy.deepcopy(defaults))
                return loaded

            self._update_internal_config_dict = update_then_add_defaults
            try:
                return load_internal(self, model, model_class, dataset)
            finally:
                del self._update_internal_config_dict

        _load_internal_config_dict._adds_model_defaults = True
        Config._load_internal_config_dict = _load_internal_config_dict
    _trust_trainer_checkpoints()


class _TorchLoadingPickles(types.ModuleType):
    """`torch` as RecBole's trainer module sees it, with `load` defaulting to `weights_only=False`."""

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        import torch

        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


def _trust_trainer_checkpoints() -> None:
    """Only RecBole's trainer module sees the change: it loads files RecBole's `Trainer` wrote (or the
    file a user hands to `resume_checkpoint`), as it did before torch 2.6; every other load keeps
    torch's default."""
    from recbole.trainer import trainer

    if not isinstance(trainer.torch, _TorchLoadingPickles):
        trainer.torch = _TorchLoadingPickles("torch")


def load_recbole_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by RecBole's own `Trainer` (it pickles its `Config`).

    Only for files RecBole wrote on this machine: unpickling can run code.
    """
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


@contextlib.contextmanager
def writes_into(folder: str | Path):
    """Run a block with `folder` as working directory, so RecBole's hard-coded relative
    `log/` and `log_tensorboard/` land inside the run folder."""
    previous = os.getcwd()
    os.makedirs(folder, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)
