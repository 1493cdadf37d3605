"""The language-model kind of the prepared-data cache: one text's training and validation parts tokenized once
(on every core) into two flat token-id streams, memory-mapped by every later run, --resume included.

One cache is a folder PREPARED_DIR/stream-KEY, KEY a digest of the format version, the text file (size, mtime,
sha256 as seqgen.data.text.file_digest takes it), the validation fraction and the codec. It holds

    train.ids     the ids of the training part (the first 1 - valid_fraction of the characters, `split_text`),
                  exactly codec.encode(train_text): uint16 when the vocabulary has at most 65,536 ids, else uint32
    valid.ids     the same for the held-out rest
    header.json   version, key, inputs, valid_fraction, characters and tokens of each part, dtype, and the
                  size and sha256 of both files

It is written, checked and rebuilt as every kind is (seqgen.data.prepared): a temporary folder
`.tmp-stream-PID-XXXX` renamed into place, a corrupt file rebuilt, never trusted.

Tokenizing in pieces on several processes gives exactly codec.encode(text) because a piece ends only where no
token can span the cut and no token depends on the text across it:
- char: anywhere (one token per code point);
- word and subword: right after a "\\n". In both "\\n" is a token of its own; a word token never spans a line
  break and a space is folded only into the next token of its line; sentencepiece encodes each line alone.
A word/subword text with few line breaks gives fewer, larger pieces (one line: one process).

Building reads the whole text in memory (as read_text reads any text, at most 2 GiB); opening reads nothing
but the arrays' checksums, so a later run on the same text and vocabulary starts without tokenizing.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from seqgen.data.line_chunks import default_workers, map_tasks
from seqgen.data.prepared import (FORMAT_VERSION, ArrayWriter, build_folder, codec_digest, ids_dtype, open_arrays,
                                  open_existing, read_header)
from seqgen.data.text import file_digest, read_text
from seqgen.errors import SeqgenError
from seqgen.tokenizers import TextCodec

PIECE_CHARS = 4 << 20    # characters per task: enough work to pay for sending it to a worker
_PARTS = ("train", "valid")


def split_text(text: str, valid_fraction: float) -> tuple[str, str]:
    """First (1 - valid_fraction) of the characters for training, the rest for validation."""
    if not 0.0 <= valid_fraction < 1.0:
        raise SeqgenError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    cut = int(len(text) * (1.0 - valid_fraction))
    return text[:cut], text[cut:]


def text_pieces(text: str, level: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of about `size` characters whose encodings, joined, are the encoding of
    `text` (see the module docstring): char pieces are cut anywhere, word/subword pieces right after a "\\n"."""
    pos = 0
    while pos < len(text):
        end = pos + size
        if level != "char" and end < len(text):
            cut = text.find("\n", end - 1)
            end = len(text) if cut < 0 else cut + 1
        yield text[pos:end]
        pos = end


@dataclass
class PreparedStream:
    """An open stream cache: train, valid [N] uint16/uint32 read-only memory maps, and the header."""

    folder: str
    header: dict
    train: np.ndarray
    valid: np.ndarray


def text_inputs(path: str) -> dict[str, dict]:
    """{path: file_digest}; the reader's SeqgenError when `path` cannot be read."""
    digest = file_digest(path)
    if digest is None:
        read_text(path)            # says why (missing, a folder, no permission)
        raise SeqgenError(f"{path}: not a readable regular file")
    return {path: digest}


def stream_key(inputs: dict[str, dict], valid_fraction: float, codec: TextCodec) -> str:
    """The digest naming the stream cache of this text, split and codec (see the module docstring)."""
    files = [[d["size"], d["mtime"], d["sha256"]] for d in inputs.values()]
    text = json.dumps({"version": FORMAT_VERSION, "kind": "stream", "files": files,
                       "valid_fraction": valid_fraction, "codec": codec_digest(codec)})
    return hashlib.sha256(text.encode()).hexdigest()


