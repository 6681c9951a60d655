"""The local optimizer: SGD and AdamW, one implementation for every trainer and backend.

Written as functions over lists of stacked per-client tensors ([C, ...], dim 0 the client): the
`vectorized` backend steps a whole cohort at once, and `LocalOptimizer` steps one model's own
parameters as a cohort of one (views, updated in place), for the `sequential` backend and the
centralized trainer. Each client clips its own gradient (as `torch.nn.utils.clip_grad_norm_` over
all its trainable tensors) and decays only the tensors `decays` names (decoupled, as AdamW). The
steps are torch.optim's (foreach form, same operation order); tests/test_local_optim.py checks them
against torch.optim.
"""
from __future__ import annotations

import torch

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults
ADAM_EPS = 1e-8


def decays(name: str, param: torch.Tensor) -> bool:
    """Decoupled weight decay only on weight matrices: never on embeddings, norms or scalars, so
    embedding rows a client never touched do not shrink."""
    return param.ndim >= 2 and "embedding" not in name


@torch.no_grad()
def clip_coefficients(grads: list, max_norm: float) -> torch.Tensor:
    """[C]: the factor `torch.nn.utils.clip_grad_norm_` scales each client's (dim 0) gradients by."""
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads])  # [n_params, C]
    return (max_norm / (norms.norm(dim=0) + 1e-6)).clamp(max=1.0)


def per_client(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[C] values shaped to broadcast over `like`'s [C, ...]."""
    return values.view(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def scale_per_client_(grads: list, coef: torch.Tensor) -> None:
    for g in grads:
        g.mul_(per_client(coef, g))


@torch.no_grad()
def adamw_(params: list, grads: list, exp_avg: list, exp_avg_sq: list, step: int, lr: float,
           weight_decay: list) -> None:
    """torch.optim.AdamW's step (foreach form, same operation order), on stacked per-client tensors."""
    beta1, beta2 = ADAM_BETAS
    for p, decay in zip(params, weight_decay):
        if decay:
            p.mul_(1 - lr * decay)
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
    step_size = -lr / (1 - beta1 ** step)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
    torch._foreach_add_(denom, ADAM_EPS)
    torch._foreach_addcdiv_(params, exp_avg, denom, step_size)


@torch.no_grad()
def sgd_(params: list, grads: list, lr: float, weight_decay: list) -> None:
    """torch.optim.SGD's step (no momentum; decay added to the gradient), on stacked per-client tensors."""
    for p, g, decay in zip(params, grads, weight_decay):
        p.sub_(g.add(p, alpha=decay) if decay else g, alpha=lr)


@torch.no_grad()
def first_sgd_step_sum(grads: list, clip: torch.Tensor | None, weights: torch.Tensor, total: float,
                       params: list, lr: float, weight_decay: list) -> list:
    """sum_c weights[c] * (the parameter change of client c's first SGD step): -lr (c_c g_c + decay p);
    `total` is sum_c weights[c], passed from the host."""
    scale = weights if clip is None else weights * clip
    out = []
    for g, p, decay in zip(grads, params, weight_decay):
        update = torch.einsum("c,c...->...", scale.to(g.dtype), g).mul_(-lr)
        if decay:
            update.sub_(p, alpha=lr * decay * total)
        out.append(update)
    return out


@torch.no_grad()
def first_adamw_step_sum(grads: list, clip: torch.Tensor | None, weights: torch.Tensor, total: float,
                         params: list, lr: float, weight_decay: list) -> list:
    """sum_c weights[c] * (the parameter change of client c's first AdamW step), per parameter
    (`total` = sum_c weights[c], from the host).

    With zero moments, step 1 has m = (1 - b1) g and v = (1 - b2) g^2 and the bias corrections
    cancel the (1 - b) factors: delta = -lr * g / (|g| + eps) - lr * weight_decay * p. Clipping by a
    factor c gives c g / (c |g| + eps) = g / (|g| + eps / c), so the clipped gradient is never
    formed. This equals `adamw_`'s first step up to float rounding (tests/test_backends.py checks
    it). `grads` is overwritten.
    """
    eps = ADAM_EPS if clip is None else ADAM_EPS / clip
    out = []
    for g, p, decay in zip(grads, params, weight_decay):
        denom = g.abs().add_(eps if clip is None else per_client(eps, g))
        update = torch.einsum("c,c...->...", weights.to(g.dtype), g.div_(denom)).mul_(-lr)
        if decay:
            update.sub_(p, alpha=lr * decay * total)
        out.append(update)
    return out


class LocalOptimizer:
    """`optim.optimizer` (sgd | adamw) over a model's trainable parameters, stepped as a cohort of
    one: `step()` clips (`optim.clip_grad_norm`) and applies the gradients in `.grad` (none counts
    as zero, as a cohort's gradient would be)."""

    def __init__(self, model, optim: dict):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.weight_decay = [optim["weight_decay"] if decays(name, p) else 0.0 for name, p in named]
        # torch.optim's numbering of the same parameters (decayed group first), for its saved states
        self.torch_order = ([i for i, (n, p) in enumerate(named) if decays(n, p)]
                            + [i for i, (n, p) in enumerate(named) if not decays(n, p)])
        self.lr, self.clip = optim["learning_rate"], optim["clip_grad_norm"]
        self.adamw = optim["optimizer"] == "adamw"
        self.steps = 0
        self.exp_avg = self.exp_avg_sq = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p.unsqueeze(0) for p in self.params]
        grads = [torch.zeros_like(q) if p.grad is None else p.grad.unsqueeze(0) for p, q in zip(self.params, params)]
        if self.clip:
            scale_per_client_(grads, clip_coefficients(grads, self.clip))
        self.steps += 1
        if not self.adamw:
            sgd_(params, grads, self.lr, self.weight_decay)
            return
        if self.exp_avg is None:
            self.exp_avg = [torch.zeros_like(p) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        adamw_(params, grads, self.exp_avg, self.exp_avg_sq, self.steps, self.lr, self.weight_decay)

    def state_dict(self) -> dict:
        """Tensors and plain numbers only (a run's resumable state loads with weights_only)."""
        return {"steps": self.steps, "exp_avg": self.exp_avg or [], "exp_avg_sq": self.exp_avg_sq or []}

    def load_state_dict(self, state: dict) -> None:
        """A state of `state_dict`, or of the torch.optim SGD/AdamW this replaced (a centralized run's
        state.pt written before goes on where it stopped)."""
        device = self.params[0].device if self.params else "cpu"
        if "param_groups" in state:
            state = self._from_torch(state)
        self.steps = int(state["steps"])
        self.exp_avg = [t.to(device, copy=True) for t in state["exp_avg"]] or None
        self.exp_avg_sq = [t.to(device, copy=True) for t in state["exp_avg_sq"]] or None

    def _from_torch(self, state: dict) -> dict:
        moments = {"exp_avg": [None] * len(self.params), "exp_avg_sq": [None] * len(self.params)}
        steps = 0
        for torch_index, ours in enumerate(self.torch_order):
            entry = state["state"].get(torch_index, {})
            steps = max(steps, int(entry.get("step", 0)))
            for key in moments:
                if key in entry:
                    moments[key][ours] = entry[key].unsqueeze(0)
        if not self.adamw or steps == 0:
            return {"steps": steps, "exp_avg": [], "exp_avg_sq": []}
        # torch skips a parameter that never had a gradient; here it has zero moments
        return {"steps": steps, **{key: [torch.zeros_like(p).unsqueeze(0) if m is None else m
                                         for m, p in zip(values, self.params)] for key, values in moments.items()}}
