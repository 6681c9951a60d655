"""A run never deletes what it did not write: a fresh stage run goes into a new or empty folder, or
with --overwrite in place of an earlier run of its own, and a folder holding anything else is refused
(exit code 2, before any work) whatever the flag. Baselines, sweeps and prepare: in their test files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import run
from conftest import ROOT
from recbole_ext.errors import UserError
from recbole_ext.runs import check_fresh

# the smoke run on the bad-input corpus's tiny dataset (6 users): seconds
TINY = [f"data.path={ROOT / 'tests' / 'bad_inputs' / '_data'}", "data.dataset=tiny", "data.max_users=null",
        "federated.rounds=2"]
USER_FILE = b"chapter 3, draft 7\n"


def stage(run_dir, *extra, capsys=None) -> tuple[int, str]:
    argv = ["--config", str(ROOT / "yamls" / "smoke.yaml"), "--quiet",
            *(a for s in [*TINY, f"run_dir={run_dir}"] for a in ("--set", s)), *extra]
    code = run.main(argv)
    return code, " ".join(capsys.readouterr().err.split()) if capsys else ""


@pytest.fixture
def thesis(tmp_path):
    """A folder of the user's, which a typo in run_dir could name."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(USER_FILE)
    return folder


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_folder_holding_user_files_is_refused(thesis, capsys, flags):
    code, err = stage(thesis, *flags, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert f"{thesis}: holds notes.txt, which no run of this project wrote" in err
    assert "--set run_dir=DIR" in err
    assert sorted(p.name for p in thesis.iterdir()) == ["notes.txt"]
    assert (thesis / "notes.txt").read_bytes() == USER_FILE


def test_run_dir_dot_is_refused_before_any_work(thesis, capsys, monkeypatch):
    monkeypatch.chdir(thesis)
    code, err = stage(".", "--overwrite", "--set", "data.dataset=no_such_dataset", capsys=capsys)
    assert code == 2 and f"{thesis}: holds notes.txt" in err  # the folder, not the missing dataset
    assert sorted(p.name for p in thesis.iterdir()) == ["notes.txt"]
    assert (thesis / "notes.txt").read_bytes() == USER_FILE


def test_a_fresh_run_goes_into_an_empty_existing_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert stage(tmp_path / "empty", capsys=capsys)[0] == 0
    assert (tmp_path / "empty" / "summary.json").is_file()


def test_an_earlier_run_is_replaced_only_with_overwrite_and_nothing_stale_stays(tmp_path, capsys):
    folder = tmp_path / "run"
    assert stage(folder, capsys=capsys)[0] == 0
    # what an interrupted earlier session can leave: a half-written checkpoint, another TensorBoard log
    (folder / "best.pt.tmp").write_bytes(b"half")
    old_events = folder / "log_tensorboard" / "model-earlier" / "events.out.tfevents.1.host"
    old_events.parent.mkdir()
    old_events.write_bytes(b"events")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    code, err = stage(folder, "--set", "federated.rounds=1", capsys=capsys)
    assert code == 2 and f"{folder}: holds an earlier stage run (" in err
    assert f"--resume {folder}" in err and "--overwrite" in err and "--set run_dir=DIR" in err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before

    assert stage(folder, "--overwrite", "--set", "federated.rounds=1", capsys=capsys)[0] == 0
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((folder / "summary.json").read_text())["rounds_run"] == 1
    assert not (folder / "best.pt.tmp").exists() and not old_events.parent.exists()
    assert len(list((folder / "log_tensorboard").iterdir())) == 1  # this run's own


def test_overwrite_refuses_a_run_folder_that_also_holds_a_user_file(tmp_path, capsys):
    folder = tmp_path / "run"
    assert stage(folder, capsys=capsys)[0] == 0
    (folder / "notes.txt").write_bytes(USER_FILE)
    summary = (folder / "summary.json").read_bytes()
    code, err = stage(folder, "--overwrite", capsys=capsys)
    assert code == 2 and f"{folder}: holds notes.txt, which no run of this project wrote" in err
    assert f"--resume {folder}" in err
    assert (folder / "notes.txt").read_bytes() == USER_FILE and (folder / "summary.json").read_bytes() == summary


def fake_run(folder: Path, run_dir: Path, *names: str) -> Path:
    """A folder holding a run's files, whose config.yaml says it was written for `run_dir`."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"name: x\nrun_dir: {run_dir}\n")
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_only_a_config_written_for_the_folder_makes_it_a_run(tmp_path, monkeypatch):
    own = fake_run(tmp_path / "own", tmp_path / "own", "summary.json", "state.pt")
    # config.yaml last: a removal cut short still leaves a folder recognised as a run
    assert [p.name for p in check_fresh(own, overwrite=True)] == ["state.pt", "summary.json", "config.yaml"]
    # a stage file that happens to be called config.yaml, beside the user's own summary.json
    stage_file = tmp_path / "stage_file"
    stage_file.mkdir()
    monkeypatch.chdir(stage_file)  # where its relative run_dir points
    (stage_file / "config.yaml").write_text("extends: ../yamls/stage1.yaml\nrun_dir: .\n")
    (stage_file / "summary.json").write_text("{}")
    # a copy of a run folder belongs to whoever copied it
    copied = fake_run(tmp_path / "copied", tmp_path / "elsewhere", "summary.json")
    linked = fake_run(tmp_path / "linked", tmp_path / "linked")
    (linked / "best.pt").symlink_to(stage_file / "summary.json")
    for folder, names in ((stage_file, "config.yaml and summary.json"), (copied, "config.yaml and summary.json"),
                          (linked, "best.pt")):
        with pytest.raises(UserError, match=f"holds {names}, which no run"):
            check_fresh(folder, overwrite=True)
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for path in (tmp_path / "file", tmp_path / "dangling"):
        with pytest.raises(UserError, match="is not a folder"):
            check_fresh(path, overwrite=True)


def test_a_stage_run_and_a_baseline_never_replace_each_other(tmp_path):
    baseline = fake_run(tmp_path / "b", tmp_path / "b", "baseline.json", "summary.json")
    with pytest.raises(UserError, match="holds a baseline, which --overwrite does not replace with a stage run"):
        check_fresh(baseline, overwrite=True)
    assert check_fresh(baseline, overwrite=True, kind="baseline")
    started = fake_run(tmp_path / "s", tmp_path / "s")  # stopped before writing anything but its config
    assert check_fresh(started, overwrite=True, kind="baseline")


def test_many_foreign_entries_are_named_a_few_then_counted(tmp_path):
    for i in range(8):
        (tmp_path / f"chapter{i}.tex").write_text("")
    (tmp_path / "figures").mkdir()
    with pytest.raises(UserError, match=r"holds chapter0\.tex, .*chapter4\.tex and 4 more, which no run"):
        check_fresh(tmp_path)
