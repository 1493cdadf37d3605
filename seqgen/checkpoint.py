"""Checkpoint files: atomic writes, safe loads, integrity checks, a format version.

A checkpoint is one file written by `torch.save` holding only plain data:

    {"format": "seqgen-checkpoint", "version": 1, "sha256": <hex of payload bytes>, "payload": uint8 tensor}

where `payload` is itself a `torch.save`d dict (config as JSON text, vocabularies as lists of str, weights,
optionally the trainer state). Both levels are read with `torch.load(weights_only=True)`, so loading never
runs pickled code; the checksum catches truncated or bit-flipped files before anything is used.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import torch

from seqgen.atomic import atomic_write
from seqgen.errors import SeqgenError

FORMAT = "seqgen-checkpoint"
VERSION = 1
MAX_JSON_CHARS = 1 << 20     # a config or state entry (JSON text) of a payload


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically: a temp file in the same folder, fsync, then rename.

    A crash or a full disk at any moment leaves either the old file or the new one, never a mix (a failed write
    raises its OSError, ENOSPC for a full disk); a kill leaves at most a temp file `.tmp-NAME-XXXX` (see
    `seqgen.atomic.remove_partial_writes`).
    """
    buf = io.BytesIO()
    torch.save(payload, buf)
    # One in-memory copy of the serialized payload, not three (getvalue() and bytearray() each copied it): the
    # checkpoint write was the peak of a training run's RSS (docs/performance.md, "Large corpora").
    raw = buf.getbuffer()
    outer = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(raw).hexdigest(),
             "payload": torch.frombuffer(raw, dtype=torch.uint8)}
    atomic_write(path, lambda f: _save_reporting_os_errors(outer, f))


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
    if not isinstance(version, int) or version > VERSION:
        raise SeqgenError(f"{path}: checkpoint format version {version} is newer than this seqgen "
                          f"understands ({VERSION}); upgrade seqgen")
    raw = outer.get("payload")
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise SeqgenError(f"{path}: checkpoint has no payload")
    data = raw.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != outer.get("sha256"):
        raise SeqgenError(f"{path}: checksum mismatch: the checkpoint is corrupt (truncated or modified)")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        raise SeqgenError(f"{path}: checkpoint payload cannot be read safely ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(payload, dict):
        raise SeqgenError(f"{path}: the checkpoint's payload is a {type(payload).__name__}, not the mapping seqgen "
                          f"writes (not a seqgen model, or modified)")
    return payload


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
