"""`run.py baseline`: stock RecBole models, trained by RecBole, on our split and our two protocols."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_config
from recbole_ext import compat
from recbole_ext.analysis.baseline import Baseline
from recbole_ext.errors import UserError
from recbole_ext.pipeline import Stage
from recbole_ext.analysis.report import read_summary, record, table
from recbole_ext.runs import read_metrics
from recbole_ext.runs import read_checkpoint

pytestmark = pytest.mark.slow

EPOCHS = {"SASRec": 2, "GRU4Rec": 1}
SUMMARY_KEYS = {"stage", "name", "trainer", "dataset", "trainable_params", "trainable_groups", "best_round",
                "valid", "test", "wall_seconds", "model", "epochs_run", "stopped_by", "budget"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("baseline")
    done = {}
    for model, epochs in EPOCHS.items():
        baseline = Baseline(tiny_config("stage1.yaml", folder / model), "t", model, epochs)
        done[model] = (baseline, baseline.run(show_progress=False))
    return done


def all_metrics(result: dict) -> list[float]:
    return [v for protocol in ("full", "uni100") for v in result[protocol].values()]


@pytest.mark.parametrize("model", EPOCHS)
def test_run_folder_has_the_layout_of_our_runs(runs, model):
    baseline, summary = runs[model]
    run_dir = baseline.cfg["run_dir"]
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads(Path(run_dir, "summary.json").read_text()) == summary
    assert summary["stage"] is None and summary["trainer"] == "centralized" and summary["model"] == model
    assert summary["epochs_run"] == EPOCHS[model] and f"ran {EPOCHS[model]} epoch" in summary["budget"]
    assert summary["stopped_by"] is None
    assert summary["trainable_params"] == sum(summary["trainable_groups"].values()) == \
        sum(p.numel() for p in baseline.model.parameters())
    lines = read_metrics(run_dir)
    assert [line["epoch"] for line in lines] == list(range(1, EPOCHS[model] + 1))
    for line in lines:
        assert math.isfinite(line["loss"]) and line["seconds"] > 0
        assert line["batches"] == line["batches_per_epoch"]
        assert all(0.0 <= v <= 1.0 for v in all_metrics(line["valid"]))
    assert summary["best_round"] in [line["epoch"] for line in lines]
    assert summary["valid"] == lines[summary["best_round"] - 1]["valid"]
    for split in ("valid", "test"):
        assert {"hit@10", "ndcg@10", "mrr@10", "hit@5", "ndcg@20"} <= set(summary[split]["full"])
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in all_metrics(summary[split]))
    assert read_checkpoint(f"{run_dir}/best.pt")["meta"]["round"] == summary["best_round"]
    assert summary["name"] in table([record(read_summary(run_dir))])


@pytest.mark.parametrize("model", EPOCHS)
def test_best_checkpoint_in_a_fresh_stock_model_reproduces_the_reported_metrics(runs, model):
    baseline, summary = runs[model]
    fresh = compat.import_sequential(model)(baseline.split.rb_config, baseline.split.train.dataset)
    fresh.load_state_dict(read_checkpoint(f"{baseline.cfg['run_dir']}/best.pt")["state_dict"])
    assert baseline.evaluator.evaluate(fresh, "valid") == summary["valid"]
    assert baseline.evaluator.evaluate(fresh, "test") == summary["test"]


def test_evaluation_data_and_negatives_are_those_of_a_stage_run(runs, tmp_path):
    baseline, _ = runs["GRU4Rec"]
    stage = Stage(tiny_config("stage1.yaml", tmp_path / "stage"), "t")
    assert torch.equal(baseline.evaluator.negatives, stage.evaluator.negatives)
    for split in ("valid", "test"):
        ours, theirs = ([(b[0]["user_id"], b[0]["item_id"], b[0]["item_id_list"]) for b in ev.loaders[split]]
                        for ev in (baseline.evaluator, stage.evaluator))
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_time_budget_cuts_the_epoch_and_still_validates_and_tests(tmp_path):
    baseline = Baseline(tiny_config("stage1.yaml", tmp_path / "run"), "t", "GRU4Rec", 3, max_minutes=1e-6,
                        batch_size=256)
    summary = baseline.run(show_progress=False)
    [line] = read_metrics(tmp_path / "run")
    assert line["batches"] == 1 < line["batches_per_epoch"]
    assert summary["epochs_run"] == 1 and summary["best_round"] == 1
    assert "stopped early" in summary["budget"] and "cut epoch 1 after 1 of" in summary["budget"]
    assert summary["stopped_by"] == "time"
    assert summary["hyperparameters"]["train_batch_size"] == 256


def run_main(*argv) -> int:
    import run
    return run.main(list(argv))


def test_unknown_model_names_the_allowed_ones(capsys, tmp_path):
    code = run_main("baseline", "--config", str(ROOT / "yamls" / "stage1.yaml"), "--model", "BERT4Rec",
                    "--epochs", "1", "--set", f"run_dir={tmp_path / 'run'}")
    assert code == 2
    err = capsys.readouterr().err
    assert "BERT4Rec" in err and "SASRec, GRU4Rec" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_a_gpu_without_one_names_the_file_and_device(capsys, tmp_path):
    code = run_main("baseline", "--config", str(ROOT / "yamls" / "stage1.yaml"), "--model", "GRU4Rec",
                    "--epochs", "1", "--set", "device=cuda", "--set", f"run_dir={tmp_path / 'run'}")
    assert code == 2
    assert "stage1.yaml: device 'cuda': no CUDA device is available" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def baseline_main(run_dir, *extra) -> int:
    """A one-epoch GRU4Rec on the bad-input corpus's tiny dataset (6 users): seconds."""
    sets = [f"data.path={ROOT / 'tests' / 'bad_inputs' / '_data'}", "data.dataset=tiny", "data.max_users=null",
            f"run_dir={run_dir}"]
    return run_main("baseline", "--config", str(ROOT / "yamls" / "smoke.yaml"), "--model", "GRU4Rec",
                    "--epochs", "1", "--quiet", *(a for s in sets for a in ("--set", s)), *extra)


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_stage_run_folder_is_not_overwritten(capsys, tmp_path, flags):
    (tmp_path / "config.yaml").write_text(f"name: stage1\nrun_dir: {tmp_path}\n")
    (tmp_path / "summary.json").write_text(json.dumps({"stage": 1, "name": "stage1"}))
    assert baseline_main(tmp_path, *flags) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path}: holds {'a' if flags else 'an earlier'} stage run" in err and "--set run_dir=DIR" in err
    assert json.loads((tmp_path / "summary.json").read_text())["name"] == "stage1"


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_folder_holding_user_files_is_refused(capsys, tmp_path, flags):
    (tmp_path / "results.csv").write_bytes(b"model,hr@10\nmine,0.5\n")
    assert baseline_main(tmp_path, *flags) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path}: holds results.csv, which no run of this project wrote" in err and "--set run_dir" in err
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]
    assert (tmp_path / "results.csv").read_bytes() == b"model,hr@10\nmine,0.5\n"


