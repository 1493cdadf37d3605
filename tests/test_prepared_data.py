"""The prepared-data cache (seqgen/data/prepared.py): round trip, rebuilds, kills, bad input, and batches equal to
the in-memory pipeline's for the same seed."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from seqgen.data import line_chunks, prepared as prep
from seqgen.data.batching import BucketBatchSampler
from seqgen.data.line_chunks import Sources, count_tokens, sample_pairs
from seqgen.data.prepared import open_prepared, prepare_pairs
from seqgen.data.token_lists import TokenLists
from seqgen.errors import SeqgenError
from seqgen.tasks.translation import (TranslationDataConfig, build_codecs, fit_codecs, prepared_batches, read_corpus,
                                      training_batches)
from seqgen.tokenizers import TextCodec

WORDS = "ein hund läuft im schnee eine frau mit rotem hut zwei kinder spielen am strand der mann".split()


def make_corpus(tmp_path, n=120, seed=0, name="c"):
    r = random.Random(seed)
    src = [" ".join(r.choice(WORDS) for _ in range(r.randint(1, 14))) for _ in range(n)]
    tgt = [" ".join(r.choice(WORDS).upper() for _ in range(r.randint(1, 14))) for _ in range(n)]
    src[5], tgt[9] = "   ", ""                    # two pairs with an empty side: skipped and counted
    src[7] = "  padded both sides \r"              # stripped, a CR before the newline
    paths = []
    for side, lines in (("de", src), ("en", tgt)):
        path = tmp_path / f"{name}.{side}"
        path.write_bytes(("\ufeff" if side == "de" else "").encode() + "\n".join(lines).encode() + b"\n")
        paths.append(str(path))
    return Sources(src=paths[0], tgt=paths[1])


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(line_chunks, "CHUNK_LINES", 16)


def codecs_for(sources, level="word"):
    corpus, _ = read_corpus(sources.src, sources.tgt, sources.tsv, what="training")
    return build_codecs(TranslationDataConfig(level=level, vocab_size=60, joint_vocab=False), corpus), corpus


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_round_trips_to_the_tokenized_text(tmp_path, small_chunks, workers):
    sources = make_corpus(tmp_path)
    (src, tgt), corpus = codecs_for(sources)
    cache = prepare_pairs(sources, src, tgt, str(tmp_path / "prep"), workers=workers)
    assert len(cache) == len(corpus) == 118 and cache.skipped_empty == corpus.skipped_empty == 2
    assert cache.header["dtype"] == "uint16"
    for i in range(len(cache)):
        assert cache.src[i] == src.encode(corpus.src[i]) and cache.tgt[i] == tgt.encode(corpus.tgt[i])
        assert src.decode(cache.src[i]) == corpus.src[i]
    assert isinstance(cache.src.ids, np.memmap)


def test_tsv_and_subword_round_trip(tmp_path, small_chunks):
    sources = make_corpus(tmp_path)
    tsv = tmp_path / "c.tsv"
    with open(sources.src, encoding="utf-8-sig") as a, open(sources.tgt, encoding="utf-8") as b:
        tsv.write_text("".join(f"{s.rstrip(chr(10))}\t{t}" for s, t in zip(a, b)), encoding="utf-8")
    tsv_sources = Sources(tsv=str(tsv))
    (src, tgt), corpus = codecs_for(tsv_sources, level="subword")
    cache = prepare_pairs(tsv_sources, src, tgt, str(tmp_path / "prep"), workers=2)
    assert len(cache) == len(corpus)
    assert all(cache.tgt[i] == tgt.encode(corpus.tgt[i]) for i in range(len(cache)))


def test_rebuilds_when_a_file_or_the_tokenizer_changes_and_reuses_otherwise(tmp_path):
    sources = make_corpus(tmp_path)
    (src, tgt), _ = codecs_for(sources)
    lines = []
    first = prepare_pairs(sources, src, tgt, str(tmp_path / "prep"), log=lines.append)
    assert len(lines) == 1 and "tokenized 118 pairs" in lines[0]
    again = prepare_pairs(sources, src, tgt, str(tmp_path / "prep"), log=lines.append)
    assert again.folder == first.folder and len(lines) == 1            # opened, not rebuilt
    other = TextCodec(src.tokenizer, type(src.vocab)(src.vocab.to_list()[:-1]))
    assert prepare_pairs(sources, other, tgt, str(tmp_path / "prep")).folder != first.folder
    with open(sources.tgt, "a", encoding="utf-8") as f, open(sources.src, "a", encoding="utf-8") as g:
        f.write("MANN\n")
        g.write("mann\n")
    changed = prepare_pairs(sources, src, tgt, str(tmp_path / "prep"))
    assert changed.folder != first.folder and len(changed) == 119


def test_a_corrupt_cache_is_rebuilt_never_trusted(tmp_path):
    sources = make_corpus(tmp_path)
    (src, tgt), corpus = codecs_for(sources)
    cache = prepare_pairs(sources, src, tgt, str(tmp_path / "prep"))
    ids = os.path.join(cache.folder, "tgt.ids")
    data = bytearray(open(ids, "rb").read())
    data[10] ^= 0xFF
    del cache
    with open(ids, "wb") as f:
        f.write(data)
    with pytest.raises(SeqgenError, match="checksum"):
        open_prepared(os.path.dirname(ids), prep.cache_key(prep.input_digests(sources), src, tgt))
    lines = []
    rebuilt = prepare_pairs(sources, src, tgt, str(tmp_path / "prep"), log=lines.append)
    assert any("warning: rebuilding the prepared data" in m and "checksum" in m for m in lines), lines
    assert all(rebuilt.tgt[i] == tgt.encode(corpus.tgt[i]) for i in range(len(rebuilt)))
    with open(os.path.join(rebuilt.folder, "header.json"), "w") as f:
        f.write("{not json")
    lines.clear()
    assert len(prepare_pairs(sources, src, tgt, str(tmp_path / "prep"), log=lines.append)) == 118
    assert any("unreadable" in m for m in lines)


KILLED_BUILD = """
import sys, time
from seqgen.data import line_chunks, prepared
from seqgen.data.line_chunks import Sources
from seqgen.tasks.translation import TranslationDataConfig, build_codecs, read_corpus
line_chunks.CHUNK_LINES = 16
real = line_chunks.map_chunks
def slow(*a, **k):
    for i, part in enumerate(real(*a, **k)):
        yield part
        if i == 2:
            print("writing", flush=True)
            time.sleep(60)
