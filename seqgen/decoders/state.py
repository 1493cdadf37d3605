"""Decoder state and the one helper search needs to reorder any batch-first state."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor


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


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply `fn` to every tensor inside `obj` (tensors, None, tuples, lists, dicts, dataclasses)."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple):
        return type(obj)(*(map_tensors(x, fn) for x in obj)) if hasattr(obj, "_fields") else tuple(
            map_tensors(x, fn) for x in obj)
    if isinstance(obj, list):
        return [map_tensors(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


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


__all__ = ["DecoderState", "map_tensors", "select_batch", "repeat_batch"]
