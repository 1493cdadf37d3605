"""Atomic file writes: a temp file in the target's folder, fsync, then a rename over the target.

A crash, a kill or a full disk at any moment leaves either the old file or the new one, never a mix. A kill
leaves at most a temp file `.tmp-NAME-XXXX` next to NAME (named after its target, so that a later run finds
it, and not ending like the target, so that it is never taken for one); `remove_partial_writes` deletes them.

Every file seqgen writes whole goes through `atomic_write`: checkpoints, translations, merged caption files,
feature caches and their index, `seqgen bench --json`, the metrics log when a resumed run cuts it back, the
shipped models' models.json. Files that grow (caption records, metrics lines) are appended and flushed instead.
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import IO, Any, Callable


def temp_prefix(path: str) -> str:
    """".tmp-last.pt-": the prefix of the temp files written on the way to `path`."""
    return f".tmp-{os.path.basename(path)}-"


def fsync_dir(folder: str) -> None:
    """Make a rename inside `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[Any]], object], *, mode: str = "wb", encoding: str | None = None,
                 errors: str | None = None, newline: str | None = None) -> None:
    """Create or replace `path` with what `write(f)` writes to `f`, a new file opened with `mode` (and
    `encoding`, `errors`, `newline` for text) in the same folder; the folder is created if needed.

    On any failure, OSError included, the temp file is removed and `path` is left as it was; the exception
    propagates (callers turn an OSError into their one-line SeqgenError).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=folder)
    try:
        with open(fd, mode, encoding=encoding, errors=errors, newline=newline) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_partial_writes(path: str) -> list[str]:
    """Delete the temp files a process killed while writing `path` left next to it; returns their paths.

    Only for a folder no other process is writing to (a run folder, when its run starts).
    """
    folder = os.path.dirname(os.path.abspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), glob.escape(temp_prefix(path)) + "*")):
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed
