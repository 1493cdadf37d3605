"""The language-model kind of the prepared-data cache (seqgen/data/prepared_stream.py): round trip at every
level, rebuilds, kills, batches and runs equal to the in-memory pipeline's; and caption targets as TokenLists
giving the batches the per-caption lists gave."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from seqgen.data import prepared_stream as ps
from seqgen.data.batching import BucketBatchSampler, pad_sequences
from seqgen.data.captions import CachedCaptionBatches, CaptionExamples, _CaptionCollate
from seqgen.data.prepared_stream import PreparedStream, prepare_stream, split_text, text_pieces
from seqgen.data.text import LMBatches, read_text
from seqgen.decoders.rnn import DecoderConfig
from seqgen.errors import SeqgenError
from seqgen.model import load_model
from seqgen.tasks import lm
from seqgen.tasks.lm import LMDataConfig, LMRunConfig, train_lm
from seqgen.tokenizers import TextCodec
from seqgen.train import TrainConfig

# spaces before line ends, blank lines, a lone CR, runs of spaces, leading spaces, non-ASCII, no final newline
LINES = ["the quick brown fox jumps over the lazy dog.", "  two  spaces, then a tab\there ", "",
         "line with a lone \r inside", "ünïcödé wörds — and 'quotes' ", "the end. "]
TEXT = "\n".join(LINES * 12) + "\nlast line without newline"


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_bytes(TEXT.encode("utf-8"))
    return str(p)


def codec_for(path, level, valid_fraction=0.1, **kw):
    train_text, _ = split_text(read_text(path), valid_fraction)
    return TextCodec.build(level, [train_text], vocab_size=60, **kw)


@pytest.mark.parametrize("level", ["char", "word", "subword"])
def test_pieces_encode_to_the_whole_text_s_ids(level, text_file):
    codec = codec_for(text_file, level)
    whole = codec.encode(TEXT)
    for size in (1, 7, 50, 333, len(TEXT)):
        pieces = list(text_pieces(TEXT, level, size))
        assert "".join(pieces) == TEXT and (level != "char" or len(pieces) == -(-len(TEXT) // size))
        assert [i for p in pieces for i in codec.encode(p)] == whole, size


@pytest.mark.parametrize("level", ["char", "word", "subword"])
def test_stream_cache_round_trips_to_the_encoded_text(level, text_file, tmp_path):
    codec = codec_for(text_file, level)
    lines = []
    stream = prepare_stream(text_file, codec, 0.1, str(tmp_path / "prep"), workers=1, piece_chars=100,
                            log=lines.append)
    train_text, valid_text = split_text(read_text(text_file), 0.1)
    assert stream.train.tolist() == codec.encode(train_text) and stream.valid.tolist() == codec.encode(valid_text)
    assert stream.header["dtype"] == "uint16" and isinstance(stream.train, np.memmap)
    assert any("tokenized" in m for m in lines)
    lines.clear()
    again = prepare_stream(text_file, codec, 0.1, str(tmp_path / "prep"), log=lines.append)    # opened, not rebuilt
    assert again.folder == stream.folder and not lines and np.array_equal(again.train, stream.train)


def test_pieces_tokenized_on_two_processes_give_the_same_stream(text_file, tmp_path):
    codec = codec_for(text_file, "word")
    stream = prepare_stream(text_file, codec, 0.1, str(tmp_path / "prep"), workers=2, piece_chars=200)
    assert stream.train.tolist() == codec.encode(split_text(read_text(text_file), 0.1)[0])


def test_a_changed_text_or_vocabulary_gets_another_cache(text_file, tmp_path):
    prep = str(tmp_path / "prep")
    codec = codec_for(text_file, "word")
    first = prepare_stream(text_file, codec, 0.1, prep, workers=1)
    other_vocab = codec_for(text_file, "word", max_size=20)
    assert other_vocab != codec
    second = prepare_stream(text_file, other_vocab, 0.1, prep, workers=1)
    assert second.folder != first.folder
    assert second.train.tolist() == other_vocab.encode(split_text(read_text(text_file), 0.1)[0])
    with open(text_file, "a", encoding="utf-8") as f:
        f.write("\nmore text at the end")
    third = prepare_stream(text_file, codec, 0.1, prep, workers=1)
    assert third.folder not in (first.folder, second.folder)
    train_text, valid_text = split_text(read_text(text_file), 0.1)
    assert third.train.tolist() == codec.encode(train_text) and third.valid.tolist() == codec.encode(valid_text)
    assert prepare_stream(text_file, codec, 0.2, prep, workers=1).folder != third.folder


def test_a_corrupt_cache_is_rebuilt_not_trusted(text_file, tmp_path):
    prep = str(tmp_path / "prep")
    codec = codec_for(text_file, "char")
    stream = prepare_stream(text_file, codec, 0.1, prep, workers=1)
    path = os.path.join(stream.folder, "train.ids")
    del stream
    data = bytearray(open(path, "rb").read())
    data[10] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)
    lines = []
    rebuilt = prepare_stream(text_file, codec, 0.1, prep, workers=1, log=lines.append)
    assert any("warning: rebuilding the prepared data" in m and "checksum" in m for m in lines), lines
    assert rebuilt.train.tolist() == codec.encode(split_text(read_text(text_file), 0.1)[0])
    os.remove(os.path.join(rebuilt.folder, "valid.ids"))
    lines.clear()
    assert len(prepare_stream(text_file, codec, 0.1, prep, workers=1, log=lines.append).valid) > 0
    assert any("rebuilding" in m for m in lines)


KILLED_BUILD = """
import sys, time
from seqgen.data import prepared_stream
from seqgen.data.prepared_stream import split_text
from seqgen.data.text import read_text
from seqgen.tokenizers import TextCodec
real = prepared_stream.map_tasks
def slow(*a, **k):
    for i, part in enumerate(real(*a, **k)):
        yield part
        if i == 2:
            print("writing", flush=True)
            time.sleep(60)
