"""Stage configuration: YAML files with `extends`, `--set` overrides, and validation.

A config is a nested dict. `yamls/base.yaml` holds the defaults; `SCHEMA` below types every key, so an
unknown key, a wrong type or an out-of-range value stops the run with a message naming the file and
the key, before anything is loaded or written.
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError

_positive = (lambda v: v > 0, "must be > 0")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_fraction = (lambda v: 0 < v <= 1, "must be in (0, 1]")
_probability = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def _choice(*options):
    return (lambda v: v in options, f"must be one of {', '.join(options)}")


# dotted key -> (accepted types, nullable, (check, message) or None)
SCHEMA: dict[str, tuple[tuple[type, ...], bool, tuple[Callable[[Any], bool], str] | None]] = {
    "name": ((str,), False, None),
    "stage": ((int,), False, (lambda v: v in (1, 2, 3), "must be 1, 2 or 3")),
    "run_dir": ((str,), True, None),
    "seed": ((int,), False, None),
    "device": ((str,), False, None),
    "data.path": ((str,), False, None),
    "data.dataset": ((str,), False, None),
    "data.text_features": ((str,), True, None),
    "data.image_features": ((str,), True, None),
    "data.max_seq_length": ((int,), False, _positive),
    "data.max_users": ((int,), True, _positive),
    "model.hidden_size": ((int,), False, _positive),
    "model.n_layers": ((int,), False, _positive),
    "model.n_heads": ((int,), False, _positive),
    "model.inner_size": ((int,), False, _positive),
    "model.hidden_dropout_prob": ((float,), False, _probability),
    "model.attn_dropout_prob": ((float,), False, _probability),
    "model.hidden_act": ((str,), False, _choice("gelu", "relu", "swish", "tanh", "sigmoid")),
    "model.layer_norm_eps": ((float,), False, _positive),
    "model.initializer_range": ((float,), False, _positive),
    "model.text_dim": ((int,), False, _positive),
    "model.image_dim": ((int,), False, _positive),
    "model.align": ((bool,), False, None),
    "model.experts": ((bool,), False, None),
    "model.align_beta": ((float,), False, None),
    "model.gating_init": ((float,), False, None),
    "model.projector_init_gain": ((float,), False, _positive),
    "model.expert_heads": ((int,), False, _positive),
    "model.memory.st_size": ((int,), False, _non_negative),
    "model.memory.lt_size": ((int,), False, _non_negative),
    "model.memory.st_k": ((int,), False, _non_negative),
    "model.memory.lt_k": ((int,), False, _non_negative),
    "model.memory.novelty_threshold": ((float,), False, None),
    "model.memory.merge_threshold": ((float,), False, None),
    "model.memory.recency_decay": ((float,), False, (lambda v: 0 < v <= 1, "must be in (0, 1]")),
    "loss.type": ((str,), False, _choice("bpr", "sampled_softmax", "ce")),
    "loss.num_negatives": ((int,), False, _positive),
    "loss.lambda_align": ((float,), False, _non_negative),
    "loss.lambda_lb": ((float,), False, _non_negative),
    "loss.align_temperature": ((float,), False, _positive),
    "trainer": ((str,), False, _choice("federated", "centralized")),
    "optim.learning_rate": ((float,), False, _positive),
    "optim.weight_decay": ((float,), False, _non_negative),
    "optim.clip_grad_norm": ((float,), True, _positive),
    "federated.rounds": ((int,), False, _positive),
    "federated.clients_per_round": ((int,), False, _positive),
    "federated.client_fraction": ((float,), True, _fraction),
    "federated.local_epochs": ((int,), False, _positive),
    "federated.server_lr": ((float,), False, _positive),
    "federated.backend": ((str,), False, _choice("sequential")),
    "centralized.epochs": ((int,), False, _positive),
    "centralized.batch_size": ((int,), False, _positive),
    "eval.every": ((int,), False, _positive),
    "eval.metric": ((str,), False, _choice(*[f"{m}@{k}" for m in ("hit", "ndcg", "mrr")
                                            for k in (5, 10, 20)])),
    "eval.protocol": ((str,), False, _choice("full", "uni100")),
    "eval.patience": ((int,), False, _positive),
    "eval.batch_size": ((int,), False, _positive),
    "trainable": ((list,), False, None),
    "load": ((list,), False, None),
    "expect.max_trainable_params": ((int,), True, _positive),
}
_SECTIONS = {key.rsplit(".", 1)[0] for key in SCHEMA if "." in key} | {
    key.rsplit(".", 2)[0] for key in SCHEMA if key.count(".") == 2}
_PATH_KEYS = ("run_dir", "data.path", "data.text_features", "data.image_features")


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """Load a stage file with everything it extends, apply `key=value` overrides, validate.

    Relative paths inside the config are made absolute against the current directory, so the
    resolved config runs the same from anywhere (Ray Tune trials change directory).
    """
    config = _load_with_extends(Path(path), chain=())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected dotted.key=value, e.g. --set optim.learning_rate=0.01")
        _check_known(key.strip(), f"--set {item}")
        _assign(config, key.strip(), _parse_value(text, f"--set {item}"))
    _validate(config, str(path))
    for key in _PATH_KEYS:
        value = get(config, key)
        if value is not None:
            _assign(config, key, os.path.abspath(os.path.expanduser(value)))
    for entry in config["load"]:
        entry["checkpoint"] = os.path.abspath(os.path.expanduser(entry["checkpoint"]))
    if config["run_dir"] is None:
        config["run_dir"] = os.path.abspath(os.path.join("runs", config["name"]))
    return config


def get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def _load_with_extends(path: Path, chain: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"{path}: `extends` forms a cycle: {cycle}")
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise UserError(f"{path}: config file not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys to values")
    parent = data.pop("extends", None)
    for key in _flatten(data):
        _check_known(key, str(path))
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: `extends` must be a path, got {parent!r}")
    base = _load_with_extends(path.parent / parent, (*chain, path))
    return _merge(base, data)


def _merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _flatten(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in _SECTIONS:
            keys.extend(_flatten(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def _check_known(key: str, where: str) -> None:
    if key in SCHEMA or key in _SECTIONS:
        return
    close = difflib.get_close_matches(key, list(SCHEMA), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"{where}: unknown key {key!r}{hint}. Every key must be declared in yamls/base.yaml.")


def _assign(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _parse_value(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{where}: cannot parse value {text!r}: {err}") from None


def _validate(config: dict, where: str) -> None:
    for key, (types, nullable, check) in SCHEMA.items():
        try:
            value = get(config, key)
        except (KeyError, TypeError):
            raise UserError(f"{where}: missing key {key!r} (does the file extend yamls/base.yaml?)") from None
        if value is None:
            if not nullable:
                raise UserError(f"{where}: {key} must not be null")
            continue
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            _assign(config, key, value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise UserError(f"{where}: {key} must be {names}, got {value!r}")
        if check is not None and not check[0](value):
            raise UserError(f"{where}: {key} = {value!r} {check[1]}")
    if not all(isinstance(p, str) and p for p in config["trainable"]):
        raise UserError(f"{where}: trainable must be a list of glob patterns over parameter names")
    for i, entry in enumerate(config["load"]):
        if (not isinstance(entry, dict) or set(entry) != {"checkpoint", "groups"}
                or not isinstance(entry["checkpoint"], str) or not isinstance(entry["groups"], list)
                or not entry["groups"] or not all(isinstance(g, str) for g in entry["groups"])):
            raise UserError(f"{where}: load[{i}] must be {{checkpoint: path, groups: [name, ...]}}, "
                            f"got {entry!r}")
