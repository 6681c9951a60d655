"""The `flower` backend as the ServerApp's trainer sees it: each round, every node that holds some of
the round's clients gets the global parameters and its clients, trains them with the `vectorized`
backend, and returns its pre-summed `RoundSums` (like one Ray actor's shard); the server merges them.

The ServerApp sets the Grid (its connection to the SuperLink) with `serve` before it builds the stage,
and `BACKENDS["flower"]` builds this backend on it."""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from ...config import dump
from ...errors import UserError
from . import records

_GRID = None  # the Grid of the ServerApp running in this process (set by `serve`)
POLL_SECONDS = 0.2  # Grid.send_and_receive waits 3 s between pulls; a round is often shorter


@contextmanager
def serve(grid):
    global _GRID
    _GRID = grid
    try:
        yield
    finally:
        _GRID = None


def exchange(grid, messages: list, timeout: float) -> list:
    """Push `messages`, then pull their replies until all are in or `timeout` seconds have passed."""
    pending = {mid for mid in grid.push_messages(messages) if mid}
    replies, deadline = [], time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending -= {reply.metadata.reply_to_message_id for reply in got}
        if pending:
            time.sleep(POLL_SECONDS)
    return replies


def node_partitions(grid, nodes: int, timeout: float) -> dict[int, int]:
    """{partition id: node id} of the run's `nodes` SuperNodes. The server cannot read a node's
    node_config, so it asks each node which partition it holds."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:
        if time.monotonic() > deadline:
            raise UserError(f"federated.flower.nodes is {nodes}, but {len(node_ids)} SuperNode(s) joined the "
                            f"SuperLink within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
    asks = [Message(RecordDict({"ask": ConfigRecord({"what": "partition"})}), dst_node_id=node,
                    message_type=MessageType.QUERY) for node in node_ids]
    owners = {}
    for reply in exchange(grid, asks, timeout):
        if reply.has_error():
            raise UserError(f"SuperNode {reply.metadata.src_node_id} did not say its partition: {reply.error.reason}")
        info = reply.content.config_records["node"]
        if int(info["partitions"]) != nodes:
            raise UserError(f"SuperNode {reply.metadata.src_node_id} holds partition {info['partition']} of "
                            f"{info['partitions']}, but the run has {nodes} nodes")
        owners[int(info["partition"])] = reply.metadata.src_node_id
    if sorted(owners) != list(range(nodes)):
        raise UserError(f"the SuperNodes hold partitions {sorted(owners)}, not 0 to {nodes - 1}")
    return owners


class FlowerBackend:
    def __init__(self, model, windows, settings: dict):
        if _GRID is None:
            raise UserError("federated.backend: flower runs inside a Flower ServerApp; start it with run.py, "
                            "which deploys it (docs/DEPLOY.md)")
        self.grid, self.settings, self.device = _GRID, settings, windows.device
        flower = settings["federated"]["flower"]
        self.timeout = flower["round_timeout"]
        self.nodes = node_partitions(self.grid, flower["nodes"], self.timeout)
        self.config_text = dump(settings)

    def train_clients(self, clients, global_params: dict, round_seed: int, progress: bool = False,
                      round_clients=None):
        from ..privacy import Uploads

        clients = np.asarray(clients)
        round_clients = clients if round_clients is None else np.asarray(round_clients)
        owner = records.partition_of(clients, len(self.nodes))
        messages = []
        for partition, node in sorted(self.nodes.items()):
            mine = clients[owner == partition]
            if len(mine):
                content = records.train_request(global_params, mine, round_clients, round_seed, partition,
                                                self.config_text)
                messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        replies = exchange(self.grid, messages, self.timeout)
        failed = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
        if failed or len(replies) < len(messages):
            missing = len(messages) - len(replies)
            raise UserError("a round's nodes did not all answer: " + "; ".join(
                failed + ([f"{missing} gave no reply within {self.timeout:.0f} s"] if missing else [])))
        sums = Uploads(self.settings).zeros(global_params)
        # in partition order, not arrival order: the same sum to the bit, run after run and on resume
        partition_of_node = {node: partition for partition, node in self.nodes.items()}
        for reply in sorted(replies, key=lambda r: partition_of_node[r.metadata.src_node_id]):
            sums.merge(records.read_sums(reply.content, self.device))
        return sums
