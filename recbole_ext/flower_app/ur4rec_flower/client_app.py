"""The ClientApp: what runs on a SuperNode (Flower finds `app` here). Flower starts a fresh process
for every message, so each train message rebuilds the node's model from the run's resolved config (in the message) and the node's
own data, and trains the node's clients with the `vectorized` backend.

A node holds one node-data file (`--node-config 'node-data="FILE"'`, written by `run.py node-data`):
its partition's users' training sequences and the public item tables, nothing else (data/node_data.py).
The server checks at the start that every node holds its partition of the run's data. Under
`federated.flower.secaggplus` the train messages of a round follow Flower's SecAgg+ protocol
(recbole_ext/federated/flower/secaggplus.py), and only the one that carries the global parameters trains."""
from __future__ import annotations

import os

import numpy as np
import psutil
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from recbole_ext.data import node_data
from recbole_ext.federated.flower import records, secaggplus
from recbole_ext.federated.ray_backend import actor_seed

app = ClientApp(mods=[secaggplus.node_mod])


def held_data(context: Context) -> node_data.NodeData:
    if "node-data" not in context.node_config:
        raise ValueError("this SuperNode was started without node-data=FILE in --node-config (the file "
                         "`python run.py node-data` writes for its partition)")
    return node_data.read(str(context.node_config["node-data"]))


def node_stage(config_text: str, data: node_data.NodeData):
    """(the run's config, its stage as this node builds it from its data alone)."""
    from recbole_ext.nodes import NodeStage

    cfg = yaml.safe_load(config_text)
    torch.set_num_threads(1)  # the machine's cores are shared by the nodes
    return cfg, NodeStage(cfg, data, f"the run's config on node {data.partition}")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The partition this node holds, and a summary of its data under the run's config (the server
    refuses a node whose data is not its partition of the run's before the first round)."""
    data = held_data(context)
    _, stage = node_stage(msg.content.config_records["ask"]["config"], data)
    summary = node_data.partition_summary(stage.windows, data.partition, data.partitions)
    info = ConfigRecord({"partition": data.partition, "partitions": data.partitions, **summary})
    return Message(RecordDict({"node": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if secaggplus.is_secaggplus(msg):  # the collect stage of a SecAgg+ round; the mod masks the reply
        params, round_ = secaggplus.read_fit(msg)
        leave_mid_round(context, int(round_["round"]))
        cfg, sums = train_partition(params, round_, context)
        return secaggplus.fit_reply(msg, sums, round_, cfg["federated"]["flower"])
    params, round_ = records.read_request(msg.content)
    leave_mid_round(context, int(round_["round"]))
    return Message(records.sums_reply(train_partition(params, round_, context)[1]), reply_to=msg)


def leave_mid_round(context: Context, round_: int) -> None:
    """A fault drill (node config `drop-at-round=R`): in round R (counted from the ServerApp's start),
    when the node got its train message (under SecAgg+: after it shared its keys, before it sends its
    masked vector), its SuperNode is killed, as when its device is switched off."""
    if int(context.node_config.get("drop-at-round", 0)) == round_:
        # this process's ancestors: Flower's SuperExec, which started it, then the SuperNode
        node = next(p for p in psutil.Process().parents() if "flower-supernode" in " ".join(p.cmdline()))
        for process in [node, *node.children(recursive=True)]:
            if process.pid != os.getpid():
                process.kill()
        os._exit(1)


def train_partition(params: dict, round_: dict, context: Context):
    """(the run's config, the RoundSums of the round's clients this node holds)."""
    from recbole_ext.federated.vectorized import VectorizedBackend

    data = held_data(context)
    partition = data.partition
    if int(round_["partition"]) != partition:
        raise ValueError(f"sent the clients of partition {round_['partition']}, but this node holds {partition}")
    clients = np.asarray(round_["clients"], dtype=np.int64)
    strangers = np.setdiff1d(clients, data.users)
    if len(strangers):
        raise ValueError(f"asked to train users {strangers[:5].tolist()}, who are not in partition {partition}")
    cfg, stage = node_stage(round_["config"], data)
    for name, param in stage.model.named_parameters():  # what trains is what the server sent
        param.requires_grad_(name in params)
    # Dropout draws from the process's generator, which this fresh process seeds from the round and
    # the partition: every round and node draws anew, and a resumed run draws what it drew before.
    torch.manual_seed(actor_seed(int(round_["round_seed"]), partition))
    backend = VectorizedBackend(stage.model, stage.windows, cfg)
    device = stage.windows.device
    sums = backend.train_clients(clients, {name: value.to(device) for name, value in params.items()},
                                 int(round_["round_seed"]),
                                 round_clients=np.asarray(round_["round_clients"], dtype=np.int64))
    return cfg, sums
