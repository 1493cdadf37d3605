"""Padding and length-bucketed batches under a token budget.

Randomness comes only from a `torch.Generator` seeded by (seed, epoch), so the batches of an epoch are a pure
function of those two numbers: resuming needs only (epoch, batch index), no RNG state in the checkpoint.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor


def pad_sequences(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Right-pad sequences of ids to the longest one.

    Returns ids [B, T] (int64, T = longest length, pad after each sequence) and lengths [B] (int64, CPU).
    """
    if len(seqs) == 0:
        raise ValueError("pad_sequences needs at least one sequence")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, lengths


def shard_positions(num_batches: int, rank: int, world: int, *, start: int = 0, group: int | None = None) -> range:
    """Positions in an epoch's batch list that process `rank` of `world` trains on, from position `start`.

    One optimizer step consumes `group` consecutive batches (default: one per process; world x accumulate
    with gradient accumulation), of which process r takes every world-th from the step's first position + r.
    Only whole steps are handed out: the remainder of the epoch (fewer than `group` batches) is dropped, so
    every process gets the same count (a process with fewer steps would leave the others waiting in
    all-reduce). Returns a range to slice the list with, e.g. batches[p.start:p.stop:p.step].
    """
    group = world if group is None else group
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank} world={world}")
    if group < world or group % world:
        raise ValueError(f"a step's batches ({group}) must be a multiple of the processes ({world})")
    usable = start + max(0, num_batches - start) // group * group
    return range(start + rank, max(usable, start + rank), world)


def _epoch_seed(seed: int, epoch: int) -> int:
    # One generator seed per (seed, epoch); the odd multiplier keeps (s, e) and (s + 1, e - k) apart.
    return (seed * 0x9E3779B97F4A7C15 + epoch) % (1 << 63)


