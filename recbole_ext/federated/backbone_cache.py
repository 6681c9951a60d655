"""The frozen backbone's output at every training position, computed once per stage.

In stage 2 nothing `encode` reads trains (item and position embeddings, transformer, LayerNorm), so
a position's backbone state is the same in every round; only the projectors and the gating MLP
change. Computing the states once and gathering them per round removes the transformer from the
round entirely. A frozen backbone runs without dropout wherever it runs (`UR4RecMoE.train`), so
these states are exactly what the `sequential` backend and the centralized trainer compute every
step, whatever the configured dropout (tests/test_backends.py).

If the backbone's weights change in place (a checkpoint load), the cache sees it through the
parameters' version counters and recomputes.
"""
from __future__ import annotations

import torch

from ..model.ur4rec_moe import BACKBONE_GROUPS


class BackboneCache:
    def __init__(self, model, inputs: torch.Tensor, batch_windows: int = 512):
        """inputs: [W, L] every training window's item ids (TrainingWindows.inputs)."""
        self.model = model
        self.inputs = inputs
        self.batch_windows = batch_windows
        self._params = [p for name, p in model.named_parameters() if name.split(".", 1)[0] in BACKBONE_GROUPS]
        self._version = None
        self._states = None
        self.generation = 0  # how many times the states were computed (others re-share on change)

    def _current_version(self) -> tuple:
        return tuple(p._version for p in self._params)

    def states(self) -> torch.Tensor:
        """[W, L, H] backbone output of every window (recomputed only if the backbone changed)."""
        if self._states is None or self._version != self._current_version():
            self._states = self._compute()
            self._version = self._current_version()
            self.generation += 1
        return self._states

    @torch.no_grad()
    def _compute(self) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            device = self._params[0].device
            parts = [self.model.encode(self.inputs[i:i + self.batch_windows].to(device))
                     for i in range(0, len(self.inputs), self.batch_windows)]
        finally:
            self.model.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, self.inputs.shape[1], self.model.hidden_size,
                                                          device=device)
