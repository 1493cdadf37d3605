"""`map_tensors`: apply a function to every tensor inside a nested structure of batch data.

A bottom module (it imports only torch) so that batches, encoder outputs and decoder states can all use it
without importing each other.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import Tensor


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply `fn` to every tensor inside `obj` (tensors, None, tuples, lists, dicts, dataclasses); anything
    else is kept as it is. Dataclasses and named tuples come back as copies of their own type."""
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
