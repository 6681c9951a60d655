"""The experts and the fusion skip per-(position, candidate) work by exact algebra (queries projected
per item, linear maps pushed through the attention, the fusion's first layer split by input block).
Here their values and gradients are checked against the plain per-pair formulation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_config
from recbole_ext.model.experts import Expert, Fusion
from recbole_ext.model.ur4rec_moe import per_item
from recbole_ext.pipeline import Stage

H, K, N, P = 16, 5, 7, 6


def randomize(module: nn.Module, seed: int) -> None:
    """Every parameter random, the layer norms' too, so no block hides behind an identity or a zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def reference_expert(expert: Expert, features, memory, mask):
    """Per pair: query projection, one attention per head, output projection, then the MLP."""
    attention = expert.attention
    d = memory.shape[-1] // attention.heads
    queries = attention.query(features).expand(memory.shape[0], -1, -1)  # [P, N, H]
    keys, values = attention.key(memory), attention.value(memory)
    heads = []
    for h in range(attention.heads):
        cols = slice(h * d, (h + 1) * d)
        logits = queries[..., cols] @ keys[..., cols].transpose(1, 2) / d ** 0.5  # [P, N, K]
        logits = logits.masked_fill(~mask[:, None, :], -1e30)
        weights = torch.softmax(logits, dim=-1) * mask[:, None, :]  # an empty memory: all weights 0
        heads.append(weights @ values[..., cols])
    return expert.mlp(attention.out(torch.cat(heads, dim=-1)))


def reference_fusion(fusion: Fusion, state, visual, semantic, route):
    s = fusion.norm_state(state).unsqueeze(1).expand_as(visual)
    route = route.expand(visual.shape[0], -1, -1)
    inputs = [s, route[..., :1] * fusion.norm_visual(visual), route[..., 1:] * fusion.norm_semantic(semantic)]
    return fusion.mlp(torch.cat(inputs, dim=-1))


def memory_and_mask(seed: int, dtype, slots=K):
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(P, slots, H, generator=generator, dtype=dtype)
    mask = torch.rand(P, slots, generator=generator) < 0.6
    mask[0] = True
    mask[1] = False  # an empty memory
    mask[4] = False
    return memory, mask


def compare(new_fn, ref_fn, inputs, modules):
    """Values, and gradients of a random projection of the output w.r.t. inputs and parameters."""
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    params = [p for m in modules for p in m.parameters()]
    results = []
    for fn in (new_fn, ref_fn):
        out = fn(*leaves)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=out.dtype)
        wrt = [x for x in leaves if x.requires_grad] + params
        results.append((out, torch.autograd.grad((out * probe).sum(), wrt)))
    (new, new_grads), (ref, ref_grads) = results
    assert_near(new, ref)
    # Some gradients are 0 up to rounding (the key bias: softmax ignores a shift shared by all slots),
    # so their rounding is measured against the largest gradient.
    scale = max(float(g.abs().max()) for g in ref_grads if g.numel())
    for got, want in zip(new_grads, ref_grads):
        assert_near(got, want, scale)
    return new


def assert_near(got, want, scale=None):
    """float32: within 1e-5 relative (two orders of summation round differently); float64: within
    1e-12, which only an exact rewrite meets. Absolute tolerances are relative to `scale`."""
    tol = 1e-5 if got.dtype == torch.float32 else 1e-12
    if scale is None:
        scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, scale))


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


@DTYPES
@pytest.mark.parametrize("slots", [K, 0], ids=["memory", "no_memory_slots"])  # 0: st_k = lt_k = 0
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("shared", [True, False], ids=["candidates_1xN", "candidates_PxN"])
def test_expert_matches_per_pair_formulation(heads, shared, slots, dtype):
    expert = Expert(H, heads).to(dtype)
    randomize(expert, seed=heads)
    memory, mask = memory_and_mask(seed=3, dtype=dtype, slots=slots)
    features = torch.randn(1 if shared else P, N, H, generator=torch.Generator().manual_seed(5), dtype=dtype)
    out = compare(lambda f, m, k: expert(expert.item_queries(f), m, k),
                  lambda f, m, k: reference_expert(expert, f, m, k), [features, memory, mask], [expert])
    assert out.shape == (P, N, H)
    # All weights 0 on an empty memory: what reaches the MLP is the output projection's bias alone.
    assert_near(out[1], expert.mlp(expert.attention.out.bias).expand(N, H))


