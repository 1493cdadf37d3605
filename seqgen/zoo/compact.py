"""The compact weight format: a checkpoint payload whose weights take a quarter (int8) or half (fp16) the space.

A compact payload is an ordinary checkpoint payload (same outer file, checksum, `weights_only` loading) with
three differences, all plain data:

    "model":    {name: tensor}; matrices of at least MIN_QUANT elements as int8 when precision is "int8",
                every other floating tensor as float16 (integers untouched)
    "compact":  {"version": 1, "precision": "int8" | "fp16", "scales": {name: float32 [rows]},
                 "external": {"weights": "imagenet", "keys": [name, ...]} or absent}

int8 is symmetric per output row (row = index along dim 0): w ≈ q * scale[row], scale = max|w_row| / 127,
which keeps each row's relative error at most 1/254 of its largest entry. `external` lists weights left out
because a package installs them bit for bit (a frozen CNN backbone's ImageNet weights): `expand` leaves them
out of "model", and `Seq2Seq.from_payload` builds the encoder with `weights` so they come from that package.

`expand` returns a float32 payload, so a compact model decodes exactly like a float32 model with the
dequantized weights: the same kernels, the same speed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from seqgen.errors import SeqgenError

VERSION = 1
PRECISIONS = ("int8", "fp16")
MIN_QUANT = 4096     # smaller tensors (biases, norms, tiny matrices) stay float16: int8 would save nothing


def _quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [R, ...] float -> (q [R, ...] int8, scale [R] float32) with w ≈ q * scale[:, None, ...]."""
    rows = w.detach().float().reshape(w.size(0), -1)
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def compact_payload(payload: dict[str, Any], precision: str = "int8",
                    external: dict[str, Tensor] | None = None, external_weights: str | None = None) -> dict[str, Any]:
    """A compact copy of a model payload (config, codecs, weights; training state dropped).

    external: weights that a package installs (e.g. the encoder built with weights="imagenet"); each weight of
    the payload that equals its entry there bit for bit is left out and listed, so it is never stored twice.
    """
    if precision not in PRECISIONS:
        raise SeqgenError(f"compact precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model = payload["model"]
    skipped = sorted(k for k, v in model.items()
                     if external is not None and k in external and external[k].shape == v.shape
                     and torch.equal(external[k].to(v.dtype), v))
    if skipped and not external_weights:
        raise SeqgenError("compact_payload: external weights need the name of their source (external_weights)")
    weights: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    for name, w in model.items():
        if name in skipped:
            continue
        if not w.is_floating_point():
            weights[name] = w.clone()
        elif precision == "int8" and w.dim() >= 2 and w.numel() >= MIN_QUANT:
            weights[name], scales[name] = _quantize_rows(w)
        else:
            weights[name] = w.detach().to(torch.float16).clone()
    meta: dict[str, Any] = {"version": VERSION, "precision": precision, "scales": scales}
    if skipped:
        meta["external"] = {"weights": external_weights, "keys": skipped}
    keep = ("task", "config", "tgt", "src")
    return {**{k: payload[k] for k in keep if k in payload}, "model": weights, "compact": meta}


def is_compact(payload: dict[str, Any]) -> bool:
    return isinstance(payload, dict) and "compact" in payload


def expand_payload(payload: dict[str, Any], where: str = "checkpoint") -> dict[str, Any]:
    """A compact payload with float32 weights again (external weights still left out; see the module doc)."""
    meta = payload.get("compact")
    if not isinstance(meta, dict) or meta.get("version") != VERSION or meta.get("precision") not in PRECISIONS:
        raise SeqgenError(f"{where}: unknown compact weight format ({meta.get('version') if isinstance(meta, dict) else meta!r}); "
                          f"upgrade seqgen")
    scales = meta.get("scales") or {}
    model = {}
    for name, w in payload["model"].items():
        if name in scales:
            s = scales[name]
            if not isinstance(w, Tensor) or w.dtype != torch.int8 or not isinstance(s, Tensor) or s.numel() != w.size(0):
                raise SeqgenError(f"{where}: compact weight {name} does not match its scales")
            model[name] = (w.float().reshape(w.size(0), -1) * s.float()[:, None]).reshape(w.shape)
        elif isinstance(w, Tensor) and w.is_floating_point():
            model[name] = w.float()
        else:
            model[name] = w
    return {**payload, "model": model}


def external_weights(payload: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(source, keys) of the weights a compact payload leaves to a package; (None, []) if none."""
    ext = (payload.get("compact") or {}).get("external")
    if not ext:
        return None, []
    return ext["weights"], list(ext["keys"])
