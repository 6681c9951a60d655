"""The ClientApp: what runs on a SuperNode. Flower starts a fresh process for every message, so each
train message rebuilds the node's model from the run's resolved config (in the message) and trains
the node's clients with the `vectorized` backend; the node answers only for the partition it holds
(its `--node-config "partition-id=P num-partitions=N"`). A node may keep the data elsewhere than the
server (`data-path=FOLDER` in its node config replaces the config's `data.path` there); the server
checks at the start that it loads the same data. Under `federated.flower.secaggplus` the train
messages of a round follow Flower's SecAgg+ protocol (secaggplus.py), and only the one that carries the
global parameters trains."""
from __future__ import annotations

import numpy as np
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..ray_backend import actor_seed
from . import records, secaggplus

app = ClientApp(mods=[secaggplus.node_mod])


def held_partition(context: Context) -> tuple[int, int]:
    config = context.node_config
    missing = [key for key in ("partition-id", "num-partitions") if key not in config]
    if missing:
        raise ValueError(f"this SuperNode was started without {' and '.join(missing)} in --node-config")
    return int(config["partition-id"]), int(config["num-partitions"])


def node_stage(config_text: str, context: Context, partition: int):
    """The stage of the run's config as this node loads it (from its own `data-path`, if it has one)."""
    from ...pipeline import Stage

    cfg = yaml.safe_load(config_text)
    if "data-path" in context.node_config:
        cfg["data"]["path"] = str(context.node_config["data-path"])
    torch.set_num_threads(1)  # the machine's cores are shared by the nodes
    return cfg, Stage(cfg, f"the run's config on node {partition}")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The partition this node holds, and a summary of the data it loads for the run's config (the
    server refuses a node whose data is not the run's before the first round)."""
    partition, partitions = held_partition(context)
    _, stage = node_stage(msg.content.config_records["ask"]["config"], context, partition)
    info = ConfigRecord({"partition": partition, "partitions": partitions, **records.data_summary(stage.windows)})
    return Message(RecordDict({"node": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if secaggplus.is_secaggplus(msg):  # the collect stage of a SecAgg+ round; the mod masks the reply
        params, round_ = secaggplus.read_fit(msg)
        secaggplus.leave_mid_round(context, int(round_["round"]))
        cfg, sums = train_partition(params, round_, context)
        return secaggplus.fit_reply(msg, sums, round_, cfg["federated"]["flower"])
    params, round_ = records.read_request(msg.content)
    return Message(records.sums_reply(train_partition(params, round_, context)[1]), reply_to=msg)


def train_partition(params: dict, round_: dict, context: Context):
    """(the run's config, the RoundSums of the round's clients this node holds)."""
    from ..vectorized import VectorizedBackend

    partition, partitions = held_partition(context)
    if int(round_["partition"]) != partition:
        raise ValueError(f"sent the clients of partition {round_['partition']}, but this node holds {partition}")
    clients = np.asarray(round_["clients"], dtype=np.int64)
    strangers = clients[records.partition_of(clients, partitions) != partition]
    if len(strangers):
        raise ValueError(f"asked to train users {strangers[:5].tolist()}, who are not in partition {partition}")
    cfg, stage = node_stage(round_["config"], context, partition)
    # Dropout draws from the process's generator, which this fresh process seeds from the round and
    # the partition: every round and node draws anew, and a resumed run draws what it drew before.
    torch.manual_seed(actor_seed(int(round_["round_seed"]), partition))
    backend = VectorizedBackend(stage.model, stage.windows, cfg)
    device = stage.windows.device
    sums = backend.train_clients(clients, {name: value.to(device) for name, value in params.items()},
                                 int(round_["round_seed"]),
                                 round_clients=np.asarray(round_["round_clients"], dtype=np.int64))
    return cfg, sums
