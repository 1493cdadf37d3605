"""Many token-id lists as one flat array plus offsets: what a corpus holds in memory (or memory-mapped from a
prepared-data cache) instead of a Python list per sentence.

    lists = TokenLists.from_lists([[5, 6], [7]])       # ids [5, 6, 7], offsets [0, 2, 3]
    lists[0] == [5, 6]; lists.lengths() -> [2, 1]; lists.padded([1, 0], pad=0) -> ids [2, 2], lengths [2]
"""
from __future__ import annotations

import mmap
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


_CHUNK = 1 << 20          # lists per step of `lengths`


def release_pages(array: np.ndarray) -> None:
    """Drop this process's resident pages of a read-only memory-mapped array (np.memmap, or a view of one).

    The pages stay in the kernel's page cache, so touching them again is a cheap minor fault, but they stop
    counting in the process's RSS: a run that reads through a prepared-data cache of any size keeps its resident
    memory at what it is using now, not at all it has read. Does nothing for an array in ordinary memory.
    """
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(base, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            base.madvise(mmap.MADV_DONTNEED)     # a shared read-only mapping: nothing is lost, only unmapped
        except (OSError, ValueError):
            pass


class TokenLists:
    """Token lists: list i is ids[offsets[rows[i]]:offsets[rows[i] + 1]].

    ids: [total] any integer dtype (uint16/uint32 on disk), offsets: [M + 1] int64 ascending from 0,
    rows: [N] int32 or int64, the lists in view (None: all M); `take` selects rows without copying any token.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray | None = None):
        if offsets.ndim != 1 or len(offsets) < 1 or ids.ndim != 1:
            raise ValueError("TokenLists needs flat ids and offsets [M + 1]")
        self.ids, self.offsets, self.rows = ids, offsets, rows

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> TokenLists:
        """Token lists from Python lists (small corpora: validation sets, tests)."""
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for x in lists for t in x), dtype=np.int64, count=int(offsets[-1]))
        return cls(ids, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.rows is None else len(self.rows)

    def _starts_ends(self, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows if idx is None else (idx if self.rows is None else self.rows[idx])
        if rows is None:
            return self.offsets[:-1], self.offsets[1:]
        return self.offsets[rows], self.offsets[rows + 1]

    def lengths(self) -> np.ndarray:
        """Tokens per list [N] int32 (4 bytes a list: a corpus of 10M pairs holds its lengths in 40 MB each side).

        Read in chunks, so no int64 array of the whole corpus is made; memory-mapped offsets read through here
        are then released from this process's resident memory (`release_pages`)."""
        n = len(self)
        out = np.empty(n, dtype=np.int32)
        for a in range(0, n, _CHUNK):
            starts, ends = self._starts_ends(np.arange(a, min(n, a + _CHUNK), dtype=np.int64))
            out[a:a + len(starts)] = ends - starts
        release_pages(self.offsets)
        return out

    def release_pages(self) -> None:
        """Release the resident pages of memory-mapped ids and offsets (see `release_pages`)."""
        release_pages(self.ids)
        release_pages(self.offsets)

    def __getitem__(self, i: int) -> list[int]:
        start, end = self._starts_ends(np.asarray([i], dtype=np.int64))
        return self.ids[int(start[0]):int(end[0])].tolist()

    def take(self, rows: np.ndarray) -> TokenLists:
        """The lists at positions `rows` [K] (int64), as a view: no token is copied."""
        rows = np.asarray(rows)
        if rows.dtype not in (np.int32, np.int64):
            rows = rows.astype(np.int64)
        return TokenLists(self.ids, self.offsets, rows if self.rows is None else self.rows[rows])

    def padded(self, idx: Sequence[int] | Tensor, pad: int, *, prefix: int | None = None,
               suffix: int | None = None) -> tuple[Tensor, Tensor]:
        """Lists `idx` right-padded into one tensor, optionally with `prefix` before and `suffix` after each.

        Returns ids [B, T] int64 (T = the longest list with its prefix/suffix) and lengths [B] int64, as
        `seqgen.data.batching.pad_sequences` returns for the same lists.
        """
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            raise ValueError("padded needs at least one list")
        starts, ends = self._starts_ends(idx)
        lens = ends - starts
        first = 0 if prefix is None else 1
        total = lens + first + (0 if suffix is None else 1)
        width = int(total.max())
        cols = np.arange(width - first - (0 if suffix is None else 1), dtype=np.int64)
        inside = cols[None, :] < lens[:, None]                          # [B, T'] True over real tokens
        pos = np.where(inside, starts[:, None] + cols[None, :], 0)
        body = np.where(inside, self.ids[pos] if len(self.ids) else 0, pad).astype(np.int64)
        out = np.full((len(idx), width), pad, dtype=np.int64)
        out[:, first:first + body.shape[1]] = body
        if prefix is not None:
            out[:, 0] = prefix
        if suffix is not None:
            out[np.arange(len(idx)), lens + first] = suffix
        return torch.from_numpy(out), torch.from_numpy(np.asarray(total, dtype=np.int64))