prepared.map_chunks = slow
src, tgt, out = sys.argv[1:]
corpus, _ = read_corpus(src, tgt, "", what="training")
s, t = build_codecs(TranslationDataConfig(level="word", joint_vocab=False), corpus)
prepared.prepare_pairs(Sources(src=src, tgt=tgt), s, t, out, workers=1)
"""


def test_a_kill_while_writing_leaves_nothing_a_later_run_trusts(tmp_path):
    sources = make_corpus(tmp_path)
    out = tmp_path / "prep"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, sources.src, sources.tgt, str(out)],
                            stdout=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout.readline().strip() == b"writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = os.listdir(out)
    assert left and all(name.startswith(".tmp-pairs-") for name in left)     # half-written, never renamed
    (src, tgt), corpus = codecs_for(sources)
    cache = prepare_pairs(sources, src, tgt, str(out))
    assert len(cache) == len(corpus) and not [n for n in os.listdir(out) if n.startswith(".tmp-")]


@pytest.mark.parametrize("errno_, reason", [(errno.ENOSPC, "No space left on device"),
                                            (errno.EROFS, "Read-only file system")])
def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, errno_, reason):
    sources = make_corpus(tmp_path)
    (src, tgt), _ = codecs_for(sources)

    def fail(*args, **kwargs):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(prep, "_write_arrays", fail)
    with pytest.raises(SeqgenError) as e:
        prepare_pairs(sources, src, tgt, str(tmp_path / "prep"))
    assert str(e.value).startswith(f"--prepared-dir {tmp_path / 'prep'}: cannot write") and reason in str(e.value)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "prep")


def test_a_source_file_that_changes_while_it_is_prepared_is_refused(tmp_path, monkeypatch, small_chunks):
    sources = make_corpus(tmp_path)
    (src, tgt), _ = codecs_for(sources)
    real = line_chunks.map_chunks

    def touching(*args, **kwargs):
        for i, part in enumerate(real(*args, **kwargs)):
            if i == 1:
                with open(sources.tgt, "ab") as f:
                    f.write(b"")
                os.utime(sources.tgt, ns=(time.time_ns(), time.time_ns() + 10**9))
            yield part

    monkeypatch.setattr(prep, "map_chunks", touching)
    with pytest.raises(SeqgenError, match=r"c\.en: changed while it was being prepared"):
        prepare_pairs(sources, src, tgt, str(tmp_path / "prep"), workers=1)
    assert not os.path.exists(tmp_path / "prep")       # made for the cache, removed again when it failed


def test_bad_input_lines_name_the_file_and_line(tmp_path, small_chunks):
    sources = make_corpus(tmp_path)
    (src, tgt), _ = codecs_for(sources)
    data = open(sources.tgt, "rb").read().split(b"\n")
    data[40] = b"caf\xe9"
    bad = tmp_path / "bad.en"
    bad.write_bytes(b"\n".join(data))
    with pytest.raises(SeqgenError, match=r"bad\.en:41:4: invalid UTF-8"):
        prepare_pairs(Sources(src=sources.src, tgt=str(bad)), src, tgt, str(tmp_path / "p"), workers=2)
    short = tmp_path / "short.en"
    short.write_text("a\nb\n")
    with pytest.raises(SeqgenError, match=f"{sources.src} has 120 lines but {short} has 2"):
        prepare_pairs(Sources(src=sources.src, tgt=str(short)), src, tgt, str(tmp_path / "p"))
    assert not os.path.exists(tmp_path / "p")


# -- batches -------------------------------------------------------------------------------------------
def reference_batches(lengths, *, max_tokens=None, batch_size=None, seed=0, epoch=0, bucket_factor=100):
    """BucketBatchSampler.batches as it was before the sampler kept its plan in tensors (one list per batch)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    est = batch_size or max(1, int(max_tokens / max(float(lengths.float().mean()), 1.0)))
    g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + epoch) % (1 << 63))
    order = torch.randperm(len(lengths), generator=g)
    out = []
    for start in range(0, len(lengths), bucket_factor * est):
        idx = order[start: start + bucket_factor * est]
        lens, perm = torch.sort(lengths[idx], stable=True)
        idx, lens = idx[perm].tolist(), lens.tolist()
        if batch_size:
            out += [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
            continue
        cur = []
        for i, n in zip(idx, lens):
            if cur and (len(cur) + 1) * n > max_tokens:
                out.append(cur)
                cur = []
            cur.append(i)
        out += [cur] if cur else []
    return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]


