"""The nodes of a Flower deployment (docs/DEPLOY.md), as this project builds them: the run's training
data cut into one node-data file per partition, and the model a node trains, built from its file
alone (data/node_data.py says what a file holds).

    python run.py node-data --config FILE [--set KEY=VALUE ...] --out DIR     DIR/node-P.npz, P < nodes
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .data import node_data
from .errors import UserError
from .pipeline import Split, build_model, check_device, recbole_settings, set_determinism


def write_node_data(cfg: dict, where: str, out) -> list[Path]:
    """One file per partition of `federated.flower.nodes`: `out`/node-P.npz."""
    from .data.sequences import build_training_windows
    from .data.side_info import build_side_info
    from .model.ur4rec_moe import UR4RecMoE

    data, model = cfg["data"], cfg["model"]
    split = Split.load(cfg, where, UR4RecMoE, recbole_settings(cfg))
    windows = build_training_windows(split.dataset, split.train.dataset, data["max_seq_length"])
    side = build_side_info(split.dataset, data["text_features"], data["image_features"], model["text_dim"],
                           model["image_dim"], memory=None)
    parts = node_data.cut(windows, side, split.item_tokens, data["dataset"], cfg["federated"]["flower"]["nodes"])
    return [node_data.write(Path(out) / f"node-{part.partition}.npz", part) for part in parts]


class ItemCount:
    """What RecBole's SequentialRecommender reads from its dataset, for a node that has none."""

    def __init__(self, n_items: int):
        self.n_items = n_items

    def num(self, field: str) -> int:
        return self.n_items


class NodeStage:
    """The model and training windows of a run's config on a node that holds only `data`: the same
    weights, memory rows and windows as the server's stage for the node's users."""

    def __init__(self, cfg: dict, data: node_data.NodeData, where: str):
        from . import compat
        from .data.memory import MemoryConfig
        from .model.ur4rec_moe import UR4RecMoE

        if data.dataset != cfg["data"]["dataset"]:
            raise UserError(f"{where}: this node holds data of {data.dataset!r}, the run trains on "
                            f"{cfg['data']['dataset']!r}")
        check_device(cfg["device"], where)
        set_determinism(cfg["deterministic"])
        model = cfg["model"]
        rb_config = compat.recbole_config(UR4RecMoE, cfg["data"]["dataset"], recbole_settings(cfg))
        side = data.side_info(MemoryConfig(**model["memory"]) if model["experts"] else None)
        self.model, _ = build_model(cfg, rb_config, ItemCount(data.n_items), side, data.item_tokens, where)
        self.windows = data.windows(cfg["data"]["max_seq_length"]).to(cfg["device"])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="run.py node-data", description="Cut a run's training data into one file per Flower node "
        "(federated.flower.nodes): its users' training sequences and the public item tables.")
    parser.add_argument("--config", required=True, help="the stage file the deployment runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", required=True, help="folder for node-P.npz, one per partition P")
    args = parser.parse_args(argv)
    from .config import load_config

    cfg = load_config(args.config, args.set)
    for path in write_node_data(cfg, args.config, args.out):
        print(f"wrote {path}")
