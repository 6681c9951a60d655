"""What the server and a node exchange, as Flower records: the round's global parameters and the
node's clients one way, the node's `RoundSums` the other."""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..aggregate import RoundSums


def round_settings(clients, round_clients, round_seed: int, partition: int, config_text: str,
                   round_number: int) -> dict:
    """What a node needs besides the parameters: the clients it trains, the round's clients (the mask
    partners), the round's seed, its partition, the run's resolved config (the node builds the
    same model from it) and the ServerApp's round count (for the `drop-at-round` drill)."""
    return {"clients": [int(c) for c in clients], "round_clients": [int(c) for c in round_clients],
            "round_seed": int(round_seed), "partition": int(partition), "config": config_text,
            "round": int(round_number)}


def train_request(global_params: dict, settings: dict) -> RecordDict:
    """The global trainable parameters and the node's `round_settings`."""
    return RecordDict({
        "params": ArrayRecord({name: value.detach().cpu() for name, value in global_params.items()}),
        "round": ConfigRecord(settings),
    })


def read_request(content: RecordDict) -> tuple[dict, dict]:
    """(global parameters as tensors, the round's settings)."""
    params = content.array_records["params"].to_torch_state_dict()
    return params, dict(content.config_records["round"])


def sums_reply(sums: RoundSums) -> RecordDict:
    stats = {key: torch.as_tensor(value).detach().cpu() for key, value in sums.stats.items()}
    return RecordDict({
        "update": ArrayRecord({name: value.detach().cpu() for name, value in sums.update.items()}),
        "stats": ArrayRecord(stats),
        "sums": ConfigRecord({"weight": float(sums.weight), "clients": int(sums.clients),
                              "bytes_up": int(sums.bytes_up),
                              "modulus": -1 if sums.modulus is None else int(sums.modulus)}),
    })


def read_sums(content: RecordDict, device) -> RoundSums:
    scalars = content.config_records["sums"]
    update = {name: value.to(device) for name, value in content.array_records["update"].to_torch_state_dict().items()}
    stats = {key: value.to(device) for key, value in content.array_records["stats"].to_torch_state_dict().items()}
    modulus = int(scalars["modulus"])
    return RoundSums(update, stats, float(scalars["weight"]), int(scalars["clients"]), int(scalars["bytes_up"]),
                     None if modulus < 0 else modulus)


def data_mismatch(theirs: dict, ours: dict) -> str | None:
    """How a node's `node_data.partition_summary` differs from the server's (None: it does not)."""
    if theirs == ours:
        return None
    def said(d):
        return f"{d['items']:,} items, {d['users']:,} users, {d['positions']:,} training positions (digest {d['digest']})"
    return f"its data has {said(theirs)}, the run's {said(ours)}"
