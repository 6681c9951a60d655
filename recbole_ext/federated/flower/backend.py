"""The `flower` backend as the ServerApp's trainer sees it: each round, every node that holds some of
the round's clients gets the global parameters and its clients, trains them with the `vectorized`
backend, and returns its pre-summed `RoundSums` (like one Ray actor's shard); the server merges them.

The ServerApp sets the Grid (its connection to the SuperLink) with `serve` before it builds the stage,
and `BACKENDS["flower"]` builds this backend on it."""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto

from ...config import dump
from ...data import node_data
from ...errors import UserError
from . import records, secaggplus

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


def exchange(grid, messages: list, timeout: float) -> dict:
    """Push `messages`, then pull their replies until all are in or `timeout` seconds have passed:
    {node a message went to: its reply}. Keyed by the message a reply answers, not by its sender:
    when a node stops sending heartbeats the SuperLink itself answers for it, with an error."""
    ids = grid.push_messages(messages)
    to = {mid: message.metadata.dst_node_id for mid, message in zip(ids, messages) if mid}
    replies, deadline = {}, time.monotonic() + timeout
    while len(replies) < len(to) and time.monotonic() < deadline:
        for reply in grid.pull_messages([mid for mid in to if to[mid] not in replies]):
            replies[to[reply.metadata.reply_to_message_id]] = reply
        if len(replies) < len(to):
            time.sleep(POLL_SECONDS)
    return replies


def node_partitions(grid, nodes: int, timeout: float, config_text: str, windows,
                    join_timeout: float) -> dict[int, int]:
    """{partition id: node id} of the run's `nodes` SuperNodes. The server cannot read a node's
    node_config, so it asks each node which partition it holds, and what its data is under the run's
    config (`config_text`), which must be that partition of the run's training `windows`
    (node_data.partition_summary)."""
    deadline = time.monotonic() + join_timeout
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:
        if time.monotonic() > deadline:
            raise UserError(f"federated.flower.nodes is {nodes}, but {len(node_ids)} SuperNode(s) joined the "
                            f"SuperLink within {join_timeout:.0f} s (federated.flower.start_timeout)")
        time.sleep(POLL_SECONDS)
    asks = [Message(RecordDict({"ask": ConfigRecord({"config": config_text})}), dst_node_id=node,
                    message_type=MessageType.QUERY) for node in node_ids]
    owners = {}
    for node, reply in exchange(grid, asks, timeout).items():
        if reply.has_error():
            raise UserError(f"SuperNode {node} could not load the run's data or say its "
                            f"partition: {reply.error.reason}")
        info = reply.content.config_records["node"]
        if int(info["partitions"]) != nodes:
            raise UserError(f"SuperNode {node} holds partition {info['partition']} of "
                            f"{info['partitions']}, but the run has {nodes} nodes")
        ours = node_data.partition_summary(windows, int(info["partition"]), nodes)
        mismatch = records.data_mismatch({key: info[key] for key in ours}, ours)
        if mismatch:
            raise UserError(f"SuperNode {node} (partition {info['partition']}) does not hold "
                            f"the run's data: {mismatch}")
        owners[int(info["partition"])] = node
    if sorted(owners) != list(range(nodes)):
        raise UserError(f"the SuperNodes hold partitions {sorted(owners)}, not 0 to {nodes - 1}")
    return owners


def serialized_size(message: Message) -> int:
    """Bytes of a message's content as Flower serializes it for the wire (its protobuf; the HTTP
    framing and the message's metadata are not counted; an error reply, e.g. for a node that is
    gone, has no content)."""
    return 0 if message.has_error() else recorddict_to_proto(message.content).ByteSize()


