"""Checkpoints carry each stage into the next: every declared group loads, nothing collapses."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from recbole_ext.errors import UserError
from recbole_ext.pipeline import Stage

BACKBONE = ["item_embedding", "position_embedding", "trm_encoder", "LayerNorm"]
ALIGN = ["visual_proj", "text_proj", "align_gating"]


def load_entry(checkpoint, groups):
    return "{checkpoint: " + str(checkpoint) + ", groups: [" + ", ".join(groups) + "]}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory, features):
    """A tiny stage 1 -> stage 2 run; returns their run folders."""
    root = tmp_path_factory.mktemp("chain")
    s1 = Stage(tiny_config("stage1.yaml", root / "s1", features), "stage1")
    s1.run(show_progress=False)
    s2 = Stage(tiny_config("stage2.yaml", root / "s2", features,
                           [f"load=[{load_entry(root / 's1' / 'best.pt', BACKBONE)}]", "federated.rounds=1"]),
               "stage2")
    s2.run(show_progress=False)
    return root


def stage3(chain, features, tmp_path, entries=None):
    entries = entries or [load_entry(chain / "s1" / "best.pt", BACKBONE), load_entry(chain / "s2" / "best.pt", ALIGN)]
    return Stage(tiny_config("stage3.yaml", tmp_path / "s3", features, [f"load=[{', '.join(entries)}]"]), "stage3")


def test_checkpoints_load_with_weights_only(chain):
    payload = torch.load(chain / "s2" / "best.pt", weights_only=True)
    assert set(payload) == {"state_dict", "meta"} and payload["meta"]["stage"] == 2


def test_every_declared_group_is_taken_from_its_checkpoint(chain, features, tmp_path):
    s3 = stage3(chain, features, tmp_path)
    assert s3.loaded == {**{g: str(chain / "s1" / "best.pt") for g in BACKBONE},
                         **{g: str(chain / "s2" / "best.pt") for g in ALIGN}}
    sources = {g: torch.load(path, weights_only=True)["state_dict"] for g, path in s3.loaded.items()}
    for name, param in s3.model.named_parameters():
        group = name.split(".")[0]
        if group in sources:
            assert torch.equal(param, sources[group][name]), name
    # the item embedding really came from stage 1 and differs from a fresh initialisation
    fresh = Stage(tiny_config("stage3.yaml", tmp_path / "fresh", features, ["load=[]"]), "fresh")
    assert not torch.equal(fresh.model.item_embedding.weight, s3.model.item_embedding.weight)


def test_stage3_starts_exactly_where_stage2_ended(chain, features, tmp_path):
    s2_cfg = tiny_config("stage2.yaml", tmp_path / "s2again", features,
                         [f"load=[{load_entry(chain / 's2' / 'best.pt', BACKBONE + ALIGN)}]"])
    s2 = Stage(s2_cfg, "stage2")
    s3 = stage3(chain, features, tmp_path)
    s2.model.eval(), s3.model.eval()
    with torch.no_grad():
        for interaction, *_ in s2.evaluator.loaders["test"]:
            assert torch.equal(s2.model.full_sort_predict(interaction), s3.model.full_sort_predict(interaction))


def test_a_missing_group_is_an_error(chain, features, tmp_path):
    s1_ckpt = chain / "s1" / "best.pt"
    payload = torch.load(s1_ckpt, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("trm_encoder.")}
    partial = tmp_path / "partial.pt"
    torch.save(payload, partial)
    with pytest.raises(UserError, match=r"partial\.pt.*trm_encoder"):
        stage3(chain, features, tmp_path, [load_entry(partial, BACKBONE)])
