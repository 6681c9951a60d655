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


def test_stage_files_resolve_and_inherit(tmp_path, monkeypatch):
    """Properties of yamls/stage{1,2,3}.yaml that hold whatever values they hold: each stage file
    overrides exactly the keys it names and takes the rest from the file it extends; stage k loads
    the checkpoints that the earlier stages write, with every group they trained, from whichever
    directory the three are run; and no two stages share a run folder."""
    import os

    import yaml

    from recbole_ext.runs import CHECKPOINT
    from recbole_ext.stages import group_of

    def flat(node, prefix=""):  # {dotted key: value}; a list, or the sweep's tune.space, is one value
        if isinstance(node, dict) and node and prefix != "tune.space.":
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    def resolved_as_set(key, value):  # how load_config turns a value the file names into the resolved one
        if key in ("run_dir", "data.path", "data.text_features", "data.image_features", "tune.storage_path"):
            return None if value is None else os.path.abspath(os.path.expanduser(value))
        if key == "load":
            return [{**e, "checkpoint": os.path.abspath(os.path.expanduser(e["checkpoint"]))} for e in value]
        return value

    files = [ROOT / "yamls" / f"stage{k}.yaml" for k in (1, 2, 3)]
    for cwd in (ROOT, tmp_path):  # relative paths resolve against the directory the stages run from
        monkeypatch.chdir(cwd)
        stages = [load_config(f) for f in files]
        assert [s["stage"] for s in stages] == [1, 2, 3]
        for file, stage in zip(files, stages):
            raw = yaml.safe_load(file.read_text())
            parent = flat(load_config(file.parent / raw.pop("extends")))
            named, mine = flat(raw), flat(stage)
            for key in set(parent) | set(mine):
                if key == "run_dir":
                    continue  # checked below: it defaults to runs/<name>, and each stage names itself
                expected = resolved_as_set(key, named[key]) if key in named else parent.get(key)
                assert mine.get(key) == expected, f"{file.name}: {key} is {mine.get(key)!r}, expected {expected!r}"
        run_dirs = [Path(s["run_dir"]) for s in stages]
        assert all(d.is_absolute() for d in run_dirs) and len(set(run_dirs)) == 3, run_dirs
        for k, stage in enumerate(stages):
            loads = {}  # checkpoint -> the groups taken from it
            for entry in stage["load"]:
                loads.setdefault(Path(entry["checkpoint"]), set()).update(entry["groups"])
            assert set(loads) == {d / CHECKPOINT for d in run_dirs[:k]}, f"{files[k].name} loads {sorted(loads)}"
            for earlier, d in zip(stages[:k], run_dirs):
                trained = {group_of(pattern) for pattern in earlier["trainable"]}
                assert trained <= loads[d / CHECKPOINT], \
                    f"{files[k].name} drops {sorted(trained - loads[d / CHECKPOINT])} trained in {d}"


def test_extends_is_relative_to_the_file_and_absolute_paths_work(tmp_path):
    child = write(tmp_path / "sub" / "child.yaml", f"extends: {ROOT / 'yamls' / 'stage1.yaml'}\nname: child\n")
    grandchild = write(tmp_path / "sub" / "deeper" / "g.yaml", "extends: ../child.yaml\nseed: 7\n")
    cfg = load_config(grandchild)
    stage1 = load_config(ROOT / "yamls" / "stage1.yaml")
    assert cfg["name"] == "child" and cfg["seed"] == 7 and cfg["stage"] == stage1["stage"]
    assert load_config(child)["seed"] == stage1["seed"] != 7


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
