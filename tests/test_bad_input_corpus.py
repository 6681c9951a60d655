"""Every case of tests/bad_inputs/: exit code 2, its expected message, no traceback, no run folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import run

CORPUS = Path(__file__).parent / "bad_inputs"
# Every folder is a case, except the shared material (`_base.yaml`, `_data/`; names starting with `_`),
# so a case folder that lost a file fails below rather than dropping out of the run.
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def test_every_case_folder_is_a_runnable_case():
    """Each case folder holds the config it runs and an expectation that can fail: a regular
    expression that compiles and does not match an empty message (so '', '.*' or 'x?' cannot pass
    every error)."""
    assert CASES, f"{CORPUS} holds no case folders"
    for case in CASES:
        folder = CORPUS / case
        assert (folder / "config.yaml").is_file(), f"{case}: no config.yaml"
        assert (folder / "expect.txt").is_file(), f"{case}: no expect.txt"
        expected = (folder / "expect.txt").read_text().strip()
        try:
            pattern = re.compile(expected)
        except re.error as err:
            raise AssertionError(f"{case}: expect.txt is not a regular expression: {err}") from None
        assert not pattern.search(""), f"{case}: expect.txt {expected!r} matches any message"


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, monkeypatch, capsys):
    folder = CORPUS / case
    monkeypatch.chdir(folder)
    code = run.main(["--config", "config.yaml", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    expected = (folder / "expect.txt").read_text().strip()
    assert re.search(expected, " ".join(err.split())), f"{case}: {err!r} does not match {expected!r}"
    assert not (folder / "runs").exists(), f"{case} left a run folder"


def test_the_shared_base_is_valid(tmp_path, monkeypatch):
    """The control: without its defect a case would run, so each error comes from the defect."""
    monkeypatch.chdir(CORPUS / "unknown_key")
    assert run.main(["--config", "../_base.yaml", "--quiet", "--set", f"run_dir={tmp_path / 'ok'}"]) == 0
    assert (tmp_path / "ok" / "summary.json").is_file()
