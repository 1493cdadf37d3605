"""Checkpoint files: atomic writes, safe loads, integrity checks, a format version.

A checkpoint is one file written by `torch.save` holding only plain data:

    {"format": "seqgen-checkpoint", "version": 2, "sha256": <hex>, "payload": {...}}

where `payload` is a dict (config as JSON text, vocabularies as lists of str, weights, optionally the trainer
state) and `sha256` is the digest of its canonical encoding (`payload_digest`: every key, string, number and
tensor's dtype, shape and bytes, in order). It is read with `torch.load(weights_only=True)`, so loading never
runs pickled code; the digest catches bit-flipped files before anything is used, and torch's zip reader refuses
truncated ones.

Version 1 (still read) held the payload as a `torch.save`d byte string inside the outer file, digested as
bytes. Writing it needed the whole serialized payload in memory beside the model and its Adam state (a copy of
both), reading it three; version 2 is written straight to the file and read as one copy, which is what keeps
a training run's peak memory at the training step's (docs/performance.md, "Large corpora").
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import torch

from seqgen.atomic import atomic_write
from seqgen.errors import SeqgenError, cut_repr
from seqgen.tensors import map_tensors

FORMAT = "seqgen-checkpoint"
VERSION = 2
MAX_JSON_CHARS = 1 << 20     # a config or state entry (JSON text) of a payload


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically: a temp file in the same folder, fsync, then rename.

    A crash or a full disk at any moment leaves either the old file or the new one, never a mix (a failed write
    raises its OSError, ENOSPC for a full disk); a kill leaves at most a temp file `.tmp-NAME-XXXX` (see
    `seqgen.atomic.remove_partial_writes`). Nothing is serialized in memory first: torch.save writes each
    tensor from where it lies.
    """
    outer = {"format": FORMAT, "version": VERSION, "sha256": payload_digest(payload), "payload": payload}
    atomic_write(path, lambda f: _save_reporting_os_errors(outer, f))


def payload_digest(payload: Any) -> str:
    """sha256 (hex) of a payload's canonical encoding: type tags, lengths, dict keys and values in order,
    str/bytes/numbers, and each tensor's dtype, shape and bytes. TypeError for anything else (seqgen writes
    nothing else; a loaded payload holding something else is not seqgen's)."""
    h = hashlib.sha256()
    _digest_into(h, payload, depth=0)
    return h.hexdigest()


def _digest_into(h, obj: Any, depth: int) -> None:
    if depth > 32:
        raise TypeError("nested too deeply")
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}:{list(obj.shape)}:".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())      # the bytes in place: no copy of the weights
    elif isinstance(obj, dict):
        h.update(f"d{len(obj)}:".encode())
        for key, value in obj.items():
            _digest_into(h, key, depth + 1)
            _digest_into(h, value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'l' if isinstance(obj, list) else 't'}{len(obj)}:".encode())
        for value in obj:
            _digest_into(h, value, depth + 1)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"s{len(data)}:".encode() + data)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(f"b{len(obj)}:".encode() + bytes(obj))
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"a {type(obj).__name__} in a checkpoint payload")


class _Writer:
    """A file as torch.save sees it, noting the OSError of a failed write (torch reports it as a RuntimeError)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def __getattr__(self, name):
        return getattr(self.f, name)

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise


def _save_reporting_os_errors(obj: Any, f) -> None:
    """torch.save(obj, f), raising the OSError of a write that failed (a full disk: ENOSPC), not torch's
    RuntimeError ("unexpected pos ..."), so that callers report it like any other failed write."""
    writer = _Writer(f)
    try:
        torch.save(obj, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; SeqgenError if it is missing, foreign, corrupt
    or from a newer seqgen. Returns the payload dict."""
    if not os.path.isfile(path):
        raise SeqgenError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is not ours
        raise SeqgenError(f"{path}: not a seqgen checkpoint" + (" (empty file)" if not magic else ""))
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated zips and for pickled code
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            raise SeqgenError(f"{path}: refused: the file contains pickled code, not plain data "
                              f"(not a seqgen checkpoint, or tampered with)") from None
        raise SeqgenError(f"{path}: not a readable checkpoint (truncated or corrupt: {msg[:120]})") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise SeqgenError(f"{path}: not a seqgen checkpoint")
    version = outer.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SeqgenError(f"{path}: not a seqgen checkpoint (format version {cut_repr(version)})")
    if version > VERSION:
        raise SeqgenError(f"{path}: checkpoint format version {version} is newer than this seqgen "
                          f"understands ({VERSION}); upgrade seqgen")
    payload = _payload_v1(outer, path, map_location) if version == 1 else _payload_v2(outer, path, map_location)
    if not isinstance(payload, dict):
        raise SeqgenError(f"{path}: the checkpoint's payload is a {type(payload).__name__}, not the mapping seqgen "
                          f"writes (not a seqgen model, or modified)")
    return payload


def _payload_v2(outer: dict, path: str, map_location: str | torch.device) -> Any:
    payload = outer.get("payload")
    try:
        digest = payload_digest(payload)
    except (TypeError, ValueError, RuntimeError) as e:     # ValueError: an int too long to print
        raise SeqgenError(f"{path}: the checkpoint's payload is not the plain data seqgen writes ({e})") from None
    if digest != outer.get("sha256"):
        raise SeqgenError(f"{path}: checksum mismatch: the checkpoint is corrupt (truncated or modified)")
    if map_location != "cpu" and isinstance(payload, dict):
        device = torch.device(map_location)
        payload = map_tensors(payload, lambda t: t.to(device))
    return payload


def _payload_v1(outer: dict, path: str, map_location: str | torch.device) -> Any:
    """The payload of a version-1 file: a torch.save'd byte string digested as bytes."""
    raw = outer.get("payload")
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise SeqgenError(f"{path}: checkpoint has no payload")
    data = raw.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != outer.get("sha256"):
        raise SeqgenError(f"{path}: checksum mismatch: the checkpoint is corrupt (truncated or modified)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        raise SeqgenError(f"{path}: checkpoint payload cannot be read safely ({str(e).splitlines()[0][:120]})") from None


def payload_json(payload: dict[str, Any], key: str, where: str) -> Any:
    """The JSON text `payload[key]` (a config, a run config, a trainer state) parsed; SeqgenError naming `where` if
    it is missing, not text, longer than MAX_JSON_CHARS, invalid or nested too deeply."""
    text = payload.get(key)
    if text is None:
        raise SeqgenError(f"{where}: the checkpoint has no {key} entry")
    if not isinstance(text, str) or len(text) > MAX_JSON_CHARS:
        raise SeqgenError(f"{where}: the checkpoint's {key} entry is not the JSON text seqgen writes")
    try:
        return json.loads(text)
    except RecursionError:
        raise SeqgenError(f"{where}: the checkpoint's {key} entry is nested too deeply") from None
    except ValueError as e:
        raise SeqgenError(f"{where}: the checkpoint's {key} entry is not valid JSON ({e})") from None