prepared_stream.map_tasks = slow
text, out = sys.argv[1:]
codec = TextCodec.build("char", [split_text(read_text(text), 0.1)[0]])
prepared_stream.prepare_stream(text, codec, 0.1, out, workers=1, piece_chars=50)
"""


def test_a_kill_while_writing_leaves_nothing_a_later_run_trusts(text_file, tmp_path):
    out = tmp_path / "prep"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, text_file, str(out)],
                            stdout=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout.readline().strip() == b"writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = os.listdir(out)
    assert left and all(name.startswith(".tmp-stream-") for name in left)     # half-written, never renamed
    codec = codec_for(text_file, "char")
    stream = prepare_stream(text_file, codec, 0.1, str(out), workers=1)
    assert stream.train.tolist() == codec.encode(split_text(read_text(text_file), 0.1)[0])
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_a_text_that_changes_while_it_is_prepared_is_refused(text_file, tmp_path, monkeypatch):
    codec = codec_for(text_file, "char")
    real = ps.map_tasks

    def touching(*args, **kwargs):
        for i, part in enumerate(real(*args, **kwargs)):
            if i == 1:
                with open(text_file, "a", encoding="utf-8") as f:
                    f.write("x")
            yield part

    monkeypatch.setattr(ps, "map_tasks", touching)
    with pytest.raises(SeqgenError, match=r"text\.txt: changed while it was being prepared"):
        prepare_stream(text_file, codec, 0.1, str(tmp_path / "prep"), workers=1, piece_chars=50)
    assert not os.path.exists(tmp_path / "prep")


def test_lm_batches_over_the_memory_map_equal_those_over_the_tensor(text_file, tmp_path):
    codec = codec_for(text_file, "word")
    stream = prepare_stream(text_file, codec, 0.1, str(tmp_path / "prep"), workers=1)
    old = torch.tensor(codec.encode(split_text(read_text(text_file), 0.1)[0]), dtype=torch.long)
    kw = dict(seq_len=7, batch_size=5, bos=codec.vocab.bos, seed=4)
    a, b = LMBatches(old, **kw), LMBatches(stream.train, **kw)
    for epoch in (0, 1, 2):
        assert a.num_batches(epoch) == b.num_batches(epoch) > 2
        for args in ((), (1,), (1, None, 2), (0, 3)):
            xs, ys = list(a.iter_batches(epoch, *args)), list(b.iter_batches(epoch, *args))
            assert len(xs) == len(ys) > 0
            for x, y in zip(xs, ys):
                assert y.target.dtype == torch.long and torch.equal(x.target, y.target)


# -- whole runs ---------------------------------------------------------------------------------------------
def tiny_run(text_path, prepared_dir="", **train_kw):
    train = dict(lr=1e-2, warmup_steps=5, max_steps=20, eval_every=10, log_every=5, checkpoint_every=5, seed=3,
                 progress=False, device="cpu", schedule="constant")
    train.update(train_kw)
    return LMRunConfig(
        data=LMDataConfig(text=str(text_path), level="word", seq_len=12, batch_size=4, valid_fraction=0.1,
                          prepared_dir=prepared_dir),
        decoder=DecoderConfig(cell="lstm", emb=16, hidden=24, layers=1, dropout=0.2),
        train=TrainConfig(**train))


class Interrupt(Exception):
    pass


def test_lm_runs_on_the_cache_equal_the_in_memory_run_and_resume_exactly(text_file, tmp_path, monkeypatch):
    real = lm.prepare_stream

    def in_memory(path, codec, valid_fraction, prepared_dir, **kw):      # what train_lm did before the cache
        train_text, valid_text = split_text(read_text(path), valid_fraction)
        return PreparedStream("", {}, torch.tensor(codec.encode(train_text), dtype=torch.long),
                              np.asarray(codec.encode(valid_text), dtype=np.int64))

    monkeypatch.setattr(lm, "prepare_stream", in_memory)
    train_lm(tiny_run(text_file), str(tmp_path / "old"), log=lambda m: None)
    monkeypatch.setattr(lm, "prepare_stream", real)

    def crash(msg):
        if msg.startswith("step 10 "):
            raise Interrupt
    with pytest.raises(Interrupt):
        train_lm(tiny_run(text_file), str(tmp_path / "cut"), log=crash)
    assert [n for n in os.listdir(tmp_path / "cut" / "prepared") if n.startswith("stream-")]
    lines = []
    state = train_lm(tiny_run(text_file), str(tmp_path / "cut"), resume=True, log=lines.append)
    assert state.step == 20 and not any("tokenized" in str(m) for m in lines)     # the cache was opened
    a = load_model(str(tmp_path / "old" / "last.pt")).state_dict()
    b = load_model(str(tmp_path / "cut" / "last.pt")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_that_fails_before_training_leaves_no_prepared_folder_of_its_own(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a b c d e f\n")
    with pytest.raises(SeqgenError, match="fewer than --seq-len"):
        train_lm(tiny_run(short), str(tmp_path / "run"), log=lambda m: None)
    assert not os.path.exists(tmp_path / "run" / "prepared")
    shared = tmp_path / "shared"
    with pytest.raises(SeqgenError, match="fewer than --seq-len"):
        train_lm(tiny_run(short, prepared_dir=str(shared)), str(tmp_path / "run2"), log=lambda m: None)
    assert [n for n in os.listdir(shared) if n.startswith("stream-")]    # a folder the user named is kept


# -- caption targets ----------------------------------------------------------------------------------------
class FakeCache:
    def get_rows(self, rows):
        return torch.tensor(rows)


def test_caption_batches_from_token_lists_equal_the_per_caption_lists():
    captions = {f"{i}.jpg": [" ".join(["a", "b", "c", "d"][: 1 + (i + j) % 4] * (1 + j)) for j in range(5)]
                for i in range(12)}
    captions["0.jpg"].append("b " * 30)                 # dropped: longer than max_len
    names = list(captions)
    codec = TextCodec.build("word", [c for caps in captions.values() for c in caps])
    ex = CaptionExamples(names, captions, codec, max_len=12)
    old, image_of = [], []
    for row, n in enumerate(names):
        for c in captions[n]:
            ids = codec.encode(c)
            if 0 < len(ids) <= 12:
                old.append([codec.vocab.bos, *ids, codec.vocab.eos])
                image_of.append(row)
    total = sum(len(caps) for caps in captions.values())
    assert len(ex) == len(old) and ex.dropped == total - len(old) > 0 and ex.image_of.tolist() == image_of
    assert [ex.targets[i] for i in range(len(ex))] == old
    rows = list(range(100, 112))
    batches = CachedCaptionBatches(FakeCache(), rows, ex, pad=codec.vocab.pad, batch_size=7, seed=5)
    sampler = BucketBatchSampler([len(t) for t in old], batch_size=7, shuffle=True, seed=5)
    for epoch in (0, 1):
        got = list(batches.iter_batches(epoch))
        want = sampler.batches(epoch)
        assert len(got) == len(want)
        for batch, idx in zip(got, want):
            target, _ = pad_sequences([old[i] for i in idx], codec.vocab.pad)
            assert torch.equal(batch.target, target) and batch.index.tolist() == idx
            assert batch.source.tolist() == [rows[image_of[i]] for i in idx]
    collate = _CaptionCollate(codec.vocab.pad, names, ex)
    batch, failed = collate([(i, torch.zeros(3), None) for i in (4, 0, 9)])
    assert not failed and torch.equal(batch.target, pad_sequences([old[i] for i in (4, 0, 9)], codec.vocab.pad)[0])
    _, failed = collate([(3, None, "unreadable")])
    assert failed == [(names[image_of[3]], "unreadable")]
