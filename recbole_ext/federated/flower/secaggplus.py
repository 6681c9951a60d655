"""Real secure aggregation for the `flower` backend: Flower's SecAgg+ (Bell et al., CCS 2020; key
agreement, secret-shared masks, recovery of the masks of nodes that drop out mid-round), enabled by
`federated.flower.secaggplus`.

Flower's workflow aggregates a weighted mean of float vectors that each node quantizes into
[-clipping_range, clipping_range]; this project's server wants the round's sums (`RoundSums`). So every
node sends its sums divided by the round's client count (stats by a further STATS_RANGE), with weight 1
for every node; the server gets their mean over the m nodes that finished, and multiplies back. Client
weights are uniform under SecAgg+ (as under the simulated masks), so a node's weight is its client
count, which the server knows anyway: it goes beside the masked vector, in the clear, with the node's
upload bytes.

Quantization error: each node rounds each value stochastically to a step of 2 * clipping_range /
quantization_range, so a coordinate of the round's summed update is off by less than
m * n * 2 * clipping_range / quantization_range (n clients in the round), and the mean update by less
than m * 2 * clipping_range / quantization_range (`error_bound`). A value outside the range would be
clipped silently by Flower; the node refuses to send it instead.
"""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (Code, FitIns, FitRes, Parameters, Status, bytes_to_ndarray, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from ...errors import UserError
from ..aggregate import RoundSums
from ..privacy import SECAGGPLUS_RING

# A round's stats are weighted means of losses (a softmax over up to e^16 items has a loss below 16);
# divided by this they fit any clipping_range >= 1 with room to spare.
STATS_RANGE = 16.0


def error_bound(flower: dict, nodes: int) -> float:
    """The most the mean update of a round over `nodes` nodes differs from the exact one, per coordinate."""
    return nodes * 2 * flower["clipping_range"] / flower["quantization_range"]


# --- the node's side ------------------------------------------------------------------------------

def node_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod for the messages of a SecAgg+ round (they carry its config record),
    none for the others, so one ClientApp serves runs with and without it."""
    if is_secaggplus(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secaggplus(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def read_fit(msg: Message) -> tuple[dict, dict]:
    """(global parameters by name, the round's settings) from the legacy FitIns the workflow sends."""
    fit = compat.recorddict_to_fitins(msg.content, keep_input=True)
    settings = json.loads(fit.config["round"])
    arrays = parameters_to_ndarrays(fit.parameters)
    return {name: torch.from_numpy(np.array(a)) for name, a in zip(settings["names"], arrays)}, settings


def fit_reply(msg: Message, sums: RoundSums, settings: dict, flower: dict) -> Message:
    """The node's sums as the FitRes the SecAgg+ mod masks: every value scaled into the clipping
    range (refused if one is not), weight 1 (the mod's ratio to `max_weight`), the rest in the clear."""
    n, partition = len(settings["round_clients"]), settings["partition"]
    vector = [sums.update[name].detach().cpu().double().numpy() / n for name in settings["names"]]
    stats = {k: torch.as_tensor(v).detach().cpu().double() for k, v in sorted(sums.stats.items())}
    vector += [v.numpy().reshape(-1) / (n * STATS_RANGE) for v in stats.values()]
    largest = max(float(np.abs(v).max()) for v in vector if v.size)
    if largest > flower["clipping_range"]:
        raise ValueError(f"node {partition}: a summed value is {largest:.3g} after scaling, outside "
                         f"federated.flower.clipping_range ({flower['clipping_range']}); Flower would clip it")
    # The mod rounds stochastically from numpy's global generator: seeded, a resumed run rounds alike.
    np.random.seed((settings["round_seed"] + partition) % 2 ** 32)
    metrics = {"clients": int(sums.clients), "bytes_up": int(sums.bytes_up),
               "stats": json.dumps({k: list(v.shape) for k, v in stats.items()})}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), 1, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


# --- the server's side ----------------------------------------------------------------------------

class _Proxy:
    """What the workflow reads of a legacy ClientProxy: the node id."""

    def __init__(self, node_id: int):
        self.node_id = node_id
        self.cid = str(node_id)


class _RoundStrategy:
    """The two legacy Strategy calls the SecAgg+ workflow makes: whom to send what, and the unmasked
    mean (every result carries it) with each finishing node's plain metrics."""

    def __init__(self, fit_ins: dict):
        self.fit_ins, self.results = fit_ins, None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(node), fit) for node, fit in self.fit_ins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results
        return None, {}


