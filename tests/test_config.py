"""Stage files: extends, overrides, validation."""
from __future__ import annotations

from pathlib import Path

import pytest

from recbole_ext.config import check_resumable, dump, load_config
from recbole_ext.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_stage_files_resolve_and_inherit():
    s3 = load_config(ROOT / "yamls" / "stage3.yaml")
    assert s3["stage"] == 3 and s3["model"]["experts"] and s3["model"]["align"]  # align inherited from stage 2
    assert s3["model"]["hidden_size"] == 128  # from base
    assert [Path(e["checkpoint"]).parent.name for e in s3["load"]] == ["stage1", "stage2"]
    assert Path(s3["run_dir"]).is_absolute() and s3["run_dir"].endswith("runs/stage3")


def test_extends_is_relative_to_the_file_and_absolute_paths_work(tmp_path):
    child = write(tmp_path / "sub" / "child.yaml", f"extends: {ROOT / 'yamls' / 'stage1.yaml'}\nname: child\n")
    grandchild = write(tmp_path / "sub" / "deeper" / "g.yaml", "extends: ../child.yaml\nseed: 7\n")
    cfg = load_config(grandchild)
    assert cfg["name"] == "child" and cfg["seed"] == 7 and cfg["stage"] == 1
    assert load_config(child)["seed"] == 2020


def test_set_overrides_nested_keys_with_yaml_values():
    cfg = load_config(ROOT / "yamls" / "stage1.yaml",
                      ["optim.learning_rate=0.05", "federated.rounds=3", "trainable=[gamma]", "optim.clip_grad_norm=null"])
    assert cfg["optim"]["learning_rate"] == 0.05 and cfg["federated"]["rounds"] == 3
    assert cfg["trainable"] == ["gamma"] and cfg["optim"]["clip_grad_norm"] is None


def test_ints_and_plain_scientific_notation_are_accepted_for_floats():
    assert load_config(ROOT / "yamls" / "stage1.yaml", ["optim.learning_rate=1"])["optim"]["learning_rate"] == 1.0
    assert load_config(ROOT / "yamls" / "stage1.yaml", ["optim.learning_rate=1e-4"])["optim"]["learning_rate"] == 1e-4
    groups = load_config(ROOT / "yamls" / "stage3.yaml", ["federated.server_lr_groups={gamma: 1, router.*: 1e-2}"])
    assert groups["federated"]["server_lr_groups"] == {"gamma": 1.0, "router.*": 0.01}


def test_the_schema_accepts_what_the_memory_accepts():
    # recency_decay 0: only an entry's frequency ranks it (tests/test_memory.py builds such a memory)
    assert load_config(ROOT / "yamls" / "stage3.yaml", ["model.memory.recency_decay=0.0"])["model"]["memory"][
        "recency_decay"] == 0.0


@pytest.mark.parametrize("sets, message", [
    (["federated.rouns=3"], r"unknown key 'federated.rouns' \(did you mean 'federated.rounds'\?\)"),
    (["optim.learning_rate=-0.1"], r"optim.learning_rate = -0.1 must be > 0"),
    (["federated.client_fraction=1.5"], r"federated.client_fraction = 1.5 must be in \(0, 1\]"),
    (["federated.clients_per_round=0"], r"federated.clients_per_round = 0 must be > 0"),
    (["federated.rounds=many"], r"federated.rounds must be int, got 'many'"),
    (["trainer=gossip"], r"trainer = 'gossip' must be one of federated, centralized"),
    (["load=[{checkpoint: x.pt}]"], r"load\[0\] must be"),
    (["rounds"], r"expected dotted.key=value"),
    (["federated.server_lr_groups={gamma: -1}"], r"server_lr_groups\['gamma'\] must be a learning rate > 0, got -1"),
    (["federated.server_lr_groups={gamma: fast}"], r"server_lr_groups\['gamma'\] must be a learning rate > 0"),
    (["federated.server_lr_groups=[gamma]"], r"federated.server_lr_groups must be dict"),
    (["model.memory.recency_decay=1.5"], r"model.memory.recency_decay = 1.5 must be in \[0, 1\]"),
])
def test_bad_overrides_name_the_key(sets, message):
    with pytest.raises(UserError, match=message):
        load_config(ROOT / "yamls" / "stage1.yaml", sets)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", f"extends: {ROOT / 'yamls' / 'base.yaml'}\nmodel:\n  hiden_size: 64\n")
    with pytest.raises(UserError, match=r"bad\.yaml: unknown key 'model.hiden_size'"):
        load_config(bad)


def test_extends_cycle_and_malformed_yaml(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "m.yaml", "name: [unclosed\n")
    with pytest.raises(UserError, match=r"m\.yaml: not valid YAML"):
        load_config(tmp_path / "m.yaml")


def test_a_run_folder_written_before_a_key_existed_still_loads_and_resumes(tmp_path):
    """config.yaml of an older run lacks keys added since (here federated.server_lr_groups): reading it
    as a saved config gives them their base.yaml default, and resuming does not count them as changed."""
    cfg = load_config(ROOT / "yamls" / "stage1.yaml", [f"run_dir={tmp_path}"])
    old = dump(cfg).replace("  server_lr_groups: {}\n", "")
    assert "server_lr_groups" not in old
    write(tmp_path / "config.yaml", old)
    assert load_config(tmp_path / "config.yaml", saved=True)["federated"]["server_lr_groups"] == {}
    with pytest.raises(UserError, match="missing key 'federated.server_lr_groups'"):
        load_config(tmp_path / "config.yaml")  # a stage file must still declare every key
    check_resumable(cfg)
    with pytest.raises(UserError, match="keys that differ: federated.server_lr_groups"):
        check_resumable(load_config(ROOT / "yamls" / "stage1.yaml",
                                    [f"run_dir={tmp_path}", "federated.server_lr_groups={gamma: 0.1}"]))