class BucketBatchSampler:
    """Length-bucketed batches under a token budget; deterministic for (seed, epoch); resumable.

    lengths: cost of each example in tokens (e.g. max(src_len, tgt_len)).  Exactly one of
    max_tokens: a batch's padded size, n_examples * longest, stays <= max_tokens (an example longer than the
                budget becomes a batch of its own), or
    batch_size: a fixed number of examples per batch (the last batch of a bucket may be smaller).
    Bucketing: shuffle all examples (when shuffle), sort chunks of bucket_factor * estimated batch size by
    length, cut each chunk into batches, then shuffle the order of the batches (when shuffle).  With
    shuffle=False the examples keep their order between chunks and are sorted by length inside a chunk
    (the order for inference; put outputs back with the indices).

    Use `batches(epoch)` directly, or as a DataLoader `batch_sampler` with `set_epoch(epoch)` before each epoch.
    """

    def __init__(self, lengths: Sequence[int] | Tensor, *, max_tokens: int | None = None,
                 batch_size: int | None = None, shuffle: bool = True, seed: int = 0, bucket_factor: int = 100):
        """lengths: a sequence of ints, or one array/tensor [N] (kept as one int32 tensor, no Python int each)."""
        if (max_tokens is None) == (batch_size is None):
            raise ValueError("give exactly one of max_tokens and batch_size")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_factor < 1:
            raise ValueError(f"bucket_factor must be >= 1, got {bucket_factor}")
        array = isinstance(lengths, Tensor) or hasattr(lengths, "__array__")
        # int32: 4 bytes per example instead of 8, and the plan's indices are int32 too (the same permutation
        # as int64 from the same generator): per-example arrays are what grows with a corpus of millions
        self.lengths = torch.as_tensor(lengths if array else list(lengths), dtype=torch.int32)
        if self.lengths.dim() != 1:
            raise ValueError("lengths must be a flat sequence of ints")
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.bucket_factor = bucket_factor
        self.epoch = 0
        self._cache: tuple[int, Tensor, Tensor] | None = None

    def _estimated_batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        mean = float(self.lengths.float().mean()) if len(self.lengths) else 1.0
        return max(1, int(self.max_tokens / max(mean, 1.0)))

    def _cut(self, lens: list[int]) -> list[int]:
        """Sizes of the batches one chunk, sorted by ascending length, is cut into."""
        m = len(lens)
        if self.batch_size is not None:
            return [min(self.batch_size, m - i) for i in range(0, m, self.batch_size)]
        sizes: list[int] = []
        start = 0
        while start < m:
            # The batch grows while (count + 1) * newcomer <= budget (sorted ascending, so the newcomer is the
            # longest); that product only grows along the chunk, so its end is found by bisection.
            lo, hi = start + 1, m          # the first position that does not fit is in [lo, hi]
            while lo < hi:
                mid = (lo + hi) // 2
                if (mid - start + 1) * lens[mid] > self.max_tokens:
                    hi = mid
                else:
                    lo = mid + 1
            sizes.append(lo - start)
            start = lo
        return sizes

    def plan(self, epoch: int) -> tuple[Tensor, Tensor]:
        """The batches of `epoch` as two tensors: example indices [N] in batch order and bounds [num_batches + 1]
        (batch b is indices[bounds[b]:bounds[b + 1]]); the same (seed, epoch) gives the same plan. Memory is
        two tensors (int32 indices below 2**31 examples, int64 bounds), not a Python list per batch."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        self._cache = None              # the previous epoch's plan goes before this one is made
        n = len(self.lengths)
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        index = torch.int32 if n < 2 ** 31 else torch.long
        order = torch.randperm(n, generator=g, dtype=index) if self.shuffle else torch.arange(n, dtype=index)
        chunk = self.bucket_factor * self._estimated_batch_size()
        # Memory: a few arrays of 4 bytes per example at a time (a corpus of millions is planned on top of a
        # resumed model and its optimizer state, so what this allocates adds to the run's peak).
        flat = torch.empty(n, dtype=index)
        sizes: list[int] = []
        for start in range(0, n, chunk):
            idx = order[start: start + chunk]
            # Stable sort: equal lengths keep their shuffled order, so ties differ between epochs too.
            lens, perm = torch.sort(self.lengths[idx], stable=True)
            flat[start: start + len(idx)] = idx[perm]
            sizes.extend(self._cut(lens.tolist()))
        del order
        size = torch.tensor(sizes, dtype=torch.long)
        if self.shuffle and len(sizes):
            new_order = torch.randperm(len(sizes), generator=g)
            # batch new_order[j] goes to position j, its examples keep their order: gather each batch's segment
            starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(size, 0)[:-1]])
            size = size[new_order]
            new_starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(size, 0)[:-1]])
            gather = torch.repeat_interleave((starts[new_order] - new_starts).to(index), size)
            gather += torch.arange(n, dtype=index)
            flat = flat[gather]
            del gather
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(size, 0)])
        self._cache = (epoch, flat, bounds)
        return flat, bounds

    def num_batches(self, epoch: int) -> int:
        """Batches in `epoch`."""
        return len(self.plan(epoch)[1]) - 1

    def batch(self, epoch: int, b: int) -> Tensor:
        """Example indices [n] of batch `b` of `epoch`."""
        flat, bounds = self.plan(epoch)
        return flat[int(bounds[b]):int(bounds[b + 1])]

    def batches(self, epoch: int) -> list[list[int]]:
        """Indices of the examples in each batch of `epoch` as lists (`plan` holds the same in two tensors)."""
        flat, bounds = self.plan(epoch)
        flat, bounds = flat.tolist(), bounds.tolist()
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
        """Every `world`-th batch starting at `rank`, for data-parallel training (see `shard_positions`)."""
        return [batches[i] for i in shard_positions(len(batches), rank, world)]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that `__iter__` and `__len__` refer to."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        """Batches in the current epoch (with max_tokens the count can differ by a few between epochs)."""
        return self.num_batches(self.epoch)