def test_overwrite_replaces_an_earlier_baseline(capsys, tmp_path):
    folder = tmp_path / "run"
    assert baseline_main(folder) == 0
    (folder / "state.pt.tmp").write_bytes(b"half")
    summary = (folder / "summary.json").read_bytes()
    assert baseline_main(folder) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{folder}: holds an earlier baseline (" in err and f"--resume {folder}" in err and "--overwrite" in err
    assert (folder / "summary.json").read_bytes() == summary
    assert baseline_main(folder, "--overwrite") == 0
    assert not (folder / "state.pt.tmp").exists() and len(read_metrics(folder)) == 1


def test_a_resumed_baseline_equals_one_never_interrupted(runs, tmp_path):
    """One epoch, then the same baseline resumed with a budget of two, gives the fixture's two-epoch
    run: the optimizer, the RNGs and RecBole's loader order all continue."""
    _, whole = runs["SASRec"]
    cfg = tiny_config("stage1.yaml", tmp_path / "run")
    Baseline(cfg, "t", "SASRec", 1).run(show_progress=False)
    assert "ran 1 epoch." in json.loads((tmp_path / "run" / "summary.json").read_text())["budget"]
    resumed = Baseline(cfg, "t", "SASRec", 2).run(show_progress=False, resume=True)
    strip = lambda lines: [{k: v for k, v in line.items() if k != "seconds"} for line in lines]
    assert strip(read_metrics(tmp_path / "run")) == strip(read_metrics(runs["SASRec"][0].cfg["run_dir"]))
    assert (resumed["test"], resumed["best_round"], resumed["epochs_run"]) == \
        (whole["test"], whole["best_round"], whole["epochs_run"])


def test_resume_refuses_another_model_options_or_a_smaller_budget(runs):
    cfg = runs["SASRec"][0].cfg
    for model, epochs, options, message in (("GRU4Rec", 2, {}, "model 'SASRec' -> 'GRU4Rec'"),
                                            ("SASRec", 2, {"batch_size": 64}, "batch_size None -> 64"),
                                            ("SASRec", 1, {}, "--epochs 2 -> 1")):
        with pytest.raises(UserError, match=re.escape(message)):
            Baseline(cfg, "t", model, epochs, **options).run(show_progress=False, resume=True)
    assert json.loads(Path(cfg["run_dir"], "baseline.json").read_text())["epochs"] == 2
