"""Parallel corpora for translation: two aligned text files or one TSV, length filtering, and the bucketed
batches training reads (`ParallelBatches`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from seqgen.data.batch import Batch
from seqgen.data.batching import BucketBatchSampler

from seqgen.data.text import read_lines
from seqgen.data.token_lists import TokenLists
from seqgen.errors import SeqgenError


@dataclass
class ParallelCorpus:
    """Aligned sentence pairs, stripped of surrounding whitespace; src[i] translates to tgt[i].

    skipped_empty: pairs dropped because one side was empty or whitespace only (the caller warns).
    """

    src: list[str]
    tgt: list[str]
    skipped_empty: int = 0

    def __len__(self) -> int:
        return len(self.src)


def pairs(src_lines: list[str], tgt_lines: list[str]) -> ParallelCorpus:
    """The pairs of two aligned line lists, stripped; pairs with an empty side are skipped and counted."""
    src, tgt, skipped = [], [], 0
    for s, t in zip(src_lines, tgt_lines):
        s, t = s.strip(), t.strip()
        if not s or not t:
            skipped += 1
            continue
        src.append(s)
        tgt.append(t)
    return ParallelCorpus(src=src, tgt=tgt, skipped_empty=skipped)


def read_parallel(src_path: str | os.PathLike, tgt_path: str | os.PathLike) -> ParallelCorpus:
    """Read two files aligned line by line (UTF-8, a BOM and CRLF line ends are accepted).

    Raises SeqgenError when a file cannot be read, is empty, holds invalid UTF-8 (file:line:col), or when
    the line counts differ (both files and both counts named).
    """
    src_path, tgt_path = os.fspath(src_path), os.fspath(tgt_path)
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise SeqgenError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)} "
                          f"— the files must be aligned line by line")
    return pairs(src_lines, tgt_lines)


def read_tsv(path: str | os.PathLike) -> ParallelCorpus:
    """Read `source<TAB>target` per line (no header row).

    Blank lines and pairs with an empty side are skipped and counted; a non-blank line without exactly one
    tab raises SeqgenError naming path:line.
    """
    path = os.fspath(path)
    src_lines, tgt_lines = split_tsv(read_lines(path), path)
    return pairs(src_lines, tgt_lines)


def split_tsv(lines: list[str], path: str, first_line: int = 1) -> tuple[list[str], list[str]]:
    """The source and target sides of TSV lines (a blank line: two empty sides); SeqgenError naming path:line
    for a non-blank line without exactly one tab. first_line: the line number of lines[0] in `path`."""
    src_lines, tgt_lines = [], []
    for lineno, line in enumerate(lines, start=first_line):
        if not line.strip():
            src_lines.append("")
            tgt_lines.append("")
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise SeqgenError(f"{path}:{lineno}: expected 'source<TAB>target' with exactly one tab, "
                              f"found {len(parts) - 1}")
        src_lines.append(parts[0])
        tgt_lines.append(parts[1])
    return src_lines, tgt_lines


def filter_by_length(src_ids: list[list[int]], tgt_ids: list[list[int]], max_len: int) -> tuple[list[int], int]:
    """Indices of the pairs whose source and target both have <= max_len tokens, and how many were dropped."""
    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
    if max_len < 1:
        raise SeqgenError(f"max length must be >= 1, got {max_len}")
    keep = [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids)) if len(s) <= max_len and len(t) <= max_len]
    return keep, len(src_ids) - len(keep)


# Batches between releases of the memory-mapped corpus pages they read (TokenLists.release_pages). Every page
# fault on a mapped file also maps the cached pages around it (the kernel's fault-around; madvise(MADV_RANDOM)
# does not stop it), so a batch of random pairs makes far more resident than it reads, and a run would count
# most of the cache in its RSS within a few dozen steps: release after every batch (re-faulting costs about a
# millisecond a batch, docs/performance.md).
RELEASE_EVERY = 1


class ParallelBatches:
    """Bucketed batches of (source [B, S] + lengths, target [B, T+1] `bos ... eos`); a `BatchSource`.

    src, tgt: token lists (Python lists, or `TokenLists`, e.g. memory-mapped from a prepared-data cache), the
    source as the encoder reads it, the target without <bos>/<eos>. src_eos: append <eos> to every source (the
    cache stores sources without it). Deterministic for (seed, epoch), so a resumed run sees the same batches
    from the same position; the batches of an epoch are two tensors (`BucketBatchSampler.plan`), not a Python
    list per sentence.
    """

    def __init__(self, src_ids: Sequence[Sequence[int]] | TokenLists, tgt_ids: Sequence[Sequence[int]] | TokenLists,
                 *, pad: int, bos: int, eos: int, max_tokens: int = 0, batch_size: int = 64, seed: int = 0,
                 shuffle: bool = True, src_eos: bool = False):
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
        self.src = src_ids if isinstance(src_ids, TokenLists) else TokenLists.from_lists(src_ids)
        self.tgt = tgt_ids if isinstance(tgt_ids, TokenLists) else TokenLists.from_lists(tgt_ids)
        self.pad, self.bos, self.eos, self.src_eos = pad, bos, eos, src_eos
        src_len = self.src.lengths() + np.int32(src_eos)          # [N] int32 tokens the encoder reads
        tgt_len = self.tgt.lengths()                              # [N] int32 target tokens without <bos>/<eos>
        self.src_tokens = int(src_len.sum(dtype=np.int64))        # totals for logs; the per-pair arrays are
        self.tgt_tokens = int(tgt_len.sum(dtype=np.int64))        # not kept (only the sampler's cost is)
        # a batch's cost: its padded source or its target input/output (length + 1), whichever is longer
        cost = np.maximum(src_len, tgt_len + 1)
        del src_len, tgt_len
        self.sampler = BucketBatchSampler(cost, max_tokens=max_tokens or None,
                                          batch_size=None if max_tokens else batch_size,
                                          shuffle=shuffle, seed=seed)

    def __len__(self) -> int:
        return len(self.src)

    def num_batches(self, epoch: int) -> int:
        return self.sampler.num_batches(epoch)

    def make_batch(self, idx: Sequence[int] | torch.Tensor) -> Batch:
        source, lengths = self.src.padded(idx, self.pad, suffix=self.eos if self.src_eos else None)
        target, _ = self.tgt.padded(idx, self.pad, prefix=self.bos, suffix=self.eos)
        return Batch(target=target, source=source, source_lengths=lengths,
                     index=torch.as_tensor(idx, dtype=torch.long))

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[Batch]:
        """Batches [start:stop:step] of the epoch's list (a process's share under data parallelism)."""
        for i, b in enumerate(range(self.num_batches(epoch))[start:stop:step]):
            if i % RELEASE_EVERY == RELEASE_EVERY - 1:
                self.src.release_pages()
                self.tgt.release_pages()
            yield self.make_batch(self.sampler.batch(epoch, b))
