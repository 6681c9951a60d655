"""Ray Tune sweeps of stage 2: the search space in the config, and real sweeps on a local Ray (2 CPUs)
over tiny data: outputs, a diverging trial, an interrupted sweep resumed, best.yaml run as a stage."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import run
from conftest import ROOT, recbole_example_dir, tiny_config
from recbole_ext.config import load_config
from recbole_ext.errors import UserError
from recbole_ext.pipeline import Stage
from recbole_ext.runs import read_metrics
from recbole_ext.analysis.sweep_report import loss_curve_trials, row_of

SMOKE = str(ROOT / "yamls" / "tune_smoke.yaml")
BACKBONE = "[item_embedding, position_embedding, trm_encoder, LayerNorm]"
ROUNDS = 3


def test_tune_files_declare_the_sweep():
    cfg = load_config(ROOT / "yamls" / "tune_stage2.yaml")
    assert cfg["stage"] == 2 and cfg["trainable"] == ["visual_proj.*", "text_proj.*", "align_gating.*"]
    assert cfg["tune"]["space"] == {
        "federated.server_lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "model.projector_init_gain": {"type": "loguniform", "low": 1e-2, "high": 1.0}}
    assert cfg["tune"]["scheduler"] == "asha" and cfg["tune"]["storage_path"].endswith("runs/tune")
    smoke = load_config(SMOKE)
    assert smoke["tune"]["trials"] == 2 and smoke["tune"]["space"] == cfg["tune"]["space"]
    assert smoke["load"][0]["checkpoint"].endswith("runs/smoke/best.pt")


@pytest.mark.parametrize("path", ["ml1m/tune_stage2.yaml", "amazon/tune_stage2.yaml"])
def test_the_real_data_sweeps_span_the_stability_study_ranges(path):
    cfg = load_config(ROOT / "yamls" / path)
    space = cfg["tune"]["space"]
    assert space["federated.server_lr"]["low"] <= 1e-4 and space["federated.server_lr"]["high"] >= 1e-1
    assert space["model.projector_init_gain"]["low"] <= 1e-3 and space["model.projector_init_gain"]["high"] >= 10
    assert all(spec["type"] == "loguniform" for spec in space.values())
    assert cfg["stage"] == 2 and cfg["tune"]["trials"] >= 24 and cfg["tune"]["scheduler"] == "asha"
    assert cfg["eval"]["every"] == 1 and cfg["tune"]["protocol"] == "full"  # every round reports


def test_the_loss_curves_show_the_best_and_worst_stable_trials_and_the_first_to_diverge():
    cfg = load_config(SMOKE)
    row = lambda name, status, value, diverged=None, rounds=4: {
        "trial": name, "status": status, "valid_uni100_ndcg@10": value, "diverged_round": diverged, "rounds_run": rounds}
    rows = [row("a", "ok", 0.2), row("b", "pruned", 0.1), row("c", "diverged", 0.3, 5), row("d", "ok", 0.3),
            row("e", "diverged", None, 2), row("f", "error", None, rounds=0), row("g", "diverged", 0.1, 3)]
    chosen = [(r["trial"], kind) for r, kind in loss_curve_trials(rows, cfg, most_diverged=2)]
    assert chosen == [("d", "best"), ("b", "worst"), ("e", "diverged"), ("g", "diverged")]
    assert [(r["trial"], kind) for r, kind in loss_curve_trials(rows[:1], cfg, 2)] == [("a", "best")]  # one stable trial is not also the worst


def test_space_dimensions_can_be_set_from_the_command_line_and_files_replace_the_space(tmp_path):
    cfg = load_config(SMOKE, ["tune.space.loss.lambda_align={type: choice, values: [0, 0.1]}",
                              "tune.space.optim.learning_rate={type: grid, values: [0.001, 0.01]}"])
    assert cfg["tune"]["space"]["loss.lambda_align"] == {"type": "choice", "values": [0, 0.1]}
    assert cfg["tune"]["space"]["optim.learning_rate"]["type"] == "grid"
    assert "model.projector_init_gain" in cfg["tune"]["space"]
    replaced = load_config(SMOKE, ["tune.space={optim.weight_decay: {type: uniform, low: 0, high: 0.1}}"])
    assert list(replaced["tune"]["space"]) == ["optim.weight_decay"]
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {SMOKE}\ntune:\n  space:\n    model.align_beta: {{type: uniform, low: 0.5, high: 2}}\n")
    assert list(load_config(child)["tune"]["space"]) == ["model.align_beta"]  # not merged with the parent's


@pytest.mark.parametrize("key, spec, message", [
    ("optim.learning_rat", "{type: loguniform, low: 0.001, high: 0.1}",
     r"unknown key 'optim.learning_rat' \(did you mean 'optim.learning_rate'\?\)"),
    ("optim.learning_rate", "{type: normal, low: 0.001, high: 0.1}", r"tune.space\['optim.learning_rate'\] must be"),
    ("optim.learning_rate", "{type: uniform, low: 0.001}", r"tune.space\['optim.learning_rate'\] must be"),
    ("optim.learning_rate", "{type: loguniform, low: 0.1, high: 0.001}", r"low \(0.1\) must be below high"),
    ("optim.learning_rate", "{type: loguniform, low: 0, high: 0.1}", r"optim.learning_rate = 0.0 must be > 0"),
    ("model.align_beta", "{type: loguniform, low: -1, high: 1}", r"loguniform range needs low > 0"),
    ("federated.rounds", "{type: uniform, low: 1, high: 5}", r"federated.rounds is not a float"),
    ("federated.rounds", "{type: choice, values: [2, many]}", r"federated.rounds must be int, got 'many'"),
    ("loss.type", "{type: choice, values: []}", r"values must be a non-empty list"),
    ("tune.trials", "{type: choice, values: [1, 2]}", r"tune.space\['tune.trials'\]: cannot be swept"),
])
def test_bad_space_entries_name_the_key(key, spec, message):
    with pytest.raises(UserError, match=message):
        load_config(SMOKE, [f"tune.space.{key}={spec}"])


def test_a_sweep_without_its_stage1_checkpoint_stops_cleanly(tmp_path, capsys, features):
    code = run.main(["tune", "--config", SMOKE, "--set", f"data.path={recbole_example_dir()}",
                     "--set", f"data.text_features={features['text']}",
                     "--set", f"load=[{{checkpoint: {tmp_path / 'none.pt'}, groups: {BACKBONE}}}]",
                     "--set", f"tune.storage_path={tmp_path / 'sweeps'}"])
    # run.py wraps the message at 100 columns, so a long tmp_path may break it anywhere
    assert code == 2 and "none.pt: checkpoint not found" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("held", ["notes.txt", "sweep.yaml"])
def test_a_new_sweep_refuses_a_folder_that_already_holds_files(tmp_path, capsys, monkeypatch, held):
    """Two sweeps of one name started in the same second, or the user's folder: refused before any work
    (this sweep's stage-1 checkpoint does not even exist)."""
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    sweep_dir = tmp_path / "sweeps" / "tune-smoke-20260101-000000"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / held).write_bytes(b"not yours\n")
    code = run.main(["tune", "--config", SMOKE, "--set", f"tune.storage_path={tmp_path / 'sweeps'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and f"{sweep_dir}: the new sweep's folder already holds {held};" in err
    assert ("run.py tune --resume" in err) == (held == "sweep.yaml") and "--set tune.storage_path" in err
    assert [p.name for p in sweep_dir.iterdir()] == [held] and (sweep_dir / held).read_bytes() == b"not yours\n"


# ---- real sweeps -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage1(tmp_path_factory, features):
    """A tiny stage-1 run (its best.pt and summary.json) for the sweeps to start stage 2 from."""
    root = tmp_path_factory.mktemp("tune")
    Stage(tiny_config("stage1.yaml", root / "stage1", features), "stage1").run(show_progress=False)
    return root / "stage1"


def sweep_args(stage1, features, storage, learning_rates, *extra, rounds=ROUNDS):
    """`run.py tune` arguments: tune_smoke.yaml on the test's tiny data, a grid over learning rates.
    ASHA's grace period is the whole run, so it cannot prune a trial whichever trial reports first."""
    sets = [f"data.path={recbole_example_dir()}", "data.max_users=30", f"data.text_features={features['text']}",
            f"data.image_features={features['image']}", "loss.num_negatives=16", "federated.clients_per_round=8",
            f"federated.rounds={rounds}", f"load=[{{checkpoint: {stage1 / 'best.pt'}, groups: {BACKBONE}}}]",
            f"tune.storage_path={storage}", "tune.trials=1", f"tune.grace_period={rounds}",
            f"tune.space.federated.server_lr={{type: grid, values: {learning_rates}}}", *extra]
    return ["tune", "--config", SMOKE, *(arg for s in sets for arg in ("--set", s))]


def read_rows(sweep_dir):
    with open(sweep_dir / "trials.csv") as f:
        return {row["federated.server_lr"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def sweep(stage1, features, tmp_path_factory):
    """Two trials run side by side under ASHA: a sane learning rate and one that must blow up."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run.main(sweep_args(stage1, features, tmp_path_factory.mktemp("sweeps"), "[0.003, 1000.0]"))
    assert code == 0, out.getvalue()
    stdout = out.getvalue()
    return {"dir": Path(stdout.strip().splitlines()[-1].split("sweep folder: ")[1]), "stdout": stdout}


@pytest.mark.slow
def test_a_sweep_writes_its_folder_and_ends_with_the_best_trials(sweep):
    rows = read_rows(sweep["dir"])
    assert set(rows) == {"0.003", "1000.0"}
    ok = rows["0.003"]
    assert ok["status"] == "ok" and ok["rounds_run"] == str(ROUNDS) and ok["error"] == ""
    for protocol in ("full", "uni100"):
        for metric in ("hit@10", "ndcg@10"):
            assert 0 <= float(ok[f"valid_{protocol}_{metric}"]) <= 1
    assert 1 <= int(ok["best_round"]) <= ROUNDS and float(ok["model.projector_init_gain"]) > 0
    assert float(ok["final_loss"]) > 0 and ok["final_rec_loss"] and ok["final_align_loss"]
    assert (sweep["dir"] / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (sweep["dir"] / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = sweep["stdout"].strip().splitlines()
    assert lines[-1] == f"sweep folder: {sweep['dir']}"
    table = lines[lines.index("best trials:"):-1]
    assert ok["trial"] in table[3] and "ok" in table[3]  # the stable trial ranks first


@pytest.mark.slow
def test_a_diverging_trial_is_stopped_and_recorded_without_failing_the_sweep(sweep):
    rows = read_rows(sweep["dir"])
    diverged = rows["1000.0"]
    assert diverged["status"] == "diverged" and diverged["error"] == ""
    # round 1's loss is taken before the first update; the blow-up shows in round 2, where the run stops
    assert diverged["diverged_round"] == "2" and diverged["rounds_run"] == "2"
    assert float(diverged["final_loss"]) > 10 * float(diverged["first_loss"])
    assert diverged["criterion"] == "not met"
    assert f"{diverged['trial']} diverged" in sweep["stdout"]


@pytest.mark.slow
def test_the_sweep_prints_its_progress_while_it_runs(sweep):
    lines = sweep["stdout"].splitlines()
    status = [line for line in lines if line.startswith("sweep: ") and "trials ended" in line]
    assert len(status) == 2  # one after each ended trial
    assert status[0].startswith("sweep: 1/2 trials ended") and "0 error" in status[0]
    ok = read_rows(sweep["dir"])["0.003"]
    assert status[1].startswith("sweep: 2/2 trials ended (1 ok, 0 pruned, 1 diverged, 0 error), 0 running, 0 waiting")
    assert f"best valid uni100_ndcg@10 {float(ok['valid_uni100_ndcg@10']):.4f} ({ok['trial']}, round" in status[1]
    # a trial that later diverges may lead for a while; the status line then ranks as trials.csv does
    assert any(line.startswith("sweep: new best valid uni100_ndcg@10 ") for line in lines)


@pytest.mark.slow
def test_a_trial_that_fails_says_why_in_its_row_and_the_sweep_goes_on(stage1, features, tmp_path):
    missing = tmp_path / "no_text.npz"
    args = sweep_args(stage1, features, tmp_path, "[0.003]",
                      f"tune.space.data.text_features={{type: grid, values: [{features['text']}, {missing}]}}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run.main(args) == 0
    sweep_dir = Path(out.getvalue().strip().splitlines()[-1].split("sweep folder: ")[1])
    with open(sweep_dir / "trials.csv") as f:
        rows = {Path(row["data.text_features"]).name: row for row in csv.DictReader(f)}
    failed = rows["no_text.npz"]
    assert failed["status"] == "error" and str(missing) in failed["error"] and "\n" not in failed["error"]
    assert rows[Path(features["text"]).name]["status"] == "ok"
    assert f"{failed['trial']} error: " in out.getvalue() and "(1 ok, 0 pruned, 0 diverged, 1 error)" in out.getvalue()

    # once the file exists, a resume runs the failed trial again and keeps the finished one
    shutil.copy(features["text"], missing)
    finished = (sweep_dir / rows[Path(features["text"]).name]["trial"] / "run" / "metrics.jsonl").read_bytes()
    with contextlib.redirect_stdout(io.StringIO()):
        assert run.main(["tune", "--resume", str(sweep_dir)]) == 0
    with open(sweep_dir / "trials.csv") as f:
        assert {row["trial"]: row["status"] for row in csv.DictReader(f)} == {
            failed["trial"]: "ok", rows[Path(features["text"]).name]["trial"]: "ok"}
    assert (sweep_dir / rows[Path(features["text"]).name]["trial"] / "run" / "metrics.jsonl").read_bytes() == finished


@pytest.mark.slow
def test_a_report_of_a_finished_sweep_writes_the_same_table(sweep, capsys):
    table = (sweep["dir"] / "trials.csv").read_text()
    (sweep["dir"] / "trials.csv").unlink()
    assert run.main(["tune", "--report", str(sweep["dir"])]) == 0
    assert (sweep["dir"] / "trials.csv").read_text() == table
    assert "best trials:" in capsys.readouterr().out


@pytest.mark.slow
def test_the_sweep_reads_stage1_from_the_summary_beside_its_checkpoint(sweep, stage1):
    stage1_hit = json.loads((stage1 / "summary.json").read_text())["valid"]["uni100"]["hit@10"]
    assert float(read_rows(sweep["dir"])["0.003"]["stage1_valid_hit@10"]) == stage1_hit


def criterion_of(tmp_path, valid: list[tuple[float, float]], criterion: str | None = "stage2") -> dict:
    """The trials.csv row of a stage-2 trial whose validations gave these (HR@10, NDCG@10) pairs,
    against a stage 1 with validation HR@10 0.20, in a sweep declaring `criterion`; its losses fall
    every round, whatever it validates."""
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "summary.json").write_text(json.dumps({"stage": 1, "valid": {"full": {"hit@10": 0.20}}}))
    run_dir = tmp_path / "trial" / "run"
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, (hit, ndcg) in enumerate(valid):
            f.write(json.dumps({"round": i + 1, "loss": 2.0 - 0.1 * i, "rec_loss": 1.0, "align_loss": 1.0,
                                "valid": {p: {"hit@10": hit, "ndcg@10": ndcg} for p in ("full", "uni100")}}) + "\n")
    cfg = {"trainer": "federated", "federated": {"rounds": len(valid)},
           "load": [{"checkpoint": str(tmp_path / "stage1" / "best.pt")}],
           "tune": {"protocol": "full", "metric": "ndcg@10", "mode": "max", "space": {}, "criterion": criterion}}
    return row_of(cfg, tmp_path / "trial", {}, {"round": len(valid)}, None)


@pytest.mark.parametrize("valid, expected", [
    ([(0.19, 0.100), (0.20, 0.110), (0.20, 0.100)], "met"),        # holds 91% of its best
    ([(0.19, 0.100), (0.20, 0.110), (0.17, 0.095)], "not met"),    # falls to 86% of its best
    ([(0.14, 0.070), (0.14, 0.070), (0.14, 0.070)], "not met"),    # steady, but 0.06 below stage 1's HR@10
    ([(0.20, 0.110)], "unknown"),                                  # no trend from one validation
])
def test_the_stage2_criterion_asks_for_stage1_level_and_a_held_validation(tmp_path, valid, expected):
    row = criterion_of(tmp_path, valid)
    assert row["criterion"] == expected
    assert row["final_valid_full_ndcg@10"] == valid[-1][1] and row["valid_full_ndcg@10"] == max(v[1] for v in valid)


def test_the_stage2_sweeps_declare_the_stage2_criterion_and_others_none():
    assert load_config(ROOT / "yamls" / "stage2.yaml")["tune"]["criterion"] is None
    assert all(load_config(ROOT / "yamls" / path)["tune"]["criterion"] == "stage2"
               for path in ("tune_stage2.yaml", "ml1m/tune_stage2.yaml", "amazon/tune_stage2.yaml"))


def test_a_trial_row_has_no_criterion_unless_the_sweep_declares_one(tmp_path):
    row = criterion_of(tmp_path, [(0.19, 0.100), (0.20, 0.110), (0.17, 0.095)], criterion=None)
    assert "criterion" not in row and "stage1_valid_hit@10" not in row
    assert row["final_valid_full_ndcg@10"] == 0.095 and list(row)[-1] == "error"


def test_an_unknown_criterion_stops_the_sweep_naming_the_key(tmp_path, capsys):
    code = run.main(["tune", "--config", SMOKE, "--set", "tune.criterion=stage3",
                     "--set", f"tune.storage_path={tmp_path}"])
    err = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert code == 2 and "tune.criterion = 'stage3' must be one of stage2" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_best_yaml_runs_as_a_stage_config(sweep, capsys):
    best = sweep["dir"] / "best.yaml"
    cfg = yaml.safe_load(best.read_text())
    ok = read_rows(sweep["dir"])["0.003"]
    assert cfg["federated"]["server_lr"] == 0.003
    assert repr(cfg["model"]["projector_init_gain"]) == ok["model.projector_init_gain"]
    assert run.main(["--config", str(best), "--quiet"]) == 0
    summary = json.loads((sweep["dir"] / "best" / "summary.json").read_text())
    assert summary["stage"] == 2 and summary["name"] == "tune-smoke-best"
    assert capsys.readouterr().out.strip().endswith(f"run folder: {sweep['dir'] / 'best'}")
    assert run.main(["--config", str(best), "--quiet"]) == 2  # a second time it asks for --overwrite
    assert f"{sweep['dir'] / 'best'}: holds an earlier stage run" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(stage1, features, tmp_path):
    """Two trials one after the other; Ctrl+C while the second one is provably mid-run, then
    `run.py tune --resume`.

    $UR4REC_TUNE_HOLD (tune._Reporter.hold) makes each trial stop after reporting its first round that
    has a resumable state behind it (round 2: round 1's state.pt) and wait, with a marker file, until
    the test deletes that marker. The test lets the first trial go on to its end, and sends Ctrl+C
    while the second one waits: nothing races the interrupt, so the trials need no more rounds than
    the checks below. (The held trial never reports again, so Tune ends its worker by force, 10 s
    after Ctrl+C: most of the driver's stop time.) The test waits for events, never for a fixed time:
    it reads the driver's output as it comes and looks for the markers every 0.2 s; each wait is
    bounded (`wait_s`) and fails naming what never happened, with the driver's output, and a failure
    ends the driver's process group."""
    import os
    import queue
    import threading

    wait_s = 600  # a bound, not a pause: Ray took over 180 s to start a trial on a loaded machine
    rounds = ROUNDS  # the held trial stops after round 2 of 3: the resume has a round to run past it
    hold = tmp_path / "hold"
    args = sweep_args(stage1, features, tmp_path, "[0.003, 0.001]", "tune.max_concurrent_trials=1", rounds=rounds)
    # its own process group, so that a failure below can end the driver and whatever Ray started with it
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "run.py"), *args], cwd=tmp_path, text=True,
                            env={**os.environ, "UR4REC_TUNE_HOLD": str(hold)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    arriving: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            arriving.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    lines: list[str] = []

    def drain():
        while not arriving.empty():
            lines.append(arriving.get())

    def wait_for(found, what: str):
        """found() once it is true, reading the driver's lines meanwhile; fails if the driver ends
        first or after wait_s."""
        deadline = time.monotonic() + wait_s
        while not (result := found()):
            if proc.poll() is not None:
                reader.join(timeout=10)  # the rest of its output
                drain()
                if result := found():
                    break
                pytest.fail(f"the sweep exited ({proc.returncode}) before {what}:\n{''.join(lines)[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {wait_s} s:\n{''.join(lines)[-3000:]}")
            try:
                lines.append(arriving.get(timeout=0.2))
            except queue.Empty:
                pass
        return result

    def held(but: str | None = None) -> str | None:
        """The trial folder name of a held trial (not `but`), from its marker hold.<trial>."""
        return next((m.name.split(".", 1)[1] for m in tmp_path.glob("hold.trial_*") if m.name != f"hold.{but}"),
                    None)

    try:
        first = wait_for(held, "the first trial to hold after its second round")
        (tmp_path / f"hold.{first}").unlink()  # let it go on to its end
        # a trial's line in the driver's output: it has ended
        wait_for(lambda: any(l.split()[0] == first for l in lines if l.startswith("trial_")), f"{first} to end")
        sweep_dir = Path(next(l for l in lines if l.startswith("sweep folder: ")).split(": ", 1)[1].strip())
        second = wait_for(lambda: held(but=first), "the second trial to hold after its second round")
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep did not stop within 120 s of Ctrl+C:\n{''.join(lines)[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=30)
    drain()
    output = "".join(lines)
    assert proc.returncode != 0, "the sweep ended on its own despite Ctrl+C:\n" + output[-3000:]
    started = sweep_dir / second / "run"
    # cut off where it held: round 2 written, the state it resumes from that of round 1
    assert [rec["round"] for rec in read_metrics(started)] == [1, 2]
    assert f"run.py tune --resume {sweep_dir}" in output, output[-3000:]
    assert not (sweep_dir / "trials.csv").exists()
    # --report of the stopped sweep: the ended trial as it ended, the cut one unfinished, no winner yet
    # the report and the resume in this process: a new driver, as the interrupted one was another process
    reported = io.StringIO()
    with contextlib.redirect_stdout(reported):
        assert run.main(["tune", "--report", str(sweep_dir)]) == 0
    with open(sweep_dir / "trials.csv") as f:
        statuses = {row["trial"]: row["status"] for row in csv.DictReader(f)}
    assert statuses[first] == "ok" and sorted(statuses.values()) == ["ok", "unfinished"]
    assert "1 of 2 trials ended" in reported.getvalue() and not (sweep_dir / "best.yaml").exists()
    before = (sweep_dir / first / "run" / "metrics.jsonl").stat().st_mtime_ns
    round1 = read_metrics(started)[0]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run.main(["tune", "--resume", str(sweep_dir)]) == 0
    resumed = out.getvalue()
    assert resumed.strip().splitlines()[-1] == f"sweep folder: {sweep_dir}"
    rows = read_rows(sweep_dir)
    assert {r["status"] for r in rows.values()} == {"ok"} and len(rows) == 2
    assert (sweep_dir / first / "run" / "metrics.jsonl").stat().st_mtime_ns == before  # not run again
    # only the other trial ended in this run
    assert not any(line.startswith(first) for line in resumed.split("best trials:")[0].splitlines())
    # the resumed driver's status line counts the trial that ended before the restore
    assert "sweep: 2/2 trials ended (2 ok, 0 pruned, 0 diverged, 0 error), 0 running, 0 waiting" in resumed
    # the trial cut off half-way continued from its saved state: round 1 was not run again
    resumed_rounds = read_metrics(started)
    assert [rec["round"] for rec in resumed_rounds] == list(range(1, rounds + 1)) and resumed_rounds[0] == round1
    assert (started / "summary.json").is_file()
    assert (sweep_dir / "best.yaml").is_file()
