"""Stage configuration: YAML files with `extends`, `--set` overrides, and validation.

A config is a nested dict. `yamls/base.yaml` holds the defaults; `SCHEMA` below types every key, so an
unknown key, a wrong type or an out-of-range value stops the run with a message naming the file and
the key, before anything is loaded or written.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from .defaults import BASE
from .errors import UserError

_positive = (lambda v: v > 0, "must be > 0")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_fraction = (lambda v: 0 < v <= 1, "must be in (0, 1]")
_probability = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def _increasing_counts(value: list) -> bool:
    return (all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            and all(a < b for a, b in zip(value, value[1:])))


def _choice(*options):
    return (lambda v: v in options, f"must be one of {', '.join(options)}")


# dotted key -> (accepted types, nullable, (check, message) or None)
SCHEMA: dict[str, tuple[tuple[type, ...], bool, tuple[Callable[[Any], bool], str] | None]] = {
    "name": ((str,), False, None),
    "stage": ((int,), False, (lambda v: v in (1, 2, 3), "must be 1, 2 or 3")),
    "run_dir": ((str,), True, None),
    "seed": ((int,), False, None),
    "state_every": ((int,), False, _non_negative),
    "device": ((str,), False, (lambda v: re.fullmatch(r"cpu|cuda(:\d+)?", v) is not None,
                               "must be cpu, cuda or cuda:N")),
    "deterministic": ((bool,), False, None),
    "precision": ((str,), False, _choice("fp32", "bf16")),
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
    "model.align_dropout_prob": ((float,), False, _probability),
    "model.item_content": ((bool,), False, None),
    "model.memory.st_size": ((int,), False, _non_negative),
    "model.memory.lt_size": ((int,), False, _non_negative),
    "model.memory.st_k": ((int,), False, _non_negative),
    "model.memory.lt_k": ((int,), False, _non_negative),
    "model.memory.novelty_threshold": ((float,), False, None),
    "model.memory.merge_threshold": ((float,), False, None),
    "model.memory.recency_decay": ((float,), False, (lambda v: 0 <= v <= 1, "must be in [0, 1]")),  # as MemoryConfig
    "loss.type": ((str,), False, _choice("bpr", "sampled_softmax", "ce")),
    "loss.num_negatives": ((int,), False, _positive),
    "loss.lambda_align": ((float,), False, _non_negative),
    "loss.lambda_lb": ((float,), False, _non_negative),
    "loss.align_temperature": ((float,), False, _positive),
    "trainer": ((str,), False, _choice("federated", "centralized")),
    "optim.optimizer": ((str,), False, _choice("sgd", "adamw")),
    "optim.learning_rate": ((float,), False, _positive),
    "optim.weight_decay": ((float,), False, _non_negative),
    "optim.clip_grad_norm": ((float,), True, _positive),
    "federated.rounds": ((int,), False, _positive),
    "federated.clients_per_round": ((int,), False, _positive),
    "federated.client_fraction": ((float,), True, _fraction),
    "federated.local_epochs": ((int,), False, _positive),
    "federated.server_optimizer": ((str,), False, _choice("sgd", "adam", "yogi", "adagrad")),
    "federated.server_lr": ((float,), False, _positive),
    "federated.server_momentum": ((float,), False, _probability),
    "federated.server_beta1": ((float,), False, _probability),
    "federated.server_beta2": ((float,), False, _probability),
    "federated.server_tau": ((float,), False, _positive),
    "federated.schedule.kind": ((str,), False, _choice("constant", "cosine", "step")),
    "federated.schedule.warmup_rounds": ((int,), False, _non_negative),
    "federated.schedule.floor": ((float,), False, (lambda v: 0 <= v <= 1, "must be in [0, 1]")),
    "federated.schedule.step_rounds": ((int,), False, _positive),
    "federated.schedule.step_factor": ((float,), False, _fraction),
    "federated.server_lr_groups": ((dict,), False, None),
    "federated.backend": ((str,), False, _choice("sequential", "vectorized", "ray", "flower")),
    "federated.cohort_size": ((int,), True, _positive),
    "federated.cohort_positions": ((int,), True, _positive),
    "federated.ray_address": ((str,), True, None),
    "federated.ray_workers": ((int,), False, _positive),
    "federated.ray_cpus_per_worker": ((float,), False, _positive),
    "federated.ray_gpus_per_worker": ((float,), False, _non_negative),
    "federated.flower.nodes": ((int,), False, _positive),
    "federated.flower.address": ((str,), True, None),
    "federated.flower.root_certificates": ((str,), True, None),
    "federated.flower.start_timeout": ((float,), False, _positive),
    "federated.flower.round_timeout": ((float,), False, _positive),
    "federated.flower.secaggplus": ((bool,), False, None),
    "federated.flower.shares": ((int,), False, _positive),
    "federated.flower.threshold": ((int,), False, _positive),
    "federated.flower.clipping_range": ((float,), False, _positive),
    "federated.flower.quantization_range": ((int,), False, _positive),
    "federated.secure_aggregation": ((bool,), False, None),
    "federated.sparse_uploads": ((bool,), False, None),
    "federated.dp.clip_norm": ((float,), True, _positive),
    "federated.dp.noise_multiplier": ((float,), False, _non_negative),
    "federated.dp.delta": ((float,), True, (lambda v: 0 < v < 1, "must be in (0, 1)")),
    "centralized.epochs": ((int,), False, _positive),
    "centralized.batch_size": ((int,), False, _positive),
    "eval.every": ((int,), False, _positive),
    "eval.metric": ((str,), False, _choice(*[f"{m}@{k}" for m in ("hit", "ndcg", "mrr")
                                            for k in (5, 10, 20)])),
    "eval.protocol": ((str,), False, _choice("full", "uni100")),
    "eval.patience": ((int,), False, _positive),
    "eval.batch_size": ((int,), False, _positive),
    "eval.item_count_bins": ((list,), False, (_increasing_counts, "must be whole numbers >= 1 in increasing "
                                              "order (the lower edges of the bins after 0, e.g. [1, 5, 10, 50])")),
    "eval.history_quantiles": ((int,), False, _positive),
    "eval.sample_users": ((int,), True, _positive),
    "trainable": ((list,), False, None),
    "load": ((list,), False, None),
    "expect.max_trainable_params": ((int,), True, _positive),
    "tune.metric": ((str,), False, _choice(*[f"{m}@{k}" for m in ("hit", "ndcg", "mrr") for k in (5, 10, 20)])),
    "tune.protocol": ((str,), False, _choice("full", "uni100")),
    "tune.mode": ((str,), False, _choice("max", "min")),
    "tune.space": ((dict,), False, None),
    "tune.trials": ((int,), False, _positive),
    "tune.scheduler": ((str,), False, _choice("asha", "fifo")),
    "tune.grace_period": ((int,), False, _positive),
    "tune.reduction_factor": ((int,), False, (lambda v: v >= 2, "must be >= 2")),
    "tune.divergence_factor": ((float,), False, (lambda v: v > 1, "must be > 1")),
    "tune.criterion": ((str,), True, _choice("stage2")),  # analysis/sweep_report.py's success tests
    "tune.cpus_per_trial": ((float,), False, _positive),
    "tune.gpus_per_trial": ((float,), False, _non_negative),
    "tune.max_concurrent_trials": ((int,), True, _positive),
    "tune.num_cpus": ((int,), True, _positive),
    "tune.address": ((str,), True, None),
    "tune.storage_path": ((str,), False, None),
}
_SPACE_TYPES = {"loguniform": {"low", "high"}, "uniform": {"low", "high"}, "choice": {"values"},
                "grid": {"values"}}
_SECTIONS = {key.rsplit(".", 1)[0] for key in SCHEMA if "." in key} | {
    key.rsplit(".", 2)[0] for key in SCHEMA if key.count(".") == 2}
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_PATH_KEYS = ("run_dir", "data.path", "data.text_features", "data.image_features", "tune.storage_path")


def load_config(path: str | Path, overrides: list[str] = (), saved: bool = False) -> dict:
    """Load a stage file with everything it extends, apply `key=value` overrides, validate.

    Relative paths inside the config are made absolute against the current directory, so the
    resolved config runs the same from anywhere (Ray Tune trials change directory). `saved`: the
    file is a config a run wrote (config.yaml, sweep.yaml), read as `with_defaults` does.
    """
    config = _load_with_extends(Path(path), chain=())
    if saved:
        config = with_defaults(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected dotted.key=value, e.g. --set optim.learning_rate=0.01")
        key = key.strip()
        if key.startswith("tune.space."):
            # one dimension of the search space: its name is itself a dotted key, so it is not split
            tune = config.setdefault("tune", {})
            space = tune["space"] if isinstance(tune.get("space"), dict) else {}
            tune["space"] = {**space, key[len("tune.space."):]: _parse_value(text, f"--set {item}")}
        else:
            _check_known(key, f"--set {item}")
            _assign(config, key, _parse_value(text, f"--set {item}"))
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


def with_values(config: dict, values: dict, where: str) -> dict:
    """A copy of a resolved config with `values` ({dotted key: value}, e.g. one sweep trial's) set and
    validated (ints become floats where a float is declared)."""
    config = copy.deepcopy(config)
    for key, value in values.items():
        _check_known(key, where)
        _assign(config, key, value)
    _validate(config, where)
    return config


# A resumed run may be given a larger budget (a long run extended session by session, or an early
# stop that came too soon); any other change would make its rounds a mix of two experiments.
BUDGET_KEYS = ("federated.rounds", "centralized.epochs", "eval.patience")


def check_resumable(config: dict) -> None:
    """A run continues only under the config it started with (its run folder's config.yaml), except
    that the budget (BUDGET_KEYS) may grow."""
    saved_path = Path(config["run_dir"]) / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"{config['run_dir']}: not a run folder to resume (no config.yaml)")
    saved = with_defaults(yaml.safe_load(saved_path.read_text()))
    changed = [k for k in sorted(set(_flatten(saved)) | set(_flatten(config)))
               if _get_or_none(saved, k) != _get_or_none(config, k)]
    shrunk = [k for k in changed if k in BUDGET_KEYS and get(config, k) < get(saved, k)]
    if shrunk:
        raise UserError(f"{saved_path}: a resumed run's budget can grow, not shrink: "
                        + ", ".join(f"{k} {_get_or_none(saved, k)} -> {_get_or_none(config, k)}" for k in shrunk))
    changed = [k for k in changed if k not in BUDGET_KEYS]
    if changed:
        raise UserError(f"{saved_path}: the run was started with a different config; keys that differ: "
                        f"{', '.join(changed)} (only {' and '.join(BUDGET_KEYS)} may change, to grow the budget)")


def with_defaults(saved: dict) -> dict:
    """A config a run wrote, as today's schema reads it: a key added since the run was written takes
    its yamls/base.yaml default, so older run folders still report, plot and resume."""
    return _merge(_load_with_extends(BASE, chain=()), saved)


def _get_or_none(config: dict, dotted: str):
    try:
        return get(config, dotted)
    except (KeyError, TypeError):
        return None


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


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    """Sections merge key by key; any other value (a list, the sweep's `tune.space`) is replaced whole."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and prefix + key in _SECTIONS:
            merged[key] = _merge(merged[key], value, f"{prefix}{key}.")
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


def _checked(key: str, value, where: str):
    """`value` if it is valid for `key` (an int is accepted, as a float, where a float is declared)."""
    types, nullable, check = SCHEMA[key]
    if value is None:
        if not nullable:
            raise UserError(f"{where}: {key} must not be null")
        return None
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if float in types and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as text
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise UserError(f"{where}: {key} must be {names}, got {value!r}")
    if check is not None and not check[0](value):
        raise UserError(f"{where}: {key} = {value!r} {check[1]}")
    return value


def _validate_space(space: dict, where: str) -> None:
    """Each dimension: a config key that may vary per trial, and a well-formed distribution over
    values that key accepts, e.g. optim.learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}."""
    for key, spec in space.items():
        name = f"{where}: tune.space[{key!r}]"
        if key not in SCHEMA:
            _check_known(key, f"{where}: tune.space")
        if key.startswith("tune.") or key == "run_dir":
            raise UserError(f"{name}: cannot be swept (every trial sets it itself)")
        kind = spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(kind, str) or kind not in _SPACE_TYPES or set(spec) != {"type", *_SPACE_TYPES[kind]}:
            raise UserError(f"{name} must be {{type: loguniform|uniform, low: L, high: H}} or "
                            f"{{type: choice|grid, values: [...]}}, got {spec!r}")
        if kind in ("loguniform", "uniform"):
            if float not in SCHEMA[key][0]:
                raise UserError(f"{name}: {key} is not a float; sweep it with {{type: choice, values: [...]}}")
            low, high = (_checked(key, spec[end], name) for end in ("low", "high"))
            if not low < high:
                raise UserError(f"{name}: low ({low}) must be below high ({high})")
            if kind == "loguniform" and low <= 0:
                raise UserError(f"{name}: a loguniform range needs low > 0, got {low}")
        elif not isinstance(spec["values"], list) or not spec["values"]:
            raise UserError(f"{name}: values must be a non-empty list, got {spec['values']!r}")
        else:
            for value in spec["values"]:
                _checked(key, value, name)


def _validate(config: dict, where: str) -> None:
    for key in SCHEMA:
        try:
            value = get(config, key)
        except (KeyError, TypeError):
            raise UserError(f"{where}: missing key {key!r} (does the file extend yamls/base.yaml?)") from None
        _assign(config, key, _checked(key, value, where))
    if not all(isinstance(p, str) and p for p in config["trainable"]):
        raise UserError(f"{where}: trainable must be a list of glob patterns over parameter names")
    for i, entry in enumerate(config["load"]):
        if (not isinstance(entry, dict) or set(entry) != {"checkpoint", "groups"}
                or not isinstance(entry["checkpoint"], str) or not isinstance(entry["groups"], list)
                or not entry["groups"] or not all(isinstance(g, str) for g in entry["groups"])):
            raise UserError(f"{where}: load[{i}] must be {{checkpoint: path, groups: [name, ...]}}, "
                            f"got {entry!r}")
    fed = config["federated"]
    if fed["schedule"]["warmup_rounds"] >= fed["rounds"] and config["trainer"] == "federated":
        raise UserError(f"{where}: federated.schedule.warmup_rounds = {fed['schedule']['warmup_rounds']} must be "
                        f"below federated.rounds = {fed['rounds']} (the warmup would be the whole run)")
    groups = config["federated"]["server_lr_groups"]
    for pattern, lr in groups.items():
        if not isinstance(pattern, str) or not pattern:
            raise UserError(f"{where}: federated.server_lr_groups keys must be glob patterns over parameter "
                            f"names, e.g. {{'gamma': 0.01, 'router.*': 0.01}}; got {pattern!r}")
        if isinstance(lr, str) and _FLOAT_TEXT.fullmatch(lr.strip()):
            lr = float(lr)  # YAML 1.1 reads 1e-2 (no dot) as text
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise UserError(f"{where}: federated.server_lr_groups[{pattern!r}] must be a learning rate > 0, "
                            f"got {lr!r}")
        groups[pattern] = float(lr)
    _validate_space(config["tune"]["space"], where)