def run_workflow(grid, fit_ins: dict, round_number: int, flower: dict, timeout: float | None = None) -> list:
    """One round of Flower's SecAgg+ workflow over `fit_ins` {node id: its FitIns} on `grid`; the
    (proxy, FitRes) of the nodes that finished, each FitRes carrying the unmasked mean (empty: the
    workflow halted)."""
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    strategy = _RoundStrategy(fit_ins)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round_number}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=strategy)
    SecAggPlusWorkflow(flower["shares"], flower["threshold"], max_weight=1.0, clipping_range=flower["clipping_range"],
                       quantization_range=flower["quantization_range"], modulus_range=SECAGGPLUS_RING,
                       timeout=timeout)(grid, context)
    return strategy.results or []


def run_round(grid, requests: dict, global_params: dict, round_number: int, round_clients: int,
              flower: dict, timeout: float):
    """One SecAgg+ round over `requests` {node id: the round's settings for that node (JSON-able)};
    returns (the round's RoundSums with plain float sums, {node id: clients} of the nodes that finished)."""
    names = list(global_params)
    parameters = ndarrays_to_parameters([global_params[n].detach().cpu().numpy() for n in names])
    results = run_workflow(grid, {node: FitIns(parameters, {"round": json.dumps({**settings, "names": names})})
                                  for node, settings in requests.items()}, round_number, flower, timeout)
    if not results:
        raise UserError(f"SecAgg+ could not finish round {round_number}: fewer than federated.flower.threshold "
                        f"({flower['threshold']}) of its {len(requests)} nodes stayed (the ServerApp's log names the stage)")
    finished = {proxy.node_id: res for proxy, res in results}
    mean = parameters_to_ndarrays(results[0][1].parameters)
    scale = len(finished) * round_clients
    update = {n: torch.from_numpy(mean[i] * scale).to(global_params[n].dtype).reshape(global_params[n].shape)
              for i, n in enumerate(names)}
    stat_shapes = json.loads(results[0][1].metrics["stats"])
    stats = {k: torch.from_numpy(mean[len(names) + i] * scale * STATS_RANGE).reshape(shape)
             for i, (k, shape) in enumerate(stat_shapes.items())}
    clients = {node: int(res.metrics["clients"]) for node, res in finished.items()}
    sums = RoundSums(update, stats, float(sum(clients.values())), sum(clients.values()),
                     sum(int(res.metrics["bytes_up"]) for res in finished.values()))
    return sums, clients


# --- what a SecAgg+ server receives from one node (the attack's view) -------------------------------

class _LoopbackGrid:
    """The two Grid calls the SecAgg+ workflow makes, answered by nodes in this process: each runs the
    SecAgg+ client mod (Flower's, unchanged) around a handler that returns its given vector. The
    masked vectors the nodes send up are kept, as the server receives them."""

    def __init__(self, vectors: dict):
        self.vectors = vectors  # node id -> the float arrays it sends (before quantization and masking)
        self.contexts = {node: Context(run_id=0, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in vectors}
        self.received = {}

    def get_node_ids(self):
        return list(self.vectors)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for sent in messages:
            # a copy, as the wire gives each node: the workflow sends one content to all, the mod edits it
            node = sent.metadata.dst_node_id
            msg = Message(copy.deepcopy(sent.content), dst_node_id=node, message_type=sent.metadata.message_type)
            fit = lambda m, _: Message(compat.fitres_to_recorddict(
                FitRes(Status(Code.OK, ""), ndarrays_to_parameters(self.vectors[node]), 1, {}), True), reply_to=m)
            reply = secaggplus_mod(msg, self.contexts[node], fit)
            masked = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
            if masked is not None:
                self.received[node] = [bytes_to_ndarray(b) for b in masked]
            replies.append(reply)
        return replies


def masked_upload(update: dict, flower: dict, nodes: int = 3) -> tuple[dict, int]:
    """(name -> what a SecAgg+ server receives of `update`, one node's sums already scaled into the
    clipping range: the node's masked ring elements; their bytes), from a round of Flower's workflow
    and client mod with `nodes` nodes (the others send zeros), run in this process."""
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:  # outside a ServerApp this process plays the run's server
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 0, 0
    names = list(update)
    mine = [update[n].detach().cpu().double().numpy() for n in names]
    grid = _LoopbackGrid({node: [v * (node == 1) for v in mine] for node in range(1, nodes + 1)})
    flwr_log = logging.getLogger("flwr")
    level, flwr_log.level = flwr_log.level, logging.WARNING  # its progress lines, once per attacked user
    try:
        run_workflow(grid, {node: FitIns(Parameters([], ""), {}) for node in grid.vectors}, 1, flower)
    finally:
        flwr_log.level = level
    received = grid.received[1]
    view = {n: torch.from_numpy(np.asarray(received[i + 1], dtype=np.float64)).reshape(update[n].shape)
            for i, n in enumerate(names)}  # after the node's masked weight factor
    return view, sum(a.nbytes for a in received)
