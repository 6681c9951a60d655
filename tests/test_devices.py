"""`device` for stage runs: a CUDA request this machine cannot serve is refused before any data is
read, the device-side code paths give the CPU's results, and (on a CUDA machine) a stage trains there.

The tests marked `cuda` need a CUDA device and are skipped without one (CI has none): `pytest -m cuda`
on a GPU machine runs them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import run
from conftest import ROOT, fresh_trainer, round_update, tiny_config
from recbole_ext.local.negatives import negatives_from_uniform, nth_allowed
from recbole_ext.federated.vectorized import compact
from recbole_ext.pipeline import Stage

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to refuse")


def cuda(test):
    """A test that needs a CUDA device: marked `cuda`, skipped without one."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def refused(monkeypatch, capsys, *args) -> str:
    """run.py's exit code 2 and its message, in this process (the refusals come before any work)."""
    monkeypatch.chdir(ROOT)
    code = run.main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return " ".join(err.split())


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_stage_asking_for_cuda_without_it_is_refused_before_reading_data(device, tmp_path, monkeypatch, capsys):
    # data.path points nowhere: the device is refused first, or the message would be about the data.
    message = refused(monkeypatch, capsys, "--config", "yamls/demo/stage1.yaml", "--set", f"device={device}",
                      "--set", f"data.path={tmp_path / 'nowhere'}", "--set", f"run_dir={tmp_path / 'run'}")
    assert "yamls/demo/stage1.yaml" in message and f"device '{device}'" in message and "set device: cpu" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, words", [
    (["device=cpu", "tune.gpus_per_trial=1"], "tune.gpus_per_trial 1 with device 'cpu'"),
    (["device=cuda", "tune.gpus_per_trial=0"], "tune.gpus_per_trial 0"),
    (["device=cuda:1", "tune.gpus_per_trial=1"], "set device: cuda"),
])
def test_a_sweep_whose_trials_cannot_get_their_device_is_refused(sets, words, tmp_path, monkeypatch, capsys):
    message = refused(monkeypatch, capsys, "tune", "--config", "yamls/tune_smoke.yaml",
                      "--set", f"tune.storage_path={tmp_path}", *sum((["--set", s] for s in sets), []))
    assert "yamls/tune_smoke.yaml" in message and words in message
    assert not any(tmp_path.iterdir())


def test_the_device_negative_sampler_draws_the_cpu_samplers_items():
    # On a GPU the sampler finds each rank's item by a running count (no host synchronisation);
    # on the CPU by listing the allowed pairs. They must agree item for item.
    g = torch.Generator().manual_seed(3)
    excluded = torch.rand(7, 300, generator=g) < 0.6
    excluded[:, 0] = True
    rows = torch.randint(0, 7, (500,), generator=g)
    uniform = torch.rand(500, 9, generator=g)
    counts = (~excluded).sum(1)
    rank = (torch.cumsum(counts, 0) - counts)[rows].unsqueeze(1) + (uniform * counts[rows].unsqueeze(1)).long()
    assert torch.equal(nth_allowed(~excluded, rank), negatives_from_uniform(excluded, rows, uniform))


def test_compact_with_a_host_width_matches_the_counted_one():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 40, generator=g) < 0.3
    mask[2] = False  # an empty row
    counted = compact(mask)
    index, real = compact(mask, int(mask.sum(1).max()))
    assert torch.equal(index, counted[0]) and torch.equal(real, counted[1])
    for row in range(6):
        assert index[row][real[row]].tolist() == mask[row].nonzero().flatten().tolist()
    wider, wider_real = compact(mask, 50)  # more slots than columns: padded with (0, False)
    assert wider.shape == (6, 50) and torch.equal(wider[:, :index.shape[1]], index)
    assert not wider_real[:, index.shape[1]:].any()


def test_a_stage_puts_its_model_windows_and_exclusions_on_its_device(tmp_path):
    stage = Stage(tiny_config("stage1.yaml", tmp_path / "run"), "stage1.yaml")
    w = stage.windows
    assert w.device == torch.device("cpu") and next(stage.model.parameters()).device == w.device
    # The exclusion table is each client's history (and padding), as drawn negatives must avoid.
    for user in w.clients[:5]:
        expected = np.zeros(w.n_items, dtype=bool)
        expected[0] = True
        expected[w.history[user]] = True
        assert np.array_equal(w.excluded([user])[0].numpy(), expected)
    assert np.array_equal(w.window_lengths, (w.targets > 0).sum(1).numpy())


@cuda
@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_a_stage_trains_on_cuda_like_on_the_cpu(backend, tmp_path):
    """Dropout off, the full softmax (no sampled negatives, whose generators differ by device), float32:
    a few rounds on the GPU end at the CPU's validation metrics, to the rounding the devices differ by."""
    sets = [f"federated.backend={backend}", "federated.rounds=3", "loss.type=ce"]
    metrics = {}
    for device in ("cpu", "cuda"):
        stage = Stage(tiny_config("stage1.yaml", tmp_path / device, None, [*sets, f"device={device}"]), "stage1.yaml")
        assert next(stage.model.parameters()).device.type == device and stage.windows.device.type == device
        summary = stage.run(show_progress=False)
        metrics[device] = summary["valid"]
    for protocol, values in metrics["cpu"].items():
        for metric, value in values.items():
            assert metrics["cuda"][protocol][metric] == pytest.approx(value, abs=1e-3), (protocol, metric)


