"""The execution backends agree with the sequential reference.

With dropout off and the same seed, `sequential`, `vectorized` (torch.func) and `ray` (real local
Ray actors) give the same aggregated update every round and the same validation metrics after three
rounds, in every stage, also when clients are trained in parts or take several local steps.

The three-round comparison runs in float64. In float32 the batched and the per-client kernels round
differently (about 1e-7 of an update), and from the second round on, when clients start from
parameters that differ by that much, AdamW's g / (sqrt(v) + eps) magnifies the difference in
gradient entries near zero (seen: 1e-4 in one entry of visual_proj by round 3). float64 keeps the
comparison about the logic; the float32 checks compare single rounds, from the same parameters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, fresh_trainer, round_update, tiny_config
from recbole_ext.config import load_config
from recbole_ext.federated.aggregate import RoundSums
from recbole_ext.federated.backbone_cache import BackboneCache
from recbole_ext.federated.backends import BACKENDS, SequentialBackend
from recbole_ext.local.steps import client_generator
from recbole_ext.federated.ray_backend import shard_clients
from recbole_ext.federated.trainer import FederatedTrainer
from recbole_ext.federated.vectorized import MAX_PADDING, plan_cohorts
from recbole_ext.pipeline import Stage
from recbole_ext.runs import RunFolder

TOLERANCE = 1e-5
# Dropout off everywhere (the backbone's is off in tiny_config), gamma away from 0 so the experts
# train in stage 3, weight decay on so the decoupled decay is compared too.
EQUAL_SETS = ["load=[]", "model.align_dropout_prob=0.0", "model.gating_init=0.5", "optim.weight_decay=0.01",
              "federated.clients_per_round=6", "federated.cohort_size=3", "federated.ray_workers=2"]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def stages(tmp_path_factory, features):
    """One built Stage per stage file, with its initial parameters to reset to."""
    built = {}
    for name in ("stage1.yaml", "stage2.yaml", "stage3.yaml"):
        stage = Stage(tiny_config(name, tmp_path_factory.mktemp(name[:6]) / "run", features, EQUAL_SETS), name)
        built[name] = (stage, {k: v.clone() for k, v in stage.model.state_dict().items()})
    return built


def three_rounds(stage, initial, backend: str, run_dir, sets: dict, optim: dict = None) -> tuple[list, dict, dict]:
    """Train three rounds from `initial` with `backend`, in float64; (each round's update, valid
    metrics, trained parameters)."""
    stage.model.double()
    stage.model.load_state_dict(initial)
    settings = {**stage.cfg, "federated": {**stage.cfg["federated"], "backend": backend, **sets},
                "optim": {**stage.cfg["optim"], **(optim or {})}}
    run = RunFolder(run_dir)
    run.create(settings)
    trainer = FederatedTrainer(stage.rb_config, stage.model, settings, run, {}, stage.windows)
    updates, aggregate = [], trainer.server.aggregate

    def recording(*args):
        update, stats = aggregate(*args)
        updates.append(update)
        return update, stats

    trainer.server.aggregate = recording
    for index in (1, 2, 3):
        trainer.train_unit(index, stage.windows, False)
    if hasattr(trainer.backend, "close"):
        trainer.backend.close()
    params = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    valid = stage.evaluator.evaluate(stage.model, "valid")
    stage.model.float()
    return updates, valid, params


def assert_same(reference, other, what):
    ref_updates, ref_valid, ref_params = reference
    updates, valid, params = other
    for round_index, (a, b) in enumerate(zip(ref_updates, updates), start=1):
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < TOLERANCE, f"{what}: round {round_index} update differs by {worst:.2e}"
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], atol=TOLERANCE, rtol=0, msg=f"{what}: {name}")
    for protocol in ref_valid:
        for metric, value in ref_valid[protocol].items():
            assert valid[protocol][metric] == pytest.approx(value, abs=1e-6), f"{what}: {protocol} {metric}"


@pytest.mark.parametrize("stage_file", ["stage1.yaml", "stage2.yaml", "stage3.yaml"])
def test_all_backends_give_the_same_rounds_and_metrics(stage_file, stages, tmp_path, ray_session):
    stage, initial = stages[stage_file]
    reference = three_rounds(stage, initial, "sequential", tmp_path / "sequential", {})
    assert reference[0][0], "no update"
    assert any(float(v.abs().max()) > 0 for v in reference[0][0].values())
    assert_same(reference, three_rounds(stage, initial, "vectorized", tmp_path / "vectorized", {}), "vectorized")
    assert_same(reference, three_rounds(stage, initial, "ray", tmp_path / "ray", {}), "ray")


@pytest.mark.parametrize("strategy", [
    {"server_optimizer": "yogi", "server_tau": 1e-4, "schedule": {"kind": "cosine", "warmup_rounds": 1,
                                                                 "floor": 0.1, "step_rounds": 1, "step_factor": 0.5}},
    {"server_optimizer": "sgd", "server_lr": 1.0, "server_momentum": 0.9},
    {"server_optimizer": "adagrad", "server_tau": 1e-3}])
def test_backends_agree_under_every_strategy(strategy, stages, tmp_path):
    stage, initial = stages["stage1.yaml"]
    reference = three_rounds(stage, initial, "sequential", tmp_path / "sequential", strategy)
    assert_same(reference, three_rounds(stage, initial, "vectorized", tmp_path / "vectorized", strategy),
                f"vectorized, {strategy['server_optimizer']}")


def test_stage2_backends_agree_with_the_default_backbone_dropout(tmp_path, features, ray_session):
    # Stage 2's backbone is frozen, so it runs without its dropout on every backend (the vectorized
    # and ray backends read it from a cache computed once); only the align gating's own dropout,
    # which trains and is random, is off here.
    defaults = load_config(ROOT / "yamls" / "base.yaml")["model"]
    assert defaults["hidden_dropout_prob"] > 0 and defaults["attn_dropout_prob"] > 0
    dropout = [f"model.hidden_dropout_prob={defaults['hidden_dropout_prob']}",
               f"model.attn_dropout_prob={defaults['attn_dropout_prob']}"]
    stage = Stage(tiny_config("stage2.yaml", tmp_path / "built", features, EQUAL_SETS + dropout), "stage2.yaml")
    assert stage.model.dropout.p > 0
    initial = {k: v.clone() for k, v in stage.model.state_dict().items()}
    reference = three_rounds(stage, initial, "sequential", tmp_path / "sequential", {})
    assert_same(reference, three_rounds(stage, initial, "vectorized", tmp_path / "vectorized", {}), "vectorized")
    assert_same(reference, three_rounds(stage, initial, "ray", tmp_path / "ray", {}), "ray")


def test_sequential_clients_trained_in_parts_give_the_one_pass_update(stages):
    stage, initial = stages["stage3.yaml"]
    clients = stage.windows.clients[:6]
    assert stage.windows.num_targets[clients].max() > 30
    whole = {**stage.cfg, "federated": {**stage.cfg["federated"], "cohort_positions": 10 ** 6}}
    parts = {**stage.cfg, "federated": {**stage.cfg["federated"], "cohort_positions": 30}}
    assert_same_update(one_round(stage, initial, "sequential", whole, clients),
                       one_round(stage, initial, "sequential", parts, clients))


def one_round(stage, initial, backend: str, settings: dict, clients, seed: int = 7) -> dict:
    stage.model.load_state_dict(initial)
    global_params = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    made = BACKENDS[backend](stage.model, stage.windows, settings)
    update, _ = round_update(made, clients, global_params, seed)
    if hasattr(made, "close"):
        made.close()
    return update


def assert_same_update(expected: dict, got: dict) -> None:
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=TOLERANCE, rtol=0, msg=name)


@pytest.mark.parametrize("stage_file", ["stage1.yaml", "stage3.yaml"])
def test_adamw_clients_agree_for_three_rounds(stage_file, stages, tmp_path):
    stage, initial = stages[stage_file]
    adamw = {"optimizer": "adamw", "learning_rate": 0.001}
    reference = three_rounds(stage, initial, "sequential", tmp_path / "sequential", {}, adamw)
    assert_same(reference, three_rounds(stage, initial, "vectorized", tmp_path / "vectorized", {}, adamw),
                "vectorized, adamw")


# float32, one round each (see the module docstring); observed differences are below 1e-6.
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("stage_file", ["stage1.yaml", "stage2.yaml", "stage3.yaml"])
def test_vectorized_agrees_with_several_local_steps_and_clients_in_parts(stage_file, optimizer, stages):
    # 2 local steps: the stacked optimizer instead of its closed-form first step; 30 positions per
    # pass: most clients are trained in parts whose gradients (and stage 3's load-balance term) add up.
    stage, initial = stages[stage_file]
    settings = {**stage.cfg, "federated": {**stage.cfg["federated"], "local_epochs": 2, "cohort_positions": 30}}
    # clip_grad_norm 0.01 so clipping surely acts; AdamW at its own learning rate (at 0.1, the second
    # step magnifies rounding noise in gradients that are zero in exact arithmetic, e.g. the key bias).
    settings["optim"] = {**stage.cfg["optim"], "optimizer": optimizer, "clip_grad_norm": 0.01,
                         **({"learning_rate": 0.001} if optimizer == "adamw" else {})}
    clients = stage.windows.clients[:8]
    assert_same_update(one_round(stage, initial, "sequential", settings, clients),
                       one_round(stage, initial, "vectorized", settings, clients))


def test_ray_agrees_in_float32(stages, ray_session):
    stage, initial = stages["stage1.yaml"]
    clients = stage.windows.clients[:6]
    ray_backend_update = one_round(stage, initial, "ray", stage.cfg, clients)
    assert_same_update(one_round(stage, initial, "sequential", stage.cfg, clients), ray_backend_update)


@pytest.mark.parametrize("loss_type", ["bpr", "ce"])
def test_vectorized_agrees_for_the_other_losses(loss_type, stages):
    stage, initial = stages["stage3.yaml"]
    settings = {**stage.cfg, "loss": {**stage.cfg["loss"], "type": loss_type},
                "federated": {**stage.cfg["federated"], "cohort_positions": 40},
                "optim": {**stage.cfg["optim"], "clip_grad_norm": 0.01}}  # clipping folded into AdamW's step
    clients = stage.windows.clients[:5]
    stage.model.rec_loss = loss_type  # the model reads loss.type once, when built
    try:
        assert_same_update(one_round(stage, initial, "sequential", settings, clients),
                           one_round(stage, initial, "vectorized", settings, clients))
    finally:
        stage.model.rec_loss = stage.cfg["loss"]["type"]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_the_pooled_round_equals_the_per_client_one(weight_decay, stages, tmp_path):
    # Full softmax, one unclipped SGD step: the vectorized backend takes the round's sum from one
    # backward pass over the pooled positions; the sequential reference trains every client alone.
    stage, initial = stages["stage1.yaml"]
    settings = {**stage.cfg, "loss": {**stage.cfg["loss"], "type": "ce"},
                "federated": {**stage.cfg["federated"], "cohort_positions": 50},  # several parts
                "optim": {**stage.cfg["optim"], "clip_grad_norm": None, "weight_decay": weight_decay}}
    clients = stage.windows.clients[:8]
    stage.model.rec_loss = "ce"
    try:
        vectorized = BACKENDS["vectorized"](stage.model, stage.windows, settings)
        assert vectorized.pooled
        clipped = {**settings, "optim": {**settings["optim"], "clip_grad_norm": 5.0}}
        assert not BACKENDS["vectorized"](stage.model, stage.windows, clipped).pooled
        expected = one_round(stage, initial, "sequential", settings, clients)
        assert_same_update(expected, one_round(stage, initial, "vectorized", settings, clients))
        sums = vectorized.train_clients(clients, {n: initial[n].clone() for n in expected}, 3)
        assert sums.clients == 8 and sums.weight == float(stage.windows.num_targets[clients].sum())
    finally:
        stage.model.rec_loss = stage.cfg["loss"]["type"]


def test_stage2_computes_the_frozen_backbone_once(stages):
    stage, initial = stages["stage2.yaml"]
    stage.model.load_state_dict(initial)
    backend = BACKENDS["vectorized"](stage.model, stage.windows, stage.cfg)
    assert backend.cache is not None
    global_params = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    for seed in range(3):
        backend.train_clients(stage.windows.clients[:4], global_params, seed)
    assert backend.cache.generation == 1
    stage.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(backend.cache.states()[:7], stage.model.encode(stage.windows.inputs[:7]))
    # A checkpoint load changes the backbone in place: the cache notices and recomputes.
    stage.model.load_state_dict(initial)
    backend.cache.states()
    assert backend.cache.generation == 2


def test_no_cache_when_the_backbone_trains(stages):
    for name in ("stage1.yaml", "stage3.yaml"):
        stage, _ = stages[name]
        assert BACKENDS["vectorized"](stage.model, stage.windows, stage.cfg).cache is None


def test_a_clients_negatives_depend_on_the_round_and_the_client_only():
    draw = lambda seed, client: torch.rand(5, generator=client_generator(seed, client))
    assert torch.equal(draw(3, 11), draw(3, 11))
    assert not torch.equal(draw(3, 11), draw(3, 12))
    assert not torch.equal(draw(3, 11), draw(4, 11))


def test_cohorts_cover_every_client_once_and_bound_padding_and_size():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 400, size=500)
    clients = rng.choice(500, size=256, replace=False)
    cohorts = plan_cohorts(clients, sizes, max_clients=16, max_positions=1000)
    assert sorted(np.concatenate(cohorts).tolist()) == sorted(clients.tolist())
    for cohort in cohorts:
        assert len(cohort) <= 16
        assert sizes[cohort].max() <= sizes[cohort].min() * (1 + MAX_PADDING)
        assert len(cohort) == 1 or len(cohort) * sizes[cohort].max() <= 1000


def test_ray_shards_partition_the_clients_with_balanced_work():
    rng = np.random.default_rng(1)
    clients = np.arange(100)
    work = rng.integers(10, 300, size=100).astype(float)
    shards = shard_clients(clients, work, 3)
    assert sorted(np.concatenate(shards).tolist()) == clients.tolist()
    loads = [work[s].sum() for s in shards]
    assert max(loads) - min(loads) <= work.max()


def test_round_sums_merge_to_the_weighted_mean():
    a = RoundSums({"w": torch.tensor([2.0])}, {"loss": torch.tensor(4.0)}, 2.0, 1)
    b = RoundSums({"w": torch.tensor([6.0])}, {"loss": torch.tensor(2.0)}, 2.0, 1)
    update, stats = a.merge(b).mean()
    assert float(update["w"]) == 2.0 and float(stats["loss"]) == 1.5 and a.clients == 2


def test_backbone_cache_matches_encode(stages):
    stage, _ = stages["stage1.yaml"]
    cache = BackboneCache(stage.model, stage.windows.inputs[:5], batch_windows=2)
    stage.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cache.states(), stage.model.encode(stage.windows.inputs[:5]))


def test_trimmed_windows_give_the_same_backbone_states(stages):
    from recbole_ext.federated.vectorized import compact, trim_windows

    stage, initial = stages["stage1.yaml"]
    stage.model.load_state_dict(initial)
    stage.model.eval()
    w = stage.windows
    users = w.clients[:5]
    counts = np.diff(w.window_offsets)[users]
    slots = np.arange(counts.max())
    present = torch.from_numpy(slots[None, :] < counts[:, None])
    index = torch.from_numpy(np.where(present.numpy(), w.window_offsets[users][:, None] + slots[None, :], 0))
    windows = w.inputs[index] * present.unsqueeze(-1)  # [C, W, L]
    column, real = compact((w.targets[index] * present.unsqueeze(-1)).flatten(1) > 0)
    trimmed = trim_windows(windows, column, real)
    assert trimmed["tail_seq"] is not None and trimmed["tail_seq"].shape[2] < windows.shape[2]
    with torch.no_grad():
        for c in range(len(users)):
            expected = stage.model.encode(windows[c]).flatten(0, 1)[column[c]][real[c]]
            parts = [stage.model.encode(s[c]).flatten(0, 1) for s in (trimmed["item_seq"], trimmed["tail_seq"])
                     if s is not None]
            got = torch.cat(parts)[trimmed["positions"][c]][real[c]]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_resumed_ray_run_draws_the_dropout_of_an_uninterrupted_one(tmp_path, ray_session):
    """Each actor's torch generator is seeded from the run's seed and its index and saved with the
    run's state: a run resumed with fresh actors after round 2 trains rounds 3 and 4 as one that was
    never stopped (with fresh, unrestored actors it would replay rounds 1 and 2's dropout masks)."""
    dropout = ["model.hidden_dropout_prob=0.2", "model.attn_dropout_prob=0.2", "federated.backend=ray",
               "federated.ray_workers=2", "federated.clients_per_round=6", "load=[]"]
    stage = Stage(tiny_config("stage1.yaml", tmp_path / "built", None, dropout), "stage1.yaml")
    initial = {k: v.clone() for k, v in stage.model.state_dict().items()}

    def trainer(name):
        return fresh_trainer(stage, initial, tmp_path / name)

    def trained(trainer, rounds):
        for index in rounds:
            trainer.train_unit(index, stage.windows, False)
        trainer.run.save_state(trainer.state())  # as the run does after every round
        state = trainer.run.load_state()
        trainer.backend.close()
        return {n: p.detach().clone() for n, p in stage.model.named_parameters()}, state

    torch.manual_seed(0)
    uninterrupted = trainer("uninterrupted")
    first, second = uninterrupted.backend.rng_states()["cpu"]
    assert not torch.equal(first, second), "the actors share one random stream"
    reference, _ = trained(uninterrupted, [1, 2, 3, 4])

    torch.manual_seed(0)
    stopped = trainer("stopped")
    _, state = trained(stopped, [1, 2])
    resumed = trainer("resumed")
    resumed.resume_from(state)
    params, _ = trained(resumed, [3, 4])
    for name, value in reference.items():
        assert torch.equal(params[name], value), name


def test_ray_workers_run_the_shipped_package_with_the_drivers_defaults(tmp_path):
    """On a cluster a worker has only what the job ships (the project is not there): a driver outside
    the project starts Ray, and a worker imports the package from the job's copy and reads the same
    defaults (yamls/base.yaml) as the driver."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import ray
        from recbole_ext.defaults import base_defaults
        from recbole_ext.federated.ray_backend import connect

        @ray.remote
        def worker():
            import recbole_ext
            from recbole_ext.data.memory import MemoryConfig  # reads the defaults when imported
            from recbole_ext.defaults import base_defaults
            return recbole_ext.__file__, base_defaults()

        connect(None, 1)
        where, defaults = ray.get(worker.remote())
        print(json.dumps({{"where": where, "same": defaults == base_defaults()}}))
        ray.shutdown()
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the job finds the package
    out = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["where"].startswith(str(ROOT)), "the worker should import the shipped copy"
    assert result["same"]
