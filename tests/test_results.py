"""`run.py results`: records from real (tiny) run folders, the variant rule, the seed table, the plots."""
from __future__ import annotations

import json
import shutil
import statistics

import pytest

import run as run_py
from conftest import tiny_config
from recbole_ext.config import dump, load_config
from recbole_ext.errors import UserError
from recbole_ext.pipeline import Stage
from recbole_ext.analysis.results import (PROTOCOLS, SPLITS, aggregate, best_validation, compute_table, infer_variant,
                                 load_runs, markdown_table, records, round_offsets)

BACKBONE = "[item_embedding, position_embedding, trm_encoder, LayerNorm]"
ALIGN = "[visual_proj, text_proj, align_gating]"
METRIC_KEYS = {f"{m}@{k}" for m in ("hit", "ndcg", "mrr") for k in (5, 10, 20)}
REQUIRED = {"model": str, "trainer": str, "stage": int, "variant": str, "seed": int, "protocol": str,
            "split": str, "metrics": dict}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, features):
    """Tiny federated runs: the smoke config under two seeds, and a stage 2 and 3 chained on seed 1."""
    root = tmp_path_factory.mktemp("results")

    def run(stage_file, name, sets, with_features=False):
        cfg = tiny_config(stage_file, root / name, features if with_features else None, sets)
        Stage(cfg, stage_file).run(show_progress=False)
        return root / name

    s1 = run("smoke.yaml", "s1", ["seed=1"])
    s1b = run("smoke.yaml", "s1_seed2", ["seed=2"])
    s2 = run("stage2.yaml", "s2", ["seed=1", "federated.rounds=1",
                                   f"load=[{{checkpoint: {s1 / 'best.pt'}, groups: {BACKBONE}}}]"], True)
    s3 = run("stage3.yaml", "s3", ["seed=1", f"load=[{{checkpoint: {s1 / 'best.pt'}, groups: {BACKBONE}}}, "
                                             f"{{checkpoint: {s2 / 'best.pt'}, groups: {ALIGN}}}]"], True)
    return {"s1": s1, "s1b": s1b, "s2": s2, "s3": s3}


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def metrics_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def variant_copy(run_dir, dest, sets):
    """The run folder under another config: what the same run with `--set ...` would have written."""
    shutil.copytree(run_dir, dest)
    (dest / "config.yaml").write_text(dump(load_config(dest / "config.yaml", sets)))
    return dest


# ------------------------------------------------------------------------------ fast: no training
@pytest.mark.parametrize("stage_file, sets, expected", [
    ("stage1.yaml", [], "full"),                                   # features set, but stage 1 is ID-only
    ("stage2.yaml", [], "full"),
    ("stage2.yaml", ["data.image_features=null"], "text_only"),
    ("stage3.yaml", ["data.text_features=null"], "image_only"),
    ("stage3.yaml", ["model.memory.st_k=0", "model.memory.lt_k=0"], "no_memory"),
    ("stage3.yaml", ["model.memory.st_k=0", "model.memory.lt_k=0", "data.image_features=null"],
     "text_only+no_memory"),
    ("stage3.yaml", ["model.memory.st_k=0"], "full"),              # lt_k still reads the memory
    ("stage2.yaml", ["model.memory.st_k=0", "model.memory.lt_k=0"], "full"),  # no experts: memory unused
    ("stage3.yaml", ["model.item_content=true"], "item_content"),
    ("stage1.yaml", ["model.item_content=true", "data.image_features=null"], "text_only+item_content"),
    ("stage3.yaml", ["model.item_content=true", "data.image_features=null", "model.memory.st_k=0",
                     "model.memory.lt_k=0"], "text_only+no_memory+item_content"),
])
def test_variant_rule(tmp_path, features, stage_file, sets, expected):
    cfg = tiny_config(stage_file, tmp_path / "run", features, sets)
    assert infer_variant(cfg, cfg["stage"]) == expected


def test_a_baseline_is_the_full_model(tmp_path, features):
    cfg = tiny_config("stage3.yaml", tmp_path / "run", features, ["data.image_features=null"])
    assert infer_variant(cfg, None, baseline=True) == "full"


def record(run, seed, value, protocol="full", split="test", **keys):
    return {"model": "UR4Rec-MoE", "trainer": "federated", "stage": 3, "variant": "full", "seed": seed,
            "protocol": protocol, "split": split, "metrics": {"hit@10": value, "ndcg@10": value / 2,
                                                              "mrr@10": value / 4},
            "run": run, "dataset": "ml-1m", **keys}


def test_mean_and_sample_std_over_seeds():
    recs = [record(f"r{s}", s, v, p) for s, v in ((1, 0.1), (2, 0.3), (3, 0.2)) for p in PROTOCOLS]
    recs += [record("c1", 1, 0.05, p, trainer="centralized") for p in PROTOCOLS]
    recs += [record("r1", 1, 0.9, p, split="valid") for p in PROTOCOLS]  # the table is the test split's
    recs += [record("lr", 1, 0.7, p, name="another-lr") for p in PROTOCOLS]  # other settings: its own row
    rows = aggregate(recs)
    assert [(r["trainer"], r["name"], r["n"]) for r in rows] == [
        ("federated", None, 3), ("centralized", None, 1), ("federated", "another-lr", 1)]
    mean, std = rows[0]["cells"][("full", "hit@10")]
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)
    assert rows[1]["cells"][("uni100", "ndcg@10")] == (pytest.approx(0.025), None)
    table = markdown_table(recs).splitlines()
    assert table[0].startswith("| config | model | trainer | stage | variant | full HR@10 | full NDCG@10 |")
    assert "| 0.2000 ± 0.1000 (3 seeds) | 0.1000 ± 0.0500 (3 seeds) |" in table[2]
    assert "| 0.0500 | 0.0250 | 0.0125 |" in table[3]


# ---------------------------------------------------------------------- slow: tiny real run folders
@pytest.mark.slow
def test_one_record_per_run_protocol_and_split(runs):
    folders = [runs["s1"], runs["s1b"], runs["s2"], runs["s3"]]
    recs = [r for run in load_runs([str(f) for f in folders]) for r in records(run)]
    assert len(recs) == len(folders) * 2 * 2
    for r in recs:
        for key, kind in REQUIRED.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["model"] == "UR4Rec-MoE" and r["trainer"] == "federated" and r["finished"] is True
        assert r["protocol"] in PROTOCOLS and r["split"] in SPLITS and set(r["metrics"]) == METRIC_KEYS
    for folder in folders:
        s, lines = summary(folder), metrics_lines(folder)
        mine = [r for r in recs if r["run"] == folder.name]
        assert {(r["protocol"], r["split"]) for r in mine} == {(p, s_) for p in PROTOCOLS for s_ in SPLITS}
        for r in mine:
            assert r["metrics"] == s[r["split"]][r["protocol"]]
            assert r["stage"] == s["stage"] and r["trainable_params"] == s["trainable_params"]
            assert r["bytes_up_per_round"] == pytest.approx(statistics.mean(l["bytes_up"] for l in lines))
            assert r["rounds"] == len(lines) and r["wall_seconds"] == s["wall_seconds"]
            assert r["dataset"] == "ml-100k" and r["variant"] == "full"
    assert {r["seed"] for r in recs if r["run"] == "s1_seed2"} == {2}
    rows = compute_table(recs).splitlines()[2:]
    assert len(rows) == len(folders)
    for folder, row in zip(folders, rows):
        mb = statistics.mean(line["bytes_up"] for line in metrics_lines(folder)) / 1e6
        assert row.startswith(f"| {folder.name} | {summary(folder)['trainable_params']:,} | {mb:.1f} |")
        assert row.endswith(" threads |")  # a CPU run names no GPU
    on_gpu = {**recs[0], "run": "on_gpu", "machine": {**recs[0]["machine"], "gpu": "NVIDIA H200"}}
    assert compute_table([on_gpu]).splitlines()[2].endswith(" threads, NVIDIA H200 |")


@pytest.mark.slow
def test_variant_is_read_from_the_run_config(runs, tmp_path):
    text_only = variant_copy(runs["s2"], tmp_path / "s2_text", ["data.image_features=null"])
    no_memory = variant_copy(runs["s3"], tmp_path / "s3_text_nomem", ["data.image_features=null",
                                                                      "model.memory.st_k=0", "model.memory.lt_k=0"])
    recs = [r for run in load_runs([str(text_only), str(no_memory)]) for r in records(run)]
    assert {r["run"]: r["variant"] for r in recs} == {"s2_text": "text_only", "s3_text_nomem": "text_only+no_memory"}


@pytest.mark.slow
def test_command_writes_records_table_and_plots(runs, tmp_path, capsys):
    out, plots = tmp_path / "results" / "ml-100k.json", tmp_path / "plots"
    folders = [str(runs[k]) for k in ("s1", "s1b", "s2", "s3")]
    assert run_py.main(["results", *folders, "--out", str(out), "--plots", str(plots)]) == 0
    recs = json.loads(out.read_text())
    assert recs == [r for run in load_runs(folders) for r in records(run)]

    table = capsys.readouterr().out
    uni_hr = [summary(runs[k])["test"]["uni100"]["hit@10"] for k in ("s1", "s1b")]
    stage1_row = next(line for line in table.splitlines() if "| UR4Rec-MoE | federated | 1 |" in line)
    expected = f"{statistics.mean(uni_hr):.4f} ± {statistics.stdev(uni_hr):.4f} (2 seeds)"
    assert stage1_row.split(" | ")[8] == expected  # config, model, trainer, stage, variant, full x3, uni100 HR@10
    stage3_row = next(line for line in table.splitlines() if "| UR4Rec-MoE | federated | 3 |" in line)
    assert f"| {summary(runs['s3'])['test']['full']['ndcg@10']:.4f} |" in stage3_row and "seeds" not in stage3_row

    for name in ("valid_ndcg10.png", "router_weights.png"):
        assert (plots / name).stat().st_size > 0
    router = json.loads((out.parent / "ml-100k-router.json").read_text())
    assert [r["run"] for r in router] == ["s3"]
    r = router[0]
    assert r["items"] > 0 and 0 <= r["q25"] <= r["median"] <= r["q75"] <= 1
    assert 0 <= r["mean"] <= 1 and 0 <= r["fraction_visual_above_half"] <= 1