@cuda
def test_a_cuda_run_resumed_from_its_state_matches_the_uninterrupted_one(tmp_path):
    """Dropout on, so the CUDA generator's state matters; deterministic kernels, so the same
    rounds repeat bit for bit (docs/DEVICES.md: without them, they agree to rounding)."""
    sets = ["device=cuda", "deterministic=true", "model.hidden_dropout_prob=0.2", "model.attn_dropout_prob=0.2",
            "federated.backend=vectorized"]
    stage = Stage(tiny_config("stage1.yaml", tmp_path / "built", None, sets), "stage1.yaml")
    initial = {k: v.clone() for k, v in stage.model.state_dict().items()}

    def trainer(name):
        return fresh_trainer(stage, initial, tmp_path / name)

    torch.manual_seed(0)
    uninterrupted = trainer("uninterrupted")
    for index in (1, 2, 3, 4):
        uninterrupted.train_unit(index, stage.windows, False)
    reference = {n: p.detach().clone() for n, p in stage.model.named_parameters()}

    torch.manual_seed(0)
    stopped = trainer("stopped")
    for index in (1, 2):
        stopped.train_unit(index, stage.windows, False)
    stopped.run.save_state(stopped.state())
    state = stopped.run.load_state()
    assert "cuda_rng" in state
    torch.manual_seed(123)  # what a fresh process would hold: the state must restore it
    resumed = trainer("resumed")
    resumed.resume_from(state)
    for index in (3, 4):
        resumed.train_unit(index, stage.windows, False)
    for name, value in reference.items():
        assert torch.equal(stage.model.state_dict()[name], value), name


def test_a_gpu_plan_pads_more_for_fewer_cohorts():
    # On a GPU a cohort may pad its clients to twice their size: fewer, larger cohorts, each still
    # bounded; the CPU plan keeps its quarter.
    from recbole_ext.federated.vectorized import GPU_MAX_PADDING, MAX_PADDING, plan_cohorts

    rng = np.random.default_rng(4)
    sizes = rng.integers(5, 700, size=900)
    clients = rng.choice(900, size=256, replace=False)
    cpu = plan_cohorts(clients, sizes, 1024, 10 ** 6)
    gpu = plan_cohorts(clients, sizes, 1024, 10 ** 6, GPU_MAX_PADDING)
    assert len(gpu) < len(cpu) / 2
    for plan, padding in ((cpu, MAX_PADDING), (gpu, GPU_MAX_PADDING)):
        assert sorted(np.concatenate(plan).tolist()) == sorted(clients.tolist())
        assert all(sizes[c].max() <= sizes[c].min() * (1 + padding) for c in plan)


def test_cohort_size_null_is_the_cpu_default_on_a_cpu(tmp_path):
    from recbole_ext.federated.vectorized import CPU_COHORT_SIZE, MAX_PADDING, VectorizedBackend

    stage = Stage(tiny_config("stage1.yaml", tmp_path / "run", None, ["federated.cohort_size=null"]), "stage1.yaml")
    backend = VectorizedBackend(stage.model, stage.windows, stage.cfg)
    assert (backend.cohort_size, backend.max_padding) == (CPU_COHORT_SIZE, MAX_PADDING)


@cuda
def test_on_a_gpu_cohorts_and_passes_are_sized_to_its_memory(tmp_path):
    from recbole_ext.local.steps import positions_per_pass
    from recbole_ext.federated.vectorized import CPU_COHORT_SIZE, GPU_COHORT_SIZE, GPU_MAX_PADDING, VectorizedBackend

    stage = Stage(tiny_config("stage1.yaml", tmp_path / "run", None, ["device=cuda", "federated.cohort_size=null"]),
                  "stage1.yaml")
    backend = VectorizedBackend(stage.model, stage.windows, stage.cfg)
    assert CPU_COHORT_SIZE <= backend.cohort_size <= GPU_COHORT_SIZE and backend.max_padding == GPU_MAX_PADDING
    assert positions_per_pass(stage.model, stage.cfg) >= 8192


@cuda
def test_ray_actors_on_gpu_shares_give_the_vectorized_update(tmp_path):
    """Two actors on half a GPU each: the model, windows and parameters travel on the CPU, the
    actors train on their GPU, and the round's update is the single-process one (dropout off)."""
    import ray

    from recbole_ext.federated.backends import BACKENDS

    sets = ["device=cuda", "federated.ray_workers=2", "federated.ray_gpus_per_worker=0.5"]
    stage = Stage(tiny_config("stage1.yaml", tmp_path / "run", None, sets), "stage1.yaml")
    global_params = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    clients = stage.windows.clients[:8]
    expected, _ = round_update(BACKENDS["vectorized"](stage.model, stage.windows, stage.cfg), clients,
                               global_params, 5)
    backend = BACKENDS["ray"](stage.model, stage.windows, stage.cfg)
    try:
        got, _ = round_update(backend, clients, global_params, 5)
        assert "cuda" in backend.rng_states()
    finally:
        backend.close()
        ray.shutdown()
    for name, value in expected.items():
        assert got[name].device == value.device
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0, msg=name)


def test_deterministic_kernels_change_nothing_on_a_cpu_and_are_reset_by_the_next_stage(tmp_path):
    from recbole_ext.federated.backends import BACKENDS

    def one_round(deterministic: bool) -> dict:
        stage = Stage(tiny_config("stage1.yaml", tmp_path / str(deterministic), None,
                                  ["federated.backend=vectorized", f"deterministic={str(deterministic).lower()}"]),
                      "stage1.yaml")
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        params = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
        return round_update(BACKENDS["vectorized"](stage.model, stage.windows, stage.cfg),
                            stage.windows.clients[:6], params, 2)[0]

    strict, plain = one_round(True), one_round(False)
    for name, value in plain.items():
        assert torch.equal(strict[name], value), name