def open_stream(folder: str, key: str) -> PreparedStream:
    """Open the stream cache in `folder` made for `key`; SeqgenError saying why it cannot be trusted."""
    header = read_header(folder, key)
    arrays = open_arrays(folder, header)
    try:
        consistent = all(len(arrays[f"{p}.ids"]) == header["tokens"][p] for p in _PARTS)
    except (KeyError, TypeError) as e:
        raise SeqgenError(f"{folder}: an incomplete or corrupt cache ({e})") from None
    if not consistent:
        raise SeqgenError(f"{folder}: its arrays do not match the counts in header.json (a corrupt cache)")
    return PreparedStream(folder, header, arrays["train.ids"], arrays["valid.ids"])


def _write_stream(tmp: str, parts: dict[str, str], codec: TextCodec, workers: int, piece_chars: int) -> dict:
    """Tokenize `parts` ({"train": text, "valid": text}) into the array files of `tmp`; returns the header's
    counts and files."""
    dtype = ids_dtype(len(codec.vocab))
    order: deque = deque()        # the part of each piece handed out, in order

    def tasks() -> Iterator[str]:
        for name, text in parts.items():
            for piece in text_pieces(text, codec.level, piece_chars):
                order.append(name)
                yield piece

    out = ArrayWriter(tmp, [f"{p}.ids" for p in _PARTS])
    tokens = dict.fromkeys(_PARTS, 0)
    try:
        for ids in map_tasks(tasks(), {"kind": "stream", "codec": codec.to_dict()}, workers=workers):
            name = order.popleft()
            out.put(f"{name}.ids", ids.astype(dtype))
            tokens[name] += len(ids)
        files = out.finish()
    finally:
        out.close()
    return {"dtype": np.dtype(dtype).name, "characters": {p: len(t) for p, t in parts.items()},
            "tokens": tokens, "files": files}


def prepare_stream(path: str, codec: TextCodec, valid_fraction: float, prepared_dir: str, *,
                   workers: int | None = None, piece_chars: int = PIECE_CHARS,
                   log: Callable[[str], None] = lambda line: None) -> PreparedStream:
    """The stream cache of the text `path` split by `valid_fraction` and tokenized by `codec`, in
    `prepared_dir`: opened when one matches, else built with `workers` processes (default every core) over
    pieces of about `piece_chars` characters. `log` gets a line when a cache is built or found corrupt.

    SeqgenError (one line) when the text cannot be read (as read_text says it), changes while it is being
    prepared, or when `prepared_dir` cannot be written (read-only, full).
    """
    inputs = text_inputs(path)
    key = stream_key(inputs, valid_fraction, codec)
    folder = os.path.join(prepared_dir, f"stream-{key[:24]}")
    found = open_existing(folder, lambda: open_stream(folder, key), path, log)
    if found is not None:
        return found
    t0 = time.perf_counter()
    workers = default_workers() if workers is None else workers

    def write(tmp: str) -> dict:           # the text lives while it is tokenized, no longer
        nonlocal workers
        train_text, valid_text = split_text(read_text(path), valid_fraction)
        if len(train_text) + len(valid_text) <= 2 * piece_chars:
            workers = 1                    # starting a pool costs more than a few pieces take
        return _write_stream(tmp, {"train": train_text, "valid": valid_text}, codec, workers, piece_chars)

    build_folder(prepared_dir, folder, "stream", {"key": key, "inputs": inputs, "valid_fraction": valid_fraction},
                 write)
    stream = open_stream(folder, key)
    log(f"{path}: tokenized {len(stream.train):,} training and {len(stream.valid):,} validation tokens into "
        f"{folder} in {time.perf_counter() - t0:.1f}s ({workers} process(es))")
    return stream


__all__ = ["PreparedStream", "open_stream", "prepare_stream", "split_text", "stream_key", "text_inputs",
           "text_pieces"]
