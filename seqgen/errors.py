"""The one exception type users see, and the translation of out-of-memory errors into it.

Library code raises `SeqgenError` with a message a user can act on (file, line, numbers, what to do);
the CLI prints it as one line `seqgen: error: ...` and exits with status 2. Tracebacks only with --debug.
A value the user gave appears in a message through `cut_repr` (bounded, whatever the value); SIGTERM stops a
command as Ctrl-C does (`Terminated`, `sigterm_interrupts`).
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The characters that end a line for str.splitlines() and Python's universal newlines (and most terminals):
# escaped in error messages so that they stay one line, replaced in one-line-per-item outputs.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"

# How the CPU allocator words a failed allocation (Linux/macOS, Windows): a RuntimeError, not torch.OutOfMemoryError.
_CPU_OOM_MESSAGES = ("can't allocate memory", "not enough memory")


class SeqgenError(Exception):
    """A user-facing error: the message is one line naming the file/argument and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (inside `sigterm_interrupts`), raised wherever the program is, as Ctrl-C raises KeyboardInterrupt:
    the same clean-up runs and the CLI says how to continue."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in this process (from the main thread only; processes forked
    inside, such as DataLoader workers, die of it as before)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class OutOfMemory(SeqgenError):
    """A batch did not fit in memory; the message names the batch and the setting to lower."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch.OutOfMemoryError (CUDA, MPS), the CPU allocator's RuntimeError and MemoryError."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(error, (oom, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _CPU_OOM_MESSAGES)


@contextmanager
def report_out_of_memory(doing: str, advice: str) -> Iterator[None]:
    """Turn running out of memory inside the block into one `OutOfMemory` line: "out of memory {doing}; {advice}".

    doing: the batch, e.g. "at step 12 on a batch of 64 sequences x 257 tokens"; advice: the setting to lower.
    When blocks nest, the outermost message wins: the caller that chose the batch size knows the flag's name
    (the trainer's validation calls the same decoding loop as `seqgen translate`, with another flag).
    """
    try:
        yield
    except Exception as e:
        if not (isinstance(e, OutOfMemory) or is_out_of_memory(e)):
            raise
        raise OutOfMemory(f"out of memory {doing}; {advice}") from e   # --debug shows where


def cut_repr(value: object, limit: int = 80) -> str:
    """`repr(value)` for a message about user input: at most about `limit` characters, and when cut, how long
    the whole was ("'aaaa...' (1,000,000 characters)", "[1, 2, ...] (a list of 500 item(s))").

    Never builds the full repr: a YAML alias bomb or a crafted checkpoint can hold a value whose repr is
    gigabytes long, nested deeper than the recursion limit, or an integer too long to print.
    """
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits"
    if isinstance(value, (str, bytes, bytearray)):
        if len(value) <= limit:
            return repr(value)
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{repr(value[:limit])[:limit + 3]}... ({len(value):,} {unit})"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, limit // 2, limit // 2, 40
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = short.maxfrozenset = 6
    try:
        text = short.repr(value)
    except Exception:   # a __repr__ that fails
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    try:
        size = len(value)  # type: ignore[arg-type]
    except Exception:
        return text
    if "..." in text:
        what = {dict: "a mapping of {} key(s)", list: "a list of {} item(s)", tuple: "a tuple of {} item(s)"}.get(
            type(value), "{} item(s)")
        text += f" ({what.format(f'{size:,}')})"
    return text
