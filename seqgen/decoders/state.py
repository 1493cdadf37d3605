"""Decoder state and the one helper search needs to reorder any batch-first state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from seqgen.tensors import map_tensors


@dataclass
class DecoderState:
    """Everything the decoder carries between steps, batch first so beams are just a larger batch.

    h:    [B, L, H] hidden state of each RNN layer.
    c:    [B, L, H] LSTM cell state (None for GRU).
    feed: [B, O]    previous attentional vector (input feeding), None when input feeding is off.
    attn: [B, S]    attention weights of the last step (for attention maps), None without attention.
    """

    h: Tensor
    c: Tensor | None = None
    feed: Tensor | None = None
    attn: Tensor | None = None


def select_batch(obj: Any, index: Tensor) -> Any:
    """Keep / reorder / repeat batch rows: every tensor becomes `t.index_select(0, index)`.

    An object with its own `select_batch(index)` method (`EncoderOutput`) does this itself.
    """
    if hasattr(obj, "select_batch"):
        return obj.select_batch(index)
    return map_tensors(obj, lambda t: t.index_select(0, index))


def repeat_batch(obj: Any, times: int) -> Any:
    """Repeat each batch row `times` times in place ([a, b] -> [a, a, b, b]): one row per beam.

    An object with its own `repeat_batch(times)` method (`EncoderOutput`, which copies nothing) does this itself.
    """
    if times == 1:
        return obj
    if hasattr(obj, "repeat_batch"):
        return obj.repeat_batch(times)
    return map_tensors(obj, lambda t: t.repeat_interleave(times, dim=0))


__all__ = ["DecoderState", "select_batch", "repeat_batch"]