@pytest.mark.parametrize("budget", [dict(max_tokens=37), dict(batch_size=5), dict(max_tokens=1)])
def test_the_sampler_plan_equals_the_list_sampler(budget):
    r = random.Random(3)
    lengths = [r.randint(1, 30) for _ in range(2000)]
    for seed, epoch, factor in ((0, 0, 100), (4, 3, 2), (9, 1, 1)):
        s = BucketBatchSampler(np.asarray(lengths), seed=seed, bucket_factor=factor, **budget)
        assert s.batches(epoch) == reference_batches(lengths, seed=seed, epoch=epoch, bucket_factor=factor, **budget)


@pytest.mark.parametrize("budget", [dict(max_tokens=60), dict(batch_size=7)])
def test_batches_from_the_cache_equal_the_in_memory_batches(tmp_path, budget, monkeypatch):
    import seqgen.data.parallel as parallel
    monkeypatch.setattr(parallel, "RELEASE_EVERY", 2)     # mapped pages released between batches change nothing
    sources = make_corpus(tmp_path, n=300)
    (src, tgt), corpus = codecs_for(sources)
    d = TranslationDataConfig(level="word", max_len=11, max_tokens=budget.get("max_tokens", 0),
                              batch_size=budget.get("batch_size", 64))
    warned = ([], [])
    today = training_batches(corpus, src, tgt, d, seed=5, warn=warned[0].append)
    cache = prepare_pairs(sources, src, tgt, str(tmp_path / "prep"))
    mapped = prepared_batches(cache, src, tgt, d, seed=5, warn=warned[1].append)
    assert warned[0] == warned[1] and "filtered" in warned[0][0]
    for epoch in (0, 1):
        assert mapped.num_batches(epoch) == today.num_batches(epoch)
        for a, b in zip(today.iter_batches(epoch), mapped.iter_batches(epoch)):
            for field in ("source", "source_lengths", "target", "index"):
                assert torch.equal(getattr(a, field), getattr(b, field)), field
    # resume: from any position, and a process's share under data parallelism, are the same batches
    full = list(mapped.iter_batches(1))
    assert [b.index.tolist() for b in mapped.iter_batches(1, start=3)] == [b.index.tolist() for b in full[3:]]
    assert [b.index.tolist() for b in mapped.iter_batches(1, 1, None, 2)] == [b.index.tolist() for b in full[1::2]]