@pytest.mark.slow
def test_a_chain_shares_one_round_axis(runs):
    loaded = load_runs([str(runs[k]) for k in ("s1", "s1b", "s2", "s3")])
    offsets = round_offsets(loaded)
    last = {k: metrics_lines(runs[k])[-1]["round"] for k in ("s1", "s2")}
    assert offsets[runs["s1"]] == offsets[runs["s1b"]] == 0  # s1_seed2 starts no chain of the given runs
    assert offsets[runs["s2"]] == last["s1"]
    assert offsets[runs["s3"]] == last["s1"] + last["s2"]


@pytest.mark.slow
def test_an_unfinished_run_is_an_error_naming_it(runs, tmp_path, capsys):
    unfinished = tmp_path / "s1_unfinished"
    shutil.copytree(runs["s1"], unfinished)
    (unfinished / "summary.json").unlink()
    out = tmp_path / "out.json"
    assert run_py.main(["results", str(runs["s2"]), str(unfinished), "--out", str(out)]) == 2
    assert "s1_unfinished" in capsys.readouterr().err and not out.exists()
    with pytest.raises(UserError, match="s1_unfinished"):
        load_runs([str(unfinished)])

    (run,) = load_runs([str(unfinished)], allow_unfinished=True)
    recs = records(run)
    lines = [l for l in metrics_lines(unfinished) if "valid" in l]
    best = max(lines, key=lambda l: l["valid"]["full"]["ndcg@10"])  # max keeps the first of equals
    assert best_validation(run) == best
    assert [(r["protocol"], r["split"], r["finished"]) for r in recs] == [(p, "valid", False) for p in PROTOCOLS]
    assert [r["metrics"] for r in recs] == [best["valid"][p] for p in PROTOCOLS]
    assert all(r["wall_seconds"] is None and r["seed"] == 1 for r in recs)


@pytest.mark.slow
def test_stock_baseline_folders(runs, tmp_path):
    """A baseline folder holds the stage file it copied (stage 1, federated); its summary, or while it
    runs its checkpoint's metadata, says which model it is."""
    import torch

    finished = tmp_path / "baseline-GRU4Rec"
    shutil.copytree(runs["s1"], finished)
    s = summary(finished)
    s.update(stage=None, trainer="centralized", model="GRU4Rec", epochs_run=2)
    (finished / "summary.json").write_text(json.dumps(s))
    (run,) = load_runs([str(finished)])
    for r in records(run):
        assert (r["model"], r["trainer"], r["stage"], r["variant"]) == ("GRU4Rec", "centralized", None, "full")
        assert r["bytes_up_per_round"] is None and r["rounds"] is None and r["seed"] == 1

    running = tmp_path / "baseline-SASRec"
    shutil.copytree(runs["s1"], running)
    (running / "summary.json").unlink()
    lines = [{"epoch" if k == "round" else k: v for k, v in l.items()} for l in metrics_lines(running)]
    (running / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    checkpoint = torch.load(running / "best.pt", weights_only=True)
    checkpoint["meta"].update(stage=None, model="SASRec")
    torch.save(checkpoint, running / "best.pt")
    (run,) = load_runs([str(running)], allow_unfinished=True)
    recs = records(run)
    assert len(recs) == 2
    for r in recs:
        assert (r["model"], r["trainer"], r["stage"], r["finished"]) == ("SASRec", "centralized", None, False)
        assert r["bytes_up_per_round"] is None


@pytest.mark.slow
def test_records_carry_the_slices_and_the_command_prints_their_table(runs, tmp_path, capsys):
    folders = [str(runs[k]) for k in ("s1", "s1b", "s3")]
    recs = [r for run in load_runs(folders) for r in records(run)]
    for r in recs:
        s = summary(runs["s1b" if r["run"] == "s1_seed2" else r["run"]])
        assert r["slices"] == s["slices"][r["split"]][r["protocol"]]
        assert sum(part["users"] for label, part in r["slices"].items() if label.startswith("item ")) == 30
    assert run_py.main(["results", *folders, "--out", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out.split("Test metrics per slice", 1)[1].splitlines()
    assert table[2].startswith("| config | model | trainer | stage | variant | slice | users | full HR@10 |")
    label, part = max(summary(runs["s1"])["slices"]["test"]["full"].items(), key=lambda kv: kv[1]["users"])
    values = [summary(runs[k])["slices"]["test"]["full"][label]["metrics"]["hit@10"] for k in ("s1", "s1b")]
    row = next(line for line in table if f"| 1 | full | {label} |" in line)
    expected = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (2 seeds)"
    assert row.split(" | ")[6:8] == [str(part["users"]), expected]
    assert any(f"| 3 | full | {label} |" in line for line in table)
