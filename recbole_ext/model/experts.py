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
    """Softmax over the last dim restricted to `available`; all-unavailable rows give zeros."""
    logits = logits.masked_fill(~available, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


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

    Written out rather than `nn.MultiheadAttention` because a user with an empty memory must give a
    zero output, not NaN.
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

    def forward(self, queries, memory, mask):
        """queries [*, N, H] (leading 1 or P); memory [P, K, H]; mask [P, K] -> [P, N, H]."""
        P, K, H = memory.shape
        d = H // self.heads
        q = self.query(queries).unflatten(-1, (self.heads, d)).transpose(-3, -2)  # [*, h, N, d]
        k = self.key(memory).view(P, K, self.heads, d).transpose(1, 2)  # [P, h, K, d]
        v = self.value(memory).view(P, K, self.heads, d).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / d ** 0.5  # [P, h, N, K]
        attn = masked_softmax(logits, mask[:, None, None, :])
        out = (attn @ v).transpose(1, 2).flatten(-2)  # [P, N, H]
        return self.out(out)


class Expert(nn.Module):
    """Attention over the memory followed by a two-layer MLP."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.attention = MemoryAttention(hidden, heads)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, queries, memory, mask):
        return self.mlp(self.attention(queries, memory, mask))


class Router(nn.Module):
    """Item-centric router: (r_v, r_t) from the candidate's own projected features."""

    def __init__(self, hidden: int):
        super().__init__()
        self.gate = nn.Linear(2 * hidden, 2)

    def forward(self, proj_v, proj_t, available):
        return masked_softmax(self.gate(torch.cat([proj_v, proj_t], dim=-1)), available)


class Fusion(nn.Module):
    """F_i = MLP([LN s; r_v LN vis_i; r_t LN sem_i])."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm_state = nn.LayerNorm(hidden)
        self.norm_visual = nn.LayerNorm(hidden)
        self.norm_semantic = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, state, visual, semantic, route):
        """state [P, H]; visual, semantic [P, N, H]; route [*, N, 2] -> [P, N, H]."""
        s = self.norm_state(state).unsqueeze(1).expand_as(visual)
        parts = [s, route[..., :1] * self.norm_visual(visual), route[..., 1:] * self.norm_semantic(semantic)]
        return self.mlp(torch.cat(parts, dim=-1))
