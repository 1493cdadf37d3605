"""pad_sequences and BucketBatchSampler: coverage, budget, determinism, sharding."""
import random

import pytest
import torch

from seqgen.data.batching import BucketBatchSampler, pad_sequences


def random_lengths(n=1000, seed=0, lo=1, hi=50):
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def flat(batches):
    return sorted(i for b in batches for i in b)


def test_pad_sequences():
    ids, lens = pad_sequences([[3, 4, 5], [6], [7, 8]], pad=0)
    assert ids.dtype == lens.dtype == torch.long
    assert ids.tolist() == [[3, 4, 5], [6, 0, 0], [7, 8, 0]]
    assert lens.tolist() == [3, 1, 2]
    ids, lens = pad_sequences([[], [1]], pad=9)
    assert ids.tolist() == [[9], [1]] and lens.tolist() == [0, 1]
    with pytest.raises(ValueError):
        pad_sequences([], pad=0)


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_once_and_budget(shuffle):
    lengths = random_lengths()
    s = BucketBatchSampler(lengths, max_tokens=200, shuffle=shuffle, seed=3, bucket_factor=5)
    for epoch in range(3):
        batches = s.batches(epoch)
        assert flat(batches) == list(range(len(lengths)))
        assert all(len(b) * max(lengths[i] for i in b) <= 200 for b in batches)
        assert all(len(b) > 0 for b in batches)
    assert len(s) == len(s.batches(0))


def test_bucketing_keeps_padding_low():
    lengths = random_lengths(2000)
    batches = BucketBatchSampler(lengths, max_tokens=400, seed=0).batches(0)
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * real


def test_deterministic_per_seed_and_epoch():
    lengths = random_lengths()
    a = BucketBatchSampler(lengths, max_tokens=300, seed=7)
    b = BucketBatchSampler(lengths, max_tokens=300, seed=7)
    assert a.batches(0) == b.batches(0) == a.batches(0)
    assert a.batches(5) == b.batches(5)
    assert a.batches(0) != a.batches(1)
    assert BucketBatchSampler(lengths, max_tokens=300, seed=8).batches(0) != a.batches(0)
    # Independent of what was asked before: a fresh sampler resumes at any epoch.
    assert BucketBatchSampler(lengths, max_tokens=300, seed=7).batches(5) == a.batches(5)
    # The returned list is a copy; mutating it changes nothing.
    got = a.batches(5)
    got[0].append(-1)
    assert a.batches(5) == b.batches(5)


def test_no_shuffle_is_epoch_independent():
    lengths = random_lengths(300)
    s = BucketBatchSampler(lengths, batch_size=16, shuffle=False)
    assert s.batches(0) == s.batches(1)


def test_batch_size_mode():
    lengths = random_lengths(1003)
    s = BucketBatchSampler(lengths, batch_size=32, seed=1, bucket_factor=4)
    batches = s.batches(0)
    assert flat(batches) == list(range(1003))
    assert all(1 <= len(b) <= 32 for b in batches)
    assert sum(len(b) == 32 for b in batches) >= len(batches) - 8   # only each bucket's last is short


def test_long_single_example_gets_own_batch():
    lengths = [3] * 50 + [500] + [4] * 50
    s = BucketBatchSampler(lengths, max_tokens=100, seed=0)
    batches = s.batches(0)
    assert flat(batches) == list(range(101))
    assert [50] in batches
    assert all(len(b) * max(lengths[i] for i in b) <= 100 for b in batches if b != [50])


def test_sharding_partitions_with_equal_counts():
    lengths = random_lengths(777)
    s = BucketBatchSampler(lengths, max_tokens=250, seed=2)
    batches = s.batches(0)
    for world in (1, 2, 3, 4):
        shards = [s.shard(batches, r, world) for r in range(world)]
        assert len({len(x) for x in shards}) == 1
        assert len(shards[0]) == len(batches) // world
        taken = [tuple(b) for x in shards for b in x]
        assert len(taken) == len(set(taken))                           # disjoint
        assert len(taken) == len(batches) - len(batches) % world         # only the remainder dropped
    with pytest.raises(ValueError):
        s.shard(batches, 2, 2)


def test_dataloader_batch_sampler():
    lengths = random_lengths(100)
    s = BucketBatchSampler(lengths, batch_size=8, seed=0)
    s.set_epoch(2)
    loader = torch.utils.data.DataLoader(list(range(100)), batch_sampler=s)
    assert [b.tolist() for b in loader] == s.batches(2)
    assert len(loader) == len(s.batches(2))


def test_bad_arguments():
    with pytest.raises(ValueError):
        BucketBatchSampler([1, 2])
    with pytest.raises(ValueError):
        BucketBatchSampler([1, 2], max_tokens=10, batch_size=2)
    with pytest.raises(ValueError):
        BucketBatchSampler([1, 2], max_tokens=0)


def test_plan_indices_are_int32_and_the_same_permutation_as_int64():
    """The plan keeps 4-byte indices; the permutation is the one torch.randperm gives as int64, so runs (and
    resumes) made before the indices were int32 see the same batches."""
    from seqgen.data.batching import _epoch_seed
    n = 10_000
    sampler = BucketBatchSampler(torch.ones(n, dtype=torch.long), batch_size=1, seed=3, bucket_factor=1)
    flat, bounds = sampler.plan(2)
    assert flat.dtype == torch.int32 and sampler.lengths.dtype == torch.int32
    g = torch.Generator().manual_seed(_epoch_seed(3, 2))
    order = torch.randperm(n, generator=g)
    new_order = torch.randperm(n, generator=g)         # then the batches (here single examples) are shuffled
    assert torch.equal(flat.long(), order[new_order])
