"""The one exception type users see, and the translation of out-of-memory errors into it.

Library code raises `SeqgenError` with a message a user can act on (file, line, numbers, what to do);
the CLI prints it as one line `seqgen: error: ...` and exits with status 2. Tracebacks only with --debug.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# The characters that end a line for str.splitlines() and Python's universal newlines (and most terminals):
# escaped in error messages so that they stay one line, replaced in one-line-per-item outputs.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"

# How the CPU allocator words a failed allocation (Linux/macOS, Windows): a RuntimeError, not torch.OutOfMemoryError.
_CPU_OOM_MESSAGES = ("can't allocate memory", "not enough memory")


class SeqgenError(Exception):
    """A user-facing error: the message is one line naming the file/argument and what to do."""


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
