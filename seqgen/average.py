"""Checkpoint averaging: the mean of the weights of compatible checkpoints (same config and vocabularies),
usually the last N validation checkpoints of one run (`--keep-checkpoints N`). `seqgen average` writes it.
"""
from __future__ import annotations

import json
from typing import Sequence

import torch

from seqgen.config import to_dict
from seqgen.errors import SeqgenError
from seqgen.model import Seq2Seq, load_model


def _differences(a: Seq2Seq, b: Seq2Seq) -> list[str]:
    out = []
    if a.config.task != b.config.task:
        return [f"task ({a.config.task} vs {b.config.task})"]
    ca, cb = to_dict(a.config), to_dict(b.config)
    for section in ca:
        if ca[section] != cb[section]:
            fields = [k for k in (ca[section] or {}) if (ca[section] or {}).get(k) != (cb[section] or {}).get(k)] \
                if isinstance(ca[section], dict) and isinstance(cb[section], dict) else []
            out.append(f"{section}" + (f" ({', '.join(fields)})" if fields else ""))
    if a.tgt != b.tgt:
        out.append("target vocabulary")
    if (a.src is None) != (b.src is None) or (a.src is not None and a.src != b.src):
        out.append("source vocabulary")
    return out


def average_models(paths: Sequence[str]) -> Seq2Seq:
    """The model whose weights are the mean of the models at `paths` (checkpoints or shipped names)."""
    if len(paths) < 2:
        raise SeqgenError(f"give at least two checkpoints to average (got {len(paths)})")
    models = [load_model(p) for p in paths]
    first = models[0]
    for path, m in zip(paths[1:], models[1:]):
        diff = _differences(first, m)
        if diff:
            raise SeqgenError(f"cannot average {paths[0]} with {path}: they differ in {'; '.join(diff)}")
    states = [m.state_dict() for m in models]
    averaged = {}
    for name, value in states[0].items():
        if value.is_floating_point():
            total = torch.zeros_like(value, dtype=torch.float64)
            for s in states:
                total += s[name].to(torch.float64)
            averaged[name] = (total / len(states)).to(value.dtype)
        else:
            averaged[name] = value
    first.load_state_dict(averaged)
    return first


def average_payload(paths: Sequence[str]) -> dict:
    """A checkpoint payload of the averaged model, noting what it was averaged from."""
    payload = average_models(paths).to_payload()
    payload["averaged_from"] = json.dumps(list(paths))
    return payload