@DTYPES
@pytest.mark.parametrize("shared", [True, False], ids=["route_1xN", "route_PxN"])
def test_fusion_matches_concatenated_first_layer(shared, dtype):
    fusion = Fusion(H).to(dtype)
    randomize(fusion, seed=11)
    generator = torch.Generator().manual_seed(12)
    state = torch.randn(P, H, generator=generator, dtype=dtype)
    visual, semantic = torch.randn(2, P, N, H, generator=generator, dtype=dtype)
    route = torch.softmax(torch.randn(1 if shared else P, N, 2, generator=generator, dtype=dtype), dim=-1)
    route[..., 0, 0] = 0.0  # a candidate without an image
    compare(fusion, lambda *x: reference_fusion(fusion, *x), [state, visual, semantic, route], [fusion])


@pytest.mark.parametrize("shape", [(1, 3), (4, 10)], ids=["gather_then_apply", "apply_then_gather"])
def test_per_item_either_order(shape):
    table = torch.randn(20, H, generator=torch.Generator().manual_seed(1))
    candidates = torch.randint(0, 20, shape, generator=torch.Generator().manual_seed(2))
    layer = nn.Linear(H, H)
    compare(lambda t: per_item(layer, t, candidates), lambda t: layer(t[candidates]), [table], [layer])


def test_model_scores_match_per_pair_experts(tmp_path, features):
    """UR4RecMoE.score's expert term gamma * <F_i, e_i>, with every candidate layout `score` meets."""
    stage = Stage(tiny_config("stage3.yaml", tmp_path / "run", features, ["load=[]"]), "t")
    model = stage.model.eval()
    for i, module in enumerate((model.visual_expert, model.semantic_expert, model.fusion, model.router)):
        randomize(module, seed=20 + i)
    with torch.no_grad():
        model.gamma.fill_(0.7)
    hidden, n_items = model.hidden_size, model.n_items
    generator = torch.Generator().manual_seed(0)
    positions = 24
    state = torch.randn(positions, hidden, generator=generator)
    memory = torch.randint(1, n_items, (positions, K), generator=generator)
    memory[memory % 3 == 0] = 0  # some empty slots
    memory[:2] = 0  # empty memories
    layouts = {  # many candidates per position; a few (predict); one list shared by all (full ranking)
        "sampled": torch.randint(1, n_items, (positions, n_items // positions + 30), generator=generator),
        "few": torch.randint(1, n_items, (positions, 2), generator=generator),
        "shared": torch.arange(n_items).unsqueeze(0),
    }

    def expert_term(state, candidates):  # the score less the same score with the experts off
        with_experts = model.score(state, candidates, memory)[0]
        model.use_experts = False
        try:
            return with_experts - model.score(state, candidates, memory)[0]
        finally:
            model.use_experts = True

    def reference(state, candidates):
        all_v, all_t = model.item_projections()
        table = model.item_embedding.weight
        emb = table[candidates]
        available = model.available[memory] & (memory > 0).unsqueeze(-1)
        visual = reference_expert(model.visual_expert, all_v[candidates], all_v[memory], available[..., 0])
        semantic = reference_expert(model.semantic_expert, emb, all_t[memory], available[..., 1])
        route = model.router(all_v[candidates], all_t[candidates], model.available[candidates])
        fused = reference_fusion(model.fusion, state, visual, semantic, route)
        return model.gamma * (fused * emb).sum(-1)

    modules = [model.visual_expert, model.semantic_expert, model.fusion, model.visual_proj, model.text_proj]
    for candidates in layouts.values():
        compare(expert_term, reference, [state, candidates], modules)
