"""Reading user text files with errors a user can act on, and language-model corpora.

Every reader checks the things that go wrong in practice (missing file, a directory, no permission,
invalid UTF-8, empty file) and raises `SeqgenError` naming the file and, where it applies, the line.
Reading is bounded: a file or stream that never ends (`/dev/zero`, `yes |`) stops at MAX_FILE_BYTES, and a
line-per-item file at a line longer than MAX_LINE_BYTES, with one line naming the limit (and the line).
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
from typing import BinaryIO, Iterator

import numpy as np
import torch
from torch import Tensor

from seqgen.data.batch import Batch
from seqgen.data.token_lists import release_pages
from seqgen.errors import SeqgenError

MAX_FILE_BYTES = 2 << 30     # the most seqgen reads whole from one file or stream: 2 GiB
MAX_LINE_BYTES = 16 << 20    # the longest line of a one-item-per-line file (sentences, captions, splits): 16 MiB
_CHUNK = 1 << 20


def human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:,} bytes"


def long_line_error(name: str, lineno: int, line_limit: int = MAX_LINE_BYTES) -> SeqgenError:
    """The error for line `lineno` of `name` being longer than `line_limit` bytes."""
    return SeqgenError(f"{name}:{lineno}: a line longer than {human_size(line_limit)}, the longest line seqgen "
                       f"reads; is this a text file with one item per line?")


def read_stream(f: BinaryIO, name: str, *, limit: int | None = None, what: str = "one file",
                line_limit: int | None = None) -> bytes:
    """Read a binary stream to its end, in chunks, refusing more than `limit` bytes (default MAX_FILE_BYTES)
    and, with `line_limit`, a line longer than that: SeqgenError naming `name` (and the line)."""
    limit = MAX_FILE_BYTES if limit is None else limit
    chunk_size = min(_CHUNK, line_limit) if line_limit else _CHUNK   # a line inside one chunk is short enough
    buf, size, lines, run = io.BytesIO(), 0, 0, 0     # run: bytes of the current line so far
    try:
        while chunk := f.read(chunk_size):
            size += len(chunk)
            if size > limit:
                raise SeqgenError(f"{name}: larger than {human_size(limit)}, the most seqgen reads from {what}; "
                                  f"split it into smaller parts")
            if line_limit is not None:
                first = chunk.find(b"\n")
                if first >= 0 and run + first <= line_limit:
                    lines += chunk.count(b"\n")
                    run = len(chunk) - chunk.rfind(b"\n") - 1
                else:
                    run += len(chunk) if first < 0 else first
                if run > line_limit:
                    raise long_line_error(name, lines + 1, line_limit)
            buf.write(chunk)
    except MemoryError:
        raise SeqgenError(f"{name}: not enough memory to read it (after {size:,} bytes)") from None
    return buf.getvalue()


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """Open `path` for reading bytes, or raise SeqgenError saying why it cannot be read."""
    path = os.fspath(path)
    # Open first and read the reason from the error: checking os.path.exists() beforehand would call a file
    # behind an unreadable folder "missing" (exists() is False whenever stat fails).
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise SeqgenError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SeqgenError(f"{path}: is a directory, expected a text file") from None
    except PermissionError:
        if os.path.isdir(path):  # Windows refuses to open a folder with PermissionError
            raise SeqgenError(f"{path}: is a directory, expected a text file") from None
        raise SeqgenError(f"{path}: permission denied; make the file readable") from None
    except OSError as e:
        raise SeqgenError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError:  # a NUL character in the path
        raise SeqgenError(f"{path!r}: not a valid file name") from None


def read_bytes(path: str | os.PathLike, *, limit: int | None = None, what: str = "one file",
               line_limit: int | None = None) -> bytes:
    """Return the raw content of `path`, or raise SeqgenError saying why it cannot be read (limits: see
    `read_stream`)."""
    path = os.fspath(path)
    with open_binary(path) as f:
        try:
            return read_stream(f, path, limit=limit, what=what, line_limit=line_limit)
        except IsADirectoryError:
            raise SeqgenError(f"{path}: is a directory, expected a text file") from None
        except OSError as e:
            raise SeqgenError(f"{path}: cannot read ({e.strerror or e})") from None


FULL_HASH_BYTES = 64 << 20   # files up to this size are hashed whole, larger ones by their first and last MiB


def file_digest(path: str) -> dict | None:
    """What identifies a data file: {path, size, mtime, sha256}, the hash over the whole file up to
    FULL_HASH_BYTES, else over its size and its first and last MiB; None when `path` is not a readable regular
    file (its reader says why). One implementation for run fingerprints and prepared-data caches."""
    try:
        st = os.stat(path) if path else None
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if st.st_size <= FULL_HASH_BYTES:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            else:
                h.update(str(st.st_size).encode() + f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    except (OSError, ValueError):
        return None
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime, "sha256": h.hexdigest()}


def decode_utf8(data: bytes, path: str, *, first_line: int = 1) -> str:
    """Decode UTF-8 (a leading BOM is dropped); on failure name the line and column of the bad byte.

    first_line: the line number `data` starts at in `path` (a part of a file read in pieces; a BOM is only
    dropped at line 1)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + first_line
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        utf16 = (", the file looks like UTF-16 (it starts with a UTF-16 byte-order mark)"
                 if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
        raise SeqgenError(f"{path}:{line}:{col}: invalid UTF-8 (byte 0x{data[e.start]:02x}){utf16}; "
                          f"convert the file to UTF-8") from None
    return text[1:] if first_line == 1 and text.startswith("\ufeff") else text


def read_text(path: str | os.PathLike, *, allow_empty: bool = False, limit: int | None = None,
              what: str = "one file", line_limit: int | None = None) -> str:
    """Return the whole file as a str with '\\n' line ends (CRLF is normalised; a lone CR is kept
    because splitting on it would silently misalign parallel files).

    Everything else valid UTF-8 is kept as it is: NUL and other control characters, U+2028, a second BOM.
    Without allow_empty, a file with no characters other than whitespace raises SeqgenError. limit, what,
    line_limit: see `read_stream`.
    """
    path = os.fspath(path)
    data = read_bytes(path, limit=limit, what=what, line_limit=line_limit)
    text = decode_utf8(data, path).replace("\r\n", "\n")
    if not allow_empty and not text.strip():
        raise SeqgenError(f"{path}: file is empty" + (" (only whitespace)" if text else ""))
    return text


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_lines(path: str | os.PathLike, *, allow_empty: bool = False) -> list[str]:
    """Return the lines of a text file without line ends (a final newline does not add an empty line); a
    line longer than MAX_LINE_BYTES is an error naming it."""
    return _split_lines(read_text(path, allow_empty=allow_empty, line_limit=MAX_LINE_BYTES))


def read_stream_lines(f: BinaryIO, name: str = "<stdin>") -> list[str]:
    """The lines of a stream (stdin), as `read_lines` reads a file's (an empty stream has none)."""
    data = read_stream(f, name, what="one input", line_limit=MAX_LINE_BYTES)
    return _split_lines(decode_utf8(data, name).replace("\r\n", "\n"))


class LMBatches:
    """Training windows over a token stream for a language model; a `BatchSource` for the Trainer.

    Each epoch cuts the stream into windows of `seq_len` tokens starting at a random offset, shuffles
    them, and serves `batch_size` windows per batch as targets `[bos, x_i, ..., x_{i+seq_len-1}]`.
    Everything derives from (seed, epoch), so a run resumed at (epoch, batch) sees the same batches.

    ids: [N] the stream, an int64 tensor or a numpy array (the uint16/uint32 memory map of a prepared-data
    cache, seqgen.data.prepared_stream): only each batch's windows are read and widened to int64.
    """

    def __init__(self, ids: Tensor | np.ndarray, *, seq_len: int, batch_size: int, bos: int, seed: int = 0,
                 name: str = "the training text"):
        """name: the text's file, for the error when it is too short."""
        if len(ids) < seq_len + 1:
            raise SeqgenError(f"{name}: {len(ids)} training tokens, fewer than --seq-len {seq_len} + 1; "
                              f"use a longer text or a smaller --seq-len")
        self.ids, self.seq_len, self.batch_size, self.bos, self.seed = ids, seq_len, batch_size, bos, seed

    def _starts(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offset = int(torch.randint(0, self.seq_len, (1,), generator=g))
        n = (len(self.ids) - offset) // self.seq_len
        if n < 1:
            offset, n = 0, 1
        starts = offset + torch.arange(n) * self.seq_len
        return starts[torch.randperm(n, generator=g)]

    def num_batches(self, epoch: int) -> int:
        return -(-len(self._starts(epoch)) // self.batch_size)

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[Batch]:
        """Batches [start:stop:step] of the epoch's list (a process's share under data parallelism)."""
        starts = self._starts(epoch)
        cols = torch.arange(self.seq_len)
        for b in range(-(-len(starts) // self.batch_size))[start:stop:step]:
            s = starts[b * self.batch_size:(b + 1) * self.batch_size]
            pos = s.unsqueeze(1) + cols                                    # [B, seq_len]
            if isinstance(self.ids, np.ndarray):
                windows = torch.from_numpy(self.ids[pos.numpy()].astype(np.int64))
                release_pages(self.ids)      # what this batch mapped leaves the RSS (see seqgen.data.parallel)
            else:
                windows = self.ids[pos]
            bos = torch.full((len(s), 1), self.bos, dtype=torch.long)
            yield Batch(target=torch.cat([bos, windows], dim=1))