def test_token_lists_pad_like_pad_sequences():
    from seqgen.data.batching import pad_sequences
    lists = [[5, 6, 7], [], [8]]
    tl = TokenLists.from_lists(lists).take(np.array([2, 0, 1]))
    ids, lengths = tl.padded([0, 1, 2], 0, prefix=1, suffix=2)
    want, want_len = pad_sequences([[1, 8, 2], [1, 5, 6, 7, 2], [1, 2]], 0)
    assert torch.equal(ids, want) and torch.equal(lengths, want_len) and tl.lengths().tolist() == [1, 3, 0]


def _rss_file_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from Linux's /proc")
def test_token_lists_release_the_mapped_pages_they_read(tmp_path):
    """Reading a memory-mapped cache through `lengths()` leaves its pages out of the process's RSS (they stay
    readable), so a run's memory does not grow with the corpus it has read."""
    n = 4 << 20                                       # 32 MiB of int64 offsets
    path = tmp_path / "offsets"
    np.arange(n + 1, dtype=np.int64).tofile(path)
    ids = np.zeros(n, dtype=np.uint16)
    before = _rss_file_mib()
    offsets = np.memmap(path, dtype=np.int64, mode="r")
    assert int(offsets.sum()) > 0                     # every page touched: they count in RSS now
    assert _rss_file_mib() - before > 24
    lists = TokenLists(ids, offsets)
    lengths = lists.lengths()
    assert lengths.dtype == np.int32 and len(lengths) == n and int(lengths.min()) == int(lengths.max()) == 1
    assert _rss_file_mib() - before < 8
    assert int(offsets[n]) == n and lists[n - 1] == [0]  # still readable after the release


