"""Exponential moving average (EMA) of a model's weights, used for validation and best.pt.

Why: the weights after any one step carry that step's gradient noise; their running average over the last
~1 / (1 - decay) steps is a smoother model that usually validates better (the idea behind checkpoint averaging
in NMT toolkits, without keeping N checkpoints). Cost: one float32 copy of the trainable weights and one
lerp per optimizer step.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from seqgen.errors import SeqgenError


def ema_decay(decay: float, updates: int) -> float:
    """The decay used at update number `updates` (1-based): min(decay, (1 + n) / (10 + n)).

    Early updates use a smaller decay so the average is not dominated by the initial weights in short runs
    (TensorFlow's `num_updates` rule).
    """
    return min(decay, (1 + updates) / (10 + updates))


class WeightEMA:
    """Average of `model`'s trainable parameters, updated after each optimizer step.

    shadow[name] <- shadow[name] + (1 - d) * (param - shadow[name]),  d = ema_decay(decay, updates).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise SeqgenError(f"--ema must be between 0 and 1 (e.g. 0.999), or 0 for none; got {decay}")
        self.decay = decay
        self.updates = 0
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self._shadow_list = list(self.shadow.values())   # the same tensors, in parameter order, for foreach ops

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (call after optimizer.step())."""
        self.updates += 1
        weight = 1.0 - ema_decay(self.decay, self.updates)
        # one multi-tensor kernel per step rather than a Python loop of ~20 lerps (runs every optimizer step)
        torch._foreach_lerp_(self._shadow_list, [p.detach().float() for p in self.params.values()], weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights; afterwards its own weights again (bitwise)."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, int | dict[str, Tensor]]:
        """{"updates": n, "weights": {parameter name: float32 average}} (plain data for the checkpoint)."""
        return {"updates": self.updates, "weights": dict(self.shadow)}

    def load_state_dict(self, state: dict, where: str) -> None:
        """Restore an average saved by `state_dict`; `where` names the checkpoint in errors."""
        weights = state.get("weights", {})
        if set(weights) != set(self.shadow) or any(weights[n].shape != s.shape for n, s in self.shadow.items()):
            raise SeqgenError(f"{where}: its weight average does not match this model's parameters")
        self.updates = int(state.get("updates", 0))
        for name, value in weights.items():
            self.shadow[name].copy_(value)
