"""UR4Rec-MoE: a SASRec ID backbone with multimodal experts over a per-user memory.

    u_i = s + beta * A_i + gamma * F_i,    score_i = <u_i, e_i>  [+ <s, c_i> with `item_content`]

With the `item_content` option an item's projected content adds to its own score vector,
c_i = sum over the item's available modalities m of P_m x^m_i (the projectors of stage 2), so an item
whose ID embedding e_i was trained on a few interactions can still be ranked by what it is.

SASRec: W.-C. Kang and J. McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.
The stage switches (`align` for beta, `experts` for gamma) and the per-user memory follow
docs/DESIGN.md sections 2 and 3. Subclassing RecBole's SASRec keeps its parameter names, so a stage-1
checkpoint is a SASRec checkpoint and stage-1 scores are SASRec's scores.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import compat
from ..data.dataset import MEM_ROW, UR4RecDataset
from ..data.side_info import SideInfo
from ..defaults import base_defaults
from ..errors import UserError
from .experts import AlignGating, Expert, Fusion, Router

SASRec = compat.import_sasrec()

# Parameter groups `encode` reads: when none of them trains, a position's backbone output is fixed
# for the whole stage and can be computed once (stage 2; see federated/backbone_cache.py).
BACKBONE_GROUPS = ("item_embedding", "position_embedding", "LayerNorm", "trm_encoder")
# Full-catalogue scoring with align or experts on builds [rows, n_items, H] tensors: rows are taken in
# chunks of about this many elements per such tensor, so memory stays bounded at any batch size.
SCORE_CHUNK_ELEMENTS = 2 ** 23
# Evaluation on a GPU takes larger chunks, sized to half its free memory, counting this many float32
# [rows, n_items, H] tensors alive at once in `score` without gradients (experts, fusion, gate).
LIVE_SCORE_TENSORS = 16
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def model_settings(cfg: dict) -> dict:
    """Every RecBole config key the model and its dataset read, from a config (`model`, the loss, the
    feature paths). `loss_type` and `train_neg_sample_args` are RecBole's: `calculate_loss` is the full
    softmax (CE), which needs no sampled negatives."""
    model, loss, data = cfg["model"], cfg["loss"], cfg["data"]
    return {**model, "memory": dict(model["memory"]), "rec_loss": loss["type"],
            "lambda_align": loss["lambda_align"], "lambda_lb": loss["lambda_lb"],
            "align_temperature": loss["align_temperature"], "text_features": data["text_features"],
            "image_features": data["image_features"], "loss_type": "CE", "train_neg_sample_args": None}


# yamls/base.yaml's defaults, for a stock RecBole `Config(model=UR4RecMoE)` (`compat.register_model`, at the end).
DEFAULTS = model_settings(base_defaults())


def per_item(fn, table: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """fn(table)[candidates] for a row-wise fn, applied to whichever is smaller: the whole table
    (many positions times their candidates) or the gathered candidates (a few, e.g. `predict`)."""
    if candidates.numel() < table.shape[0]:
        return fn(table[candidates])
    return fn(table)[candidates]


class UR4RecMoE(SASRec):
    r"""SASRec plus align gating (stage 2) and memory experts (stage 3), one forward for all stages."""

    def __init__(self, config, dataset, side: SideInfo | None = None):
        """`side`: the item features and memory; None takes them from `dataset.side_info()` (a
        `UR4RecDataset`, which reads the config's `text_features`, `image_features` and `memory`)."""
        super().__init__(config, dataset)
        hidden = self.hidden_size
        self.use_align = bool(config["align"])
        self.use_experts = bool(config["experts"])
        self.use_content = bool(config["item_content"])
        self.beta = float(config["align_beta"])
        self.rec_loss = config["rec_loss"]
        self.lambda_align = float(config["lambda_align"])
        self.lambda_lb = float(config["lambda_lb"])
        self.align_temperature = float(config["align_temperature"])
        self.autocast_dtype = None  # `set_precision`

        side = self._side_info(config, dataset) if side is None else side
        if self.uses_content() and not (side.text_available.any() or side.image_available.any()):
            # Otherwise the projectors, gating and experts would train on zero vectors and score nothing.
            raise UserError("UR4RecMoE with align, experts or item_content on needs item features, and no item has any: set "
                            "the config key text_features (.npz with `ids`, `emb` [n, text_dim]) and/or "
                            "image_features (`emb` [n, image_dim]); in a stage file, data.text_features / "
                            "data.image_features")
        self.register_buffer("text_feat", side.text.float(), persistent=False)
        self.register_buffer("image_feat", side.image.float(), persistent=False)
        available = torch.stack([side.image_available, side.text_available], dim=1)
        self.register_buffer("available", available.bool(), persistent=False)  # [n_items, 2]: (v, t)
        self.register_buffer("memory", side.memory.long(), persistent=False)
        # Without any image the router gives the visual expert weight 0 for every item, so its output
        # (the dearest per-pair work of full ranking after the semantic expert) is skipped: exactly the same scores.
        self.has_images = bool(side.image_available.any())

        self.visual_proj = nn.Linear(side.image.shape[1], hidden)
        self.text_proj = nn.Linear(side.text.shape[1], hidden)
        # Its own dropout rate (config `align_dropout_prob`), so it can be switched off like the
        # backbone's (the backends' equivalence test needs every dropout off).
        self.align_gating = AlignGating(hidden, dropout=float(config["align_dropout_prob"]))
        self.visual_expert = Expert(hidden, heads=1)
        self.semantic_expert = Expert(hidden, heads=config["expert_heads"])
        self.router = Router(hidden)
        self.fusion = Fusion(hidden)
        self.gamma = nn.Parameter(torch.tensor(float(config["gating_init"])))

        for module in (self.align_gating, self.visual_expert, self.semantic_expert, self.router, self.fusion):
            module.apply(self._init_weights)
        for proj in (self.visual_proj, self.text_proj):
            nn.init.xavier_uniform_(proj.weight, gain=float(config["projector_init_gain"]))
            nn.init.zeros_(proj.bias)

    def _side_info(self, config, dataset) -> SideInfo:
        if isinstance(dataset, UR4RecDataset):
            return dataset.side_info()
        if self.uses_content():
            raise UserError(f"UR4RecMoE with align, experts or item_content on reads item features and each user's memory from "
                            f"its dataset, but got a {type(dataset).__name__}: build it with RecBole's "
                            f"create_dataset(config) after importing recbole_ext.model.ur4rec_moe, or with "
                            f"recbole_ext.data.dataset.UR4RecDataset(config)")
        return SideInfo.empty(self.n_items, config["text_dim"], config["image_dim"])

    def uses_content(self) -> bool:
        """True when any score term reads the item features (the projectors take part)."""
        return self.use_align or self.use_experts or self.use_content

    # ----------------------------------------------------------------- backbone
    def backbone_frozen(self) -> bool:
        """True when no parameter `encode` reads trains (stage 2)."""
        return not any(p.requires_grad for name, p in self.named_parameters()
                       if name.split(".", 1)[0] in BACKBONE_GROUPS)

    def train(self, mode: bool = True):
        """A frozen backbone is a fixed feature extractor: it runs without dropout even while the
        parts around it train. Dropout in a module that never learns only injects noise into the
        states the trainable parts see, and it would make the backbone's output differ between the
        backends that compute it once per stage (federated/backbone_cache.py) and those that run it
        every step; this way every backend and the centralized trainer see the same states."""
        super().train(mode)
        if mode and self.backbone_frozen():
            for module in (self.dropout, self.trm_encoder, self.LayerNorm):
                module.eval()
        return self

    def set_precision(self, precision: str) -> None:
        """`fp32`, or `bf16`: the backbone runs under bfloat16 autocast (in training and evaluation,
        on every backend) and hands states in the parameters' dtype (float32) to the scoring, losses
        and experts."""
        self.autocast_dtype = PRECISIONS[precision]

    def _backbone_precision(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.item_embedding.weight.device.type, dtype=self.autocast_dtype)

    def encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Backbone output at every position, causal: [B, L] -> [B, L, H], in the parameters' dtype."""
        with self._backbone_precision():
            positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0).expand_as(item_seq)
            hidden = self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(positions))
            hidden = self.dropout(hidden)
            mask = self.get_attention_mask(item_seq)
            out = self.trm_encoder(hidden, mask, output_all_encoded_layers=True)[-1]
        return out.to(self.item_embedding.weight.dtype)

    def forward(self, item_seq, item_seq_len):
        return self.gather_indexes(self.encode(item_seq), item_seq_len - 1)

    def memory_ids(self, rows: torch.Tensor | None, count: int) -> torch.Tensor:
        """Memory item ids for `count` states; no rows (or an empty table) means an empty memory."""
        if rows is None or self.memory.shape[1] == 0:
            return torch.zeros(count, self.memory.shape[1], dtype=torch.long, device=self.memory.device)
        return self.memory[rows]

    # ----------------------------------------------------------------- scoring
    def item_projections(self):
        """Every item's projected image and text features, [n_items, H] each.

        Projecting the whole catalogue once is no dearer than projecting a batch's distinct candidates
        (a client's sampled negatives cover most of it) and keeps every shape fixed, so the same code
        runs for one client and under `torch.func.vmap` for a cohort.
        """
        return self.visual_proj(self.image_feat), self.text_proj(self.text_feat)

    def content_vectors(self, projections=None) -> torch.Tensor:
        """c_i for every item, [n_items, H]: the sum of its available modalities' projected features
        (an item without a modality gets nothing from it, not the projector's bias)."""
        all_v, all_t = self.item_projections() if projections is None else projections
        available = self.available.to(all_v.dtype)
        return available[:, :1] * all_v + available[:, 1:] * all_t

    def route_table(self, projections=None) -> torch.Tensor:
        """The router's (r_v, r_t) for every item, [n_items, 2]: it depends on the item alone."""
        all_v, all_t = self.item_projections() if projections is None else projections
        return self.router(all_v, all_t, self.available)

    def score(self, state: torch.Tensor, candidates: torch.Tensor, memory: torch.Tensor, projections=None):
        """Scores of candidates for each state.

        state [P, H]; candidates [P, N] or [1, N] (shared); memory [P, K] item ids; projections: the
        output of `item_projections()` when the caller already has it.
        Returns scores [P, N] and a dict of per-candidate gate weights for logging and losses.
        """
        table = self.item_embedding.weight
        aux = {}
        if not self.uses_content():
            # One matmul against the whole table, then a gather: cheaper than gathering N embeddings per state.
            return (state @ table.T).gather(1, candidates.expand(state.shape[0], -1)), aux
        all_v, all_t = self.item_projections() if projections is None else projections
        # <s, e_i> + <s, c_i> as one matmul against e + c
        vectors = table + self.content_vectors((all_v, all_t)) if self.use_content else table
        scores = (state @ vectors.T).gather(1, candidates.expand(state.shape[0], -1))
        if not (self.use_align or self.use_experts):
            return scores, aux
        available = self.available[candidates]
        if self.use_align:
            # Whatever depends on the candidate alone is computed per item, then gathered: the
            # gating's item part and <P_v x_i, e_i>, <P_t x_i, e_i>.
            gate = self.align_gating(state, self.align_gating.item_part(all_v, all_t)[candidates], available)
            dots = torch.stack([(all_v * table).sum(-1), (all_t * table).sum(-1)], dim=-1)[candidates]
            scores = scores + self.beta * (gate * dots).sum(-1)  # <a_v P_v x_i + a_t P_t x_i, e_i>
            aux["align_weights"] = gate
        if self.use_experts:
            emb = table[candidates]
            mem_available = self.available[memory] & (memory > 0).unsqueeze(-1)
            # The experts' queries are the candidate's P_v x^v_i and e_i, so their projections are per item.
            visual = self.visual_expert(per_item(self.visual_expert.item_queries, all_v, candidates),
                                        all_v[memory], mem_available[..., 0]) if self.has_images else None
            semantic = self.semantic_expert(per_item(self.semantic_expert.item_queries, table, candidates),
                                            all_t[memory], mem_available[..., 1])
            route = self.route_table((all_v, all_t))[candidates]
            fused = self.fusion(state, visual, semantic, route)
            scores = scores + self.gamma * (fused * emb).sum(-1)
            aux["router_weights"] = route
        return scores, aux

    def mean_route(self, targets: torch.Tensor, negatives: torch.Tensor | None, weight: torch.Tensor):
        """[2]: the mean router weight over the candidates of every position, positions weighted by
        `weight` [P] (summing to 1). The load-balance loss is a function of this mean over all of a
        client's positions, so a client trained in parts needs it before its first part."""
        table = self.route_table()  # [n_items, 2]
        if negatives is None:  # full softmax: every position scores the whole catalogue
            return table.mean(0)
        route = table[torch.cat([targets.unsqueeze(1), negatives], dim=1)].mean(1)  # [P, 2]
        return (route * weight.unsqueeze(1)).sum(0)

    def _rows_per_chunk(self, device: torch.device | None = None) -> int:
        """Rows per full-catalogue scoring chunk; on a GPU without gradients (evaluation), as many as
        half its free memory holds, so a batch is one chunk or a few rather than rows by the dozen."""
        elements = SCORE_CHUNK_ELEMENTS
        if device is not None and device.type == "cuda" and not torch.is_grad_enabled():
            free, _ = torch.cuda.mem_get_info(device)
            elements = max(elements, free // (2 * LIVE_SCORE_TENSORS * 4))
        return max(1, elements // (self.n_items * self.hidden_size))

    def _score_all_items(self, state, memory):
        """Full-catalogue scores, in row chunks so [rows, n_items, H] tensors stay small."""
        candidates = torch.arange(self.n_items, device=state.device).unsqueeze(0)
        if not (self.use_align or self.use_experts):  # a plain matmul: no [rows, n_items, H] tensors
            return self.score(state, candidates, memory)[0]
        rows = self._rows_per_chunk(state.device)
        projections = self.item_projections()
        return torch.cat([self.score(state[i:i + rows], candidates, memory[i:i + rows], projections)[0]
                          for i in range(0, state.shape[0], rows)])

    # ----------------------------------------------------------------- RecBole API
    def _last_state(self, interaction):
        state = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        if MEM_ROW in interaction.interaction:
            return state, self.memory_ids(interaction[MEM_ROW], state.shape[0])
        if self.use_experts:
            # Scoring on without it would read an empty memory for every user, silently.
            raise UserError(f"UR4RecMoE with experts on reads each user's memory through the '{MEM_ROW}' field, "
                            f"which these interactions lack: build the dataset with RecBole's "
                            f"create_dataset(config) after importing recbole_ext.model.ur4rec_moe, or with "
                            f"recbole_ext.data.dataset.UR4RecDataset(config)")
        return state, self.memory_ids(None, state.shape[0])

    def predict(self, interaction):
        state, memory = self._last_state(interaction)
        return self.score(state, interaction[self.ITEM_ID].unsqueeze(1), memory)[0].squeeze(1)

    def full_sort_predict(self, interaction):
        state, memory = self._last_state(interaction)
        return self._score_all_items(state, memory)

    def calculate_loss(self, interaction):
        """RecBole's one-target-per-sequence loss (full softmax), so a stock RecBole Trainer can train
        this model too; the project's trainers use `masked_sequence_loss`.

        With align or experts on, the full-catalogue scores of a batch are [batch, n_items, H] tensors
        (GBs at RecBole's batch size of 2048), so the batch is taken in row chunks, each under
        activation checkpointing (recomputed in backward), the way a federated client too large for one
        pass is trained in parts (`masked_sequence_loss`): each chunk weighs its share of the mean, the
        align loss comes with the first chunk only, and the load balance, which couples all rows through
        the router's mean weight, gets that mean from outside.
        """
        state, memory = self._last_state(interaction)
        target = interaction[self.POS_ITEM_ID]
        rows = self._rows_per_chunk()
        if not (self.use_align or self.use_experts) or len(target) <= rows:
            return self._losses(state, target, memory, None)["loss"]
        weight = torch.full(target.shape, 1.0 / len(target), dtype=state.dtype, device=state.device)
        items = torch.unique(target)
        with torch.no_grad():
            route_mean = self.mean_route(target, None, weight) if self.use_experts else None
        loss, lb_parts = 0.0, 0.0
        for i in range(0, len(target), rows):
            align = (items, torch.full_like(items, i == 0, dtype=torch.bool))
            part = checkpoint(self._losses, state[i:i + rows], target[i:i + rows], memory[i:i + rows], None,
                              weight[i:i + rows], align, route_mean, use_reentrant=False)
            loss, lb_parts = loss + part["loss"], lb_parts + part["lb_loss"]
        if self.use_experts:
            # The parts' load-balance terms have the exact gradient but not the exact value; report it.
            loss = loss + self.lambda_lb * (((route_mean - 0.5) ** 2).sum() - lb_parts).detach()
        return loss

    # ----------------------------------------------------------------- training losses
    def masked_sequence_loss(self, item_seq, positions, targets, mem_rows, negatives, align_items, align_mask,
                             states=None, total=None, route_mean=None, tail_seq=None):
        """The training loss over every position of a client's windows at once (causal attention,
        as SASRec trains), with fixed shapes so the same code runs for one client and under
        `torch.func.vmap` for a cohort.

        The positions to train are given as indices instead of a boolean mask (whose selection has a
        data-dependent size), padded to a common length and weighted 0; the align loss's distinct
        target items come in padded too (`torch.unique` has no batching rule).
        item_seq [W, L]; positions [P] indices into the W * L window positions, the real ones in
        row-major order; targets, mem_rows [P] (target 0 = padding); negatives [P, n] or None;
        align_items [U] the distinct targets, align_mask [U] which of them are real; states [P, H]
        the backbone output at `positions` when the caller keeps it (a frozen backbone), else it is
        computed here from item_seq and tail_seq [1, T]: a window shorter than L, encoded at its own
        length (its positions come after item_seq's W * L in `positions`). Under causal attention
        a window's trailing padding changes nothing before it, so this only saves work.

        A client too large for one pass is trained in parts (sets of its windows) whose gradients
        add up: then `total` is its number of positions (each weighs 1 / total, so the parts' losses
        sum to the whole loss), the align loss comes with one part only (align_mask all False in the
        others), and `route_mean` [2] is the mean router weight over all its positions (see `_losses`).
        """
        if states is None:
            encoded = [self.encode(seq).flatten(0, 1) for seq in (item_seq, tail_seq) if seq is not None]
            states = torch.cat(encoded)[positions]
        valid = targets > 0
        weight = valid.to(states.dtype) / (valid.sum() if total is None else total)
        target = torch.where(valid, targets, 1)  # padding rows score a real item, at weight 0
        memory = self.memory_ids(mem_rows, states.shape[0])
        return self._losses(states, target, memory, negatives, weight, (align_items, align_mask), route_mean)

    def _losses(self, state, target, memory, negatives, weight=None, align=None, route_mean=None):
        """weight [P]: per-position weights (masked form; they sum to 1, or to this part's share of a
        client trained in parts), or None for the plain mean; align: (items, mask) for
        `masked_align_loss`, or None to take the distinct targets here; route_mean: see below."""
        def average(per_position):  # [P, ...] -> [...]
            if weight is None:
                return per_position.mean(0)
            return (per_position * weight.view(-1, *[1] * (per_position.ndim - 1))).sum(0)

        if negatives is None or self.rec_loss == "ce":
            scores, aux = self.score(state, torch.arange(self.n_items, device=state.device).unsqueeze(0), memory)
            scores[:, 0] = float("-inf")
            rec = average(F.cross_entropy(scores, target, reduction="none"))
        else:
            scores, aux = self.score(state, torch.cat([target.unsqueeze(1), negatives], dim=1), memory)
            if self.rec_loss == "bpr":
                rec = average(-F.logsigmoid(scores[:, :1] - scores[:, 1:]).mean(1))
            else:
                rec = average(F.cross_entropy(scores, torch.zeros_like(target), reduction="none"))
        zero = scores.new_zeros(())
        out = {"rec_loss": rec, "align_loss": zero, "lb_loss": zero}
        if self.use_align:
            out["align_loss"] = (self.align_loss(torch.unique(target)) if align is None
                                 else self.masked_align_loss(*align))
            out["align_weights"] = average(aux["align_weights"].mean(-2)).detach() if weight is not None \
                else aux["align_weights"].reshape(-1, 2).mean(0).detach()
        if self.use_experts:
            route = aux["router_weights"]  # [P, N, 2], or [1, N, 2] for candidates shared by all positions
            if route.shape[0] == state.shape[0]:
                mean_route = average(route.mean(-2))
            else:  # shared candidates: the same mean at every position, scaled to this call's share
                mean_route = route.reshape(-1, 2).mean(0) * (1.0 if weight is None else weight.sum())
            if route_mean is None:
                out["lb_loss"] = ((mean_route - 0.5) ** 2).sum()
            else:
                # A part of a client: the load balance couples all its positions through their mean m,
                # given here (no gradient). sum_e 2 (m_e - 1/2) * (this part's share of m_e) has this part's
                # share of the exact gradient; the backend reports the loss value from m itself.
                out["lb_loss"] = (2 * (route_mean - 0.5) * mean_route).sum()
            out["router_weights"] = mean_route.detach()
        out["loss"] = rec + self.lambda_align * out["align_loss"] + self.lambda_lb * out["lb_loss"]
        return out

    def align_loss(self, items: torch.Tensor) -> torch.Tensor:
        """InfoNCE between each modality's projected features and the (frozen) item embeddings."""
        target = F.normalize(self.item_embedding(items).detach(), dim=-1)
        losses = []
        for column, proj, feats in ((0, self.visual_proj, self.image_feat), (1, self.text_proj, self.text_feat)):
            have = self.available[items, column]
            if int(have.sum()) < 2:
                continue
            z = F.normalize(proj(feats[items[have]]), dim=-1)
            logits = z @ target[have].T / self.align_temperature
            losses.append(F.cross_entropy(logits, torch.arange(len(z), device=z.device)))
        return torch.stack(losses).mean() if losses else self.gamma.new_zeros(())

    def masked_align_loss(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`align_loss` over the real entries of a padded item list, without data-dependent branches
        (for vmap): excluded columns get a large negative logit, excluded rows weight 0, and a modality
        with fewer than two items drops out of the mean, as in `align_loss`."""
        target = F.normalize(self.item_embedding(items).detach(), dim=-1)
        labels = torch.arange(items.shape[0], device=items.device)
        losses, active = [], []
        for column, proj, feats in ((0, self.visual_proj, self.image_feat), (1, self.text_proj, self.text_feat)):
            have = self.available[items, column] & mask
            count = have.sum()
            z = F.normalize(proj(feats[items]), dim=-1)
            logits = z @ target.T / self.align_temperature
            # The lowest finite value of the logits' dtype, never -inf: a row whose every column is
            # excluded (a target without this modality) stays finite, and weighs 0 below.
            logits = logits.masked_fill(~have.unsqueeze(0), torch.finfo(logits.dtype).min)
            per_row = F.cross_entropy(logits, labels, reduction="none")
            losses.append((per_row * have).sum() / count.clamp_min(1))
            active.append(count >= 2)
        active = torch.stack(active).to(target.dtype)
        return (torch.stack(losses) * active).sum() / active.sum().clamp_min(1)


# A stock RecBole script that imports this module gets the defaults above from `Config` and this
# project's dataset (memory rows, features) from `create_dataset`.
compat.register_model(UR4RecMoE, DEFAULTS, UR4RecDataset)