# -- vocabularies ----------------------------------------------------------------------------------------
def test_sentencepiece_trains_on_a_bounded_sample_and_the_vocabulary_is_kept(tmp_path, small_chunks):
    sources = make_corpus(tmp_path, n=200)
    src, tgt, n = sample_pairs(sources, 50, seed=0)
    assert n == 200 and len(src) <= 50 and (src, tgt) == sample_pairs(sources, 50, seed=0)[:2]
    corpus, _ = read_corpus(sources.src, sources.tgt, "", what="training")
    assert sample_pairs(sources, 0)[:2] == (corpus.src, corpus.tgt)         # 0: all of them, in order
    d = TranslationDataConfig(level="subword", vocab_size=60, vocab_sample=50)
    lines = []
    first = fit_codecs(d, sources, str(tmp_path / "prep"), log=lines.append)
    assert any(f"a random sample of {len(src)} of 200 pairs (--vocab-sample 50)" in m for m in lines), lines
    lines.clear()
    assert fit_codecs(d, sources, str(tmp_path / "prep"), log=lines.append) == first and not lines
    (vocab_file,) = [f for f in os.listdir(tmp_path / "prep") if f.startswith("vocab-")]
    (tmp_path / "prep" / vocab_file).write_bytes(b"garbage")
    assert fit_codecs(d, sources, str(tmp_path / "prep"), log=lines.append) == first
    assert any("unreadable vocabulary cache" in m for m in lines)


@pytest.mark.parametrize("joint", [True, False])
def test_char_and_word_vocabularies_counted_on_all_cores_equal_the_in_memory_ones(tmp_path, small_chunks, joint):
    sources = make_corpus(tmp_path)
    corpus, _ = read_corpus(sources.src, sources.tgt, "", what="training")
    for level in ("char", "word"):
        d = TranslationDataConfig(level=level, joint_vocab=joint, min_freq=2)
        assert fit_codecs(d, sources, str(tmp_path / f"p-{level}"), log=lambda m: None) == build_codecs(d, corpus)
    s, t, stats = count_tokens(sources, "word", workers=2)
    assert stats[:2] == [120, 2] and sum(s.values()) > 0


# -- the commands --------------------------------------------------------------------------------------------
def test_prepare_then_train_and_resume_reuse_the_cache(tmp_path, capsys):
    import dataclasses

    from seqgen.cli import main
    from seqgen.decoders.rnn import DecoderConfig
    from seqgen.encoders.rnn import RNNEncoderConfig
    from seqgen.generation import GenerationConfig
    from seqgen.tasks.translation import TranslationRunConfig, train_translation
    from seqgen.train import TrainConfig
    sources = make_corpus(tmp_path, n=200)
    prep_dir = str(tmp_path / "prep")
    args = ["--src-train", sources.src, "--tgt-train", sources.tgt, "--level", "word", "--prepared-dir", prep_dir]
    assert main(["prepare", "translation", *args]) == 0
    assert "prepared: 198 pairs in " in capsys.readouterr().out
    data = TranslationDataConfig(src_train=sources.src, tgt_train=sources.tgt, src_valid=sources.src,
                                 tgt_valid=sources.tgt, level="word", prepared_dir=prep_dir)
    run = TranslationRunConfig(
        data=data, encoder=RNNEncoderConfig(cell="gru", emb=8, hidden=8, dropout=0.0),
        decoder=DecoderConfig(cell="gru", emb=8, hidden=8, attention="luong_general", dropout=0.0),
        train=TrainConfig(max_steps=2, eval_every=2, checkpoint_every=2, seed=1, device="cpu", progress=False),
        eval=GenerationConfig(beam=1, max_len=5))
    messages = []
    train_translation(run, str(tmp_path / "run"), log=messages.append)
    assert any("198 pairs" in m for m in messages) and not any("tokenized" in m or "sentencepiece" in m
                                                                for m in messages), messages
    messages.clear()
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, max_steps=3))
    state = train_translation(run, str(tmp_path / "run"), resume=True, overrides={"train": {"max_steps": 3}},
                              log=messages.append)
    assert state.step == 3 and not any("tokenized" in m for m in messages), messages
    assert main(["prepare", "translation", "--src-train", sources.src, "--tgt-train", sources.tgt]) == 2
    assert "--prepared-dir is required" in capsys.readouterr().err