class CountingGrid:
    """The ServerApp's Grid, counting the serialized bytes of the messages it sends and receives
    (`wire_bytes`), whoever sends them: this backend, or Flower's SecAgg+ workflow."""

    def __init__(self, grid):
        self.grid, self.down, self.up = grid, 0, 0

    def push_messages(self, messages):
        messages = list(messages)
        self.down += sum(serialized_size(m) for m in messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        self.up += sum(serialized_size(r) for r in replies)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.down += sum(serialized_size(m) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(serialized_size(r) for r in replies)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


class FlowerBackend:
    """The nodes' sums of a round, merged; a node that fails, does not answer within `round_timeout`,
    or answers with a malformed or non-finite update is dropped (named in the run's log and in
    metrics.jsonl's `dropped_nodes`) and the round goes on without it."""

    def __init__(self, model, windows, settings: dict):
        if _GRID is None:
            raise UserError("federated.backend: flower runs inside a Flower ServerApp; start it with run.py, "
                            "which deploys it (docs/DEPLOY.md)")
        self.grid, self.settings, self.device = CountingGrid(_GRID), settings, windows.device
        flower = settings["federated"]["flower"]
        self.timeout = flower["round_timeout"]
        self.config_text = dump(settings)
        self.nodes = node_partitions(self.grid, flower["nodes"], self.timeout, self.config_text,
                                     windows, flower["start_timeout"])
        # the last round's message bytes {"down", "up"} and the nodes whose answers were dropped, for
        # its metrics line (`round_extra`)
        self.wire_bytes, self.dropped = None, []
        self.rounds_run = 0  # this ServerApp's rounds (a resumed run counts from its first resumed one)

    def train_clients(self, clients, global_params: dict, round_seed: int, progress: bool = False,
                      round_clients=None):
        from ..privacy import Uploads

        clients = np.asarray(clients)
        round_clients = clients if round_clients is None else np.asarray(round_clients)
        owner = node_data.partition_of(clients, len(self.nodes))
        self.rounds_run += 1
        self.grid.down = self.grid.up = 0
        if self.settings["federated"]["flower"]["secaggplus"]:
            return self.secaggplus_round(clients, owner, round_clients, global_params, round_seed)
        messages, sent = [], {}
        for partition, node in sorted(self.nodes.items()):
            mine = clients[owner == partition]
            if len(mine):
                content = records.train_request(global_params, records.round_settings(
                    mine, round_clients, round_seed, partition, self.config_text, self.rounds_run))
                messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
                sent[node] = (partition, len(mine))
        answered = exchange(self.grid, messages, self.timeout)
        self.wire_bytes = {"down": self.grid.down, "up": self.grid.up}
        usable = {node: r for node, r in answered.items() if not r.has_error()}
        lost = [{"partition": partition, "node": node, "clients": count,
                 "reason": f"it failed: {answered[node].error.reason}" if node in answered else
                 f"it gave no reply within {self.timeout:.0f} s (federated.flower.round_timeout)"}
                for node, (partition, count) in sent.items() if node not in usable]
        # in partition order, not arrival order: the same sum to the bit, run after run and on resume
        answers = [(partition, node, records.read_sums(usable[node].content, self.device))
                   for node, (partition, _) in sent.items() if node in usable]
        sums, self.dropped = merge_checked(answers, global_params, Uploads(self.settings).zeros(global_params), lost)
        return sums

    def secaggplus_round(self, clients, owner, round_clients, global_params: dict, round_seed: int):
        """The round through Flower's SecAgg+ workflow: the server sees only the nodes' masked vectors
        and their unmasked sum; a node that leaves mid-round is dropped and its masks recovered."""
        flower = self.settings["federated"]["flower"]
        requests = {node: records.round_settings(clients[owner == partition], round_clients, round_seed,
                                                 partition, self.config_text, self.rounds_run)
                    for partition, node in sorted(self.nodes.items()) if (owner == partition).any()}
        if len(requests) < flower["threshold"]:
            raise UserError(f"round {self.rounds_run} has clients on {len(requests)} node(s), fewer than "
                            f"federated.flower.threshold ({flower['threshold']}): sample more clients a round")
        sums, finished = secaggplus.run_round(self.grid, requests, global_params, self.rounds_run,
                                              len(round_clients), flower, self.timeout)
        self.wire_bytes = {"down": self.grid.down, "up": self.grid.up}  # its four exchanges
        self.dropped = [{"partition": r["partition"], "node": node, "clients": len(r["clients"]),
                         "reason": "left the round; SecAgg+ recovered its masks"}
                        for node, r in requests.items() if node not in finished]
        return sums.to(self.device)

    def round_extra(self) -> dict:
        return {"wire_bytes": self.wire_bytes, "dropped_nodes": self.dropped}


def problem(sums, global_params: dict) -> str | None:
    """Why a node's sums cannot be added to the round's (None: they can)."""
    if sums.update.keys() != global_params.keys():
        odd = sorted(set(sums.update) ^ set(global_params))
        return f"its update names parameters {odd[:3]} that the model's trainable ones do not match"
    for name, value in sums.update.items():
        if value.shape != global_params[name].shape:
            return f"{name} has shape {tuple(value.shape)}, not {tuple(global_params[name].shape)}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{name} holds non-finite values"
    for key, value in sums.stats.items():
        if not bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all()):
            return f"its {key} statistic is not finite"
    if not (sums.weight > 0 and sums.clients > 0):
        return f"it reports weight {sums.weight} over {sums.clients} clients"
    return None


def merge_checked(answers: list, global_params: dict, total, lost: list = ()):
    """Add each (partition, node id, RoundSums) answer to `total` unless `problem` finds one; return
    (total, the dropped nodes as {"partition", "node", "clients", "reason"}: those whose answer was
    unusable, after the `lost` ones that failed or did not answer). Dropping is refused under secure
    aggregation (the dropped node's masks would not cancel) and when nothing is left."""
    dropped = list(lost)
    for partition, node, sums in answers:
        reason = problem(sums, global_params)
        if reason is None and (sums.modulus is None) != (total.modulus is None):
            reason = "it answered with masked sums in a run without secure aggregation, or the reverse"
        if reason is None:
            total.merge(sums)
        else:
            dropped.append({"partition": partition, "node": node, "clients": int(sums.clients), "reason": reason})
    if dropped and (total.modulus is not None or total.clients == 0):
        why = "under secure aggregation the others' masks do not cancel without it" if total.modulus is not None \
            else "no node's update was usable"
        raise UserError("the round cannot go on: " + "; ".join(
            f"node {d['node']} (partition {d['partition']}): {d['reason']}" for d in dropped) + f" ({why})")
    return total, dropped
