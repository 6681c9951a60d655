"""`precision: bf16` and masking that stays finite in every precision.

The masked softmaxes (align gating, router, memory attention) and the align loss give an excluded
entry the lowest finite value of the logits' dtype: a row with nothing available (an item without
either modality, a target without this modality) must give a finite loss and finite gradients in
float32, bfloat16 and float16, where a fill of -inf (or -1e9, beyond float16's range) would not.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from conftest import round_update, tiny_config
from recbole_ext.federated.backends import BACKENDS
from recbole_ext.model.experts import masked_softmax
from recbole_ext.pipeline import Stage

PRECISIONS = ["float32", "bfloat16", "float16"]


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, features):
    return Stage(tiny_config("stage2.yaml", tmp_path_factory.mktemp("s2") / "run", features, ["load=[]"]),
                 "stage2.yaml")


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_masked_softmax_of_a_row_with_nothing_available_is_zero_with_finite_gradients(dtype):
    logits = torch.randn(3, 4, dtype=getattr(torch, dtype), requires_grad=True)
    available = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])
    weights = masked_softmax(logits, available)
    assert torch.equal(weights[1], torch.zeros(4, dtype=weights.dtype))
    assert torch.isfinite(weights).all() and not weights[0, [1, 3]].any()
    torch.testing.assert_close(weights.float().sum(1), torch.tensor([1.0, 0.0, 1.0]), atol=1e-2, rtol=0)
    (weights * torch.arange(4)).sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_align_loss_with_targets_lacking_a_modality_is_finite(stage2, dtype):
    """Half the targets have no image: their rows of the visual InfoNCE have every column excluded."""
    model = stage2.model
    items = torch.arange(1, 9)
    mask = torch.ones(8, dtype=torch.bool)
    mask[-2:] = False  # padding entries too
    saved = model.available.clone()
    model.available[items[::2], 0] = False
    cast = model.to(getattr(torch, dtype)) if dtype == "float16" else model
    context = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    try:
        model.zero_grad(set_to_none=True)
        with context:
            loss = cast.masked_align_loss(items, mask)
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        model.float()
        model.available.copy_(saved)


def test_a_bf16_backbone_hands_float32_states_close_to_the_fp32_ones(stage2):
    model = stage2.model.eval()
    seqs = stage2.windows.inputs[:6]
    with torch.no_grad():
        exact = model.encode(seqs)
        model.set_precision("bf16")
        try:
            rounded = model.encode(seqs)
        finally:
            model.set_precision("fp32")
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)
    torch.testing.assert_close(rounded, exact, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_a_bf16_round_runs_on_every_backend_close_to_fp32(backend, tmp_path, features):
    # Stage 1: the backbone trains, so every step runs it under autocast (through vmap in vectorized).
    stage = Stage(tiny_config("stage1.yaml", tmp_path / "run", None, ["load=[]", "precision=bf16"]), "stage1.yaml")
    assert stage.model.autocast_dtype == torch.bfloat16
    initial = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    clients = stage.windows.clients[:6]

    def update():
        made = BACKENDS[backend](stage.model, stage.windows, stage.cfg)
        return round_update(made, clients, {n: v.clone() for n, v in initial.items()}, 3)

    rounded, stats = update()
    stage.model.set_precision("fp32")
    exact, _ = update()
    assert np.isfinite(float(stats["loss"]))
    assert all(torch.isfinite(value).all() for value in rounded.values())
    # The clients' mean update points the same way in both precisions (over all parameters: some,
    # like the attention's key bias, get a zero gradient in exact arithmetic and only rounding noise).
    flat = [torch.cat([u[name].flatten() for name in exact]) for u in (rounded, exact)]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.9
