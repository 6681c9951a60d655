"""The parts of UR4Rec-MoE around the SASRec backbone: align gating, experts, router, fusion.

Shapes: P positions (user states), N candidates, K memory slots, H hidden size. Candidate-side
tensors may have a leading 1 instead of P (one candidate list shared by every position, as in
full ranking); everything broadcasts, nothing loops over candidates.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def masked_softmax(logits: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `available`; all-unavailable rows give zeros.

    Unavailable entries get the dtype's lowest finite value, not -inf: elsewhere exp() of it is
    exactly 0, and a row with nothing available is uniform before the mask zeroes it, so no NaN
    appears in the forward or the backward pass, in any precision."""
    logits = logits.masked_fill(~available, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1) * available.to(logits.dtype)


class AlignGating(nn.Module):
    """(a_v, a_t) = softmax(MLP([s; P_v x^v_i; P_t x^t_i])), masked by which modalities item i has.

    The first layer is applied as three column blocks so the candidate part (`item_part`) is
    computed once per item instead of once per (position, candidate) pair.
    """

    def __init__(self, hidden: int, inner: int = 64, dropout: float = 0.1):
        super().__init__()
        self.hidden = nn.Linear(3 * hidden, inner)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(inner, 2)

    def item_part(self, proj_v, proj_t):
        """proj_v, proj_t [..., H] of some items -> their share of the first layer, [..., inner]."""
        _, w_v, w_t = self.hidden.weight.chunk(3, dim=1)
        return proj_v @ w_v.T + proj_t @ w_t.T

    def forward(self, state, item_part, available):
        """state [P, H]; item_part [*, N, inner] of the candidates; available [*, N, 2] -> weights [P, N, 2]."""
        w_s = self.hidden.weight.chunk(3, dim=1)[0]
        hidden = F.relu((state @ w_s.T + self.hidden.bias).unsqueeze(-2) + item_part)
        return masked_softmax(self.out(self.dropout(hidden)), available)


class MemoryAttention(nn.Module):
    """Multi-head attention from each candidate's query over the user's memory slots.

    Written out rather than `nn.MultiheadAttention` because a user with an empty memory must give
    `out.bias` (attention weights all 0), not NaN; and because both linear maps around the attention
    are moved off the (position, candidate) pairs, of which there are ~100 per position:
    * the query projection depends on the candidate alone, so the caller applies `query` once per
      item (see `Expert.item_queries`) and passes the projected queries in;
    * the output projection commutes with the weighted sum over slots,
      W_out concat_h(sum_k a_hk v_hk) = sum_h sum_k a_hk (W_out[:, head h] v_hk), so it is applied to
      the K values once per position and each pair mixes projected values: heads * K * H
      multiply-adds per pair instead of H^2 (K = 8 slots, H = 128).
    """

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, queries, memory, mask, then: nn.Linear | None = None):
        """queries [*, N, H] (leading 1 or P), already through `query`; memory [P, K, H]; mask [P, K]
        -> [P, N, H], or then(output) when a linear layer `then` follows (folded in the same way)."""
        P, K, H = memory.shape
        heads, d = self.heads, H // self.heads
        q = queries.unflatten(-1, (heads, d)).transpose(-3, -2)  # [*, h, N, d]
        k = self.key(memory).view(P, K, heads, d).transpose(1, 2)  # [P, h, K, d]
        attn = masked_softmax(q @ k.transpose(-1, -2) / d ** 0.5, mask[:, None, None, :])  # [P, h, N, K]
        weight, bias = self.out.weight, self.out.bias
        if then is not None:
            weight, bias = then.weight @ weight, F.linear(bias, then.weight, then.bias)
        v = self.value(memory).view(P, K, heads, d)
        projected = torch.einsum("pkhd,ohd->phko", v, weight.view(-1, heads, d)).flatten(1, 2)  # [P, h*K, H]
        return attn.transpose(1, 2).flatten(-2) @ projected + bias  # [P, N, h*K] @ [P, h*K, H]


class Expert(nn.Module):
    """Attention over the memory followed by a two-layer MLP.

    The MLP's first layer is linear and directly follows the attention's (linear) output
    projection, so it is folded into that projection: another H^2 per pair moved to per position.
    """

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.attention = MemoryAttention(hidden, heads)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def item_queries(self, features):
        """Candidate features [..., H] -> their attention queries: one per item, whatever the position."""
        return self.attention.query(features)

    def forward(self, queries, memory, mask):
        """queries [*, N, H]: `item_queries` of the candidates; memory [P, K, H]; mask [P, K] -> [P, N, H]."""
        return self.mlp[1:](self.attention(queries, memory, mask, then=self.mlp[0]))


class Router(nn.Module):
    """Item-centric router: (r_v, r_t) from the candidate's own projected features."""

    def __init__(self, hidden: int):
        super().__init__()
        self.gate = nn.Linear(2 * hidden, 2)

    def forward(self, proj_v, proj_t, available):
        return masked_softmax(self.gate(torch.cat([proj_v, proj_t], dim=-1)), available)


class Fusion(nn.Module):
    """F_i = MLP([LN s; r_v LN vis_i; r_t LN sem_i]).

    The first layer is applied as three column blocks: the state's block once per position, only
    the experts' blocks per (position, candidate) pair (2 H^2 multiply-adds per pair instead of 3 H^2).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.norm_state = nn.LayerNorm(hidden)
        self.norm_visual = nn.LayerNorm(hidden)
        self.norm_semantic = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, state, visual, semantic, route):
        """state [P, H]; visual (None when no item has an image: r_v is 0 everywhere), semantic [P, N, H];
        route [*, N, 2] -> [P, N, H]."""
        first = self.mlp[0]
        w_s, w_v, w_t = first.weight.chunk(3, dim=1)
        hidden = F.linear(self.norm_state(state), w_s, first.bias).unsqueeze(1)  # [P, 1, H]
        if visual is not None:
            hidden = hidden + route[..., :1] * F.linear(self.norm_visual(visual), w_v)
        return self.mlp[1:](hidden + route[..., 1:] * F.linear(self.norm_semantic(semantic), w_t))
