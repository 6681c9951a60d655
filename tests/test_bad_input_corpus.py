"""Every case of tests/bad_inputs/: exit code 2, its expected message, no traceback, no run folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import run

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(p.name for p in CORPUS.iterdir() if (p / "expect.txt").is_file())


def test_the_corpus_covers_every_kind():
    assert len(CASES) >= 17


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
