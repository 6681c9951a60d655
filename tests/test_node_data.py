"""A Flower node's data file (data/node_data.py, nodes.py): its partition's users' training sequences
and the public item tables, from which the node trains those users exactly as the server's stage would.
No Flower here: the ClientApp (tests/test_flower.py) only reads the file and calls these."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from recbole_ext.data import node_data
from recbole_ext.errors import UserError
from recbole_ext.federated.vectorized import VectorizedBackend
from recbole_ext.nodes import NodeStage, write_node_data
from recbole_ext.pipeline import Stage

# stage 3 with both modalities: the memory, the features and every trainable group a node rebuilds
SETS = ["load=[]", "federated.flower.nodes=3"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, features):
    folder = tmp_path_factory.mktemp("node-data")
    cfg = tiny_config("stage3.yaml", folder / "run", features, SETS)
    return Stage(cfg, "stage3.yaml"), write_node_data(cfg, "stage3.yaml", folder / "nodes")


def test_users_are_dealt_to_the_nodes_round_robin():
    assert node_data.partition_of(np.arange(1, 11), 4).tolist() == [1, 2, 3, 0, 1, 2, 3, 0, 1, 2]


def test_each_file_holds_its_partitions_training_sequences_and_nothing_else(server):
    stage, files = server
    windows = stage.windows
    held = [node_data.read(path) for path in files]
    assert [d.partition for d in held] == [0, 1, 2] and {d.partitions for d in held} == {3}
    assert np.array_equal(np.sort(np.concatenate([d.users for d in held])), windows.clients)
    for data in held:
        assert (node_data.partition_of(data.users, 3) == data.partition).all()
        for user, seq in zip(data.users, data.histories):
            # the training items only: the validation and test items are the server's
            assert np.array_equal(seq, windows.history[user]) and len(seq) == windows.num_targets[user] + 1
        assert list(data.item_tokens) == list(stage.item_tokens)
        assert torch.equal(data.side.text, stage.model.text_feat) and torch.equal(data.side.image, stage.model.image_feat)


def test_a_node_trains_its_users_from_its_file_as_the_server_would(server):
    """The node's model starts from the server's weights, its windows and memory rows are the
    server's for its users, and a round of its clients gives the server's sums to the bit."""
    stage, files = server
    data = node_data.read(files[1])
    node = NodeStage(stage.cfg, data, "node 1")
    ours, theirs = stage.model.state_dict(), node.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k != "memory")
    params = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    for name, param in node.model.named_parameters():
        param.requires_grad_(name in params)
    for user in data.users:
        server_rows = stage.windows.windows_of([user])
        node_rows = node.windows.windows_of([user])
        assert torch.equal(stage.windows.inputs[server_rows], node.windows.inputs[node_rows])
        assert torch.equal(stage.model.memory[stage.windows.mem_rows[server_rows]],
                           node.model.memory[node.windows.mem_rows[node_rows]])
        assert torch.equal(stage.windows.excluded([user]), node.windows.excluded([user]))
    round_clients = stage.windows.clients[::2]
    mine = np.intersect1d(round_clients, data.users)
    assert 2 <= len(mine) < len(data.users)
    sums, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as on a node: with more, a CPU's reductions may add in another order
    try:
        for model, windows in ((stage.model, stage.windows), (node.model, node.windows)):
            torch.manual_seed(5)
            backend = VectorizedBackend(model, windows, stage.cfg)
            sums.append(backend.train_clients(mine, params, 11, round_clients=round_clients))
    finally:
        torch.set_num_threads(threads)
    assert sums[0].update.keys() == sums[1].update.keys()
    assert all(torch.equal(sums[0].update[k], sums[1].update[k]) for k in sums[0].update)
    assert any(bool(v.any()) for v in sums[1].update.values())
    assert {k: float(v.sum()) for k, v in sums[0].stats.items()} == {k: float(v.sum()) for k, v in sums[1].stats.items()}
    with pytest.raises(ValueError, match="not held here"):
        node.windows.excluded([int(np.setdiff1d(stage.windows.clients, data.users)[0])])


def test_the_server_tells_a_node_of_another_partition_or_data_apart(server, tmp_path, features):
    stage, files = server
    data = node_data.read(files[2])
    node = NodeStage(stage.cfg, data, "node 2")
    summaries = [node_data.partition_summary(stage.windows, p, 3) for p in range(3)]
    assert node_data.partition_summary(node.windows, 2, 3) == summaries[2]
    assert summaries[2] not in summaries[:2]
    other_cfg = tiny_config("stage3.yaml", tmp_path / "run", features, [*SETS, "data.max_users=28"])
    other = write_node_data(other_cfg, "other", tmp_path / "nodes")[2]
    other_node = NodeStage(stage.cfg, node_data.read(other), "node 2")
    assert node_data.partition_summary(other_node.windows, 2, 3) != summaries[2]


def test_a_missing_broken_or_foreign_file_is_refused_naming_it(server, tmp_path):
    stage, files = server
    with pytest.raises(UserError, match="nowhere.npz does not exist"):
        node_data.read(tmp_path / "nowhere.npz")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(files[0].read_bytes()[:500])
    with pytest.raises(UserError, match="broken.npz cannot be read"):
        node_data.read(broken)
    cfg = {**stage.cfg, "data": {**stage.cfg["data"], "dataset": "amazon-beauty"}}
    with pytest.raises(UserError, match="holds data of 'ml-100k'.*'amazon-beauty'"):
        NodeStage(cfg, node_data.read(files[0]), "node 0")
