"""The captioning kind of the prepared-data cache (seqgen.data.prepared_captions)."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from seqgen.data import prepared_captions
from seqgen.data.captions import CaptionExamples
from seqgen.data.prepared_captions import prepare_captions, tokenize_captions
from seqgen.errors import SeqgenError
from seqgen.tokenizers import TextCodec


def _captions(n=9):
    captions = {f"{i}.jpg": [" ".join(["a", "dog", "runs", "on", "grass"][: 1 + (i + j) % 5] * (1 + j))
                             for j in range(5)] for i in range(n)}
    captions["0.jpg"].append("dog " * 30)     # longer than max_len: dropped
    captions["1.jpg"].append("")              # empty: dropped
    return list(captions), captions


def _codec(captions):
    return TextCodec.build("word", [c for caps in captions.values() for c in caps])


def _folders(prepared):
    return sorted(n for n in os.listdir(prepared) if n.startswith("captions-"))


def _same(a, b):
    (ta, ia, da), (tb, ib, db) = a, b
    assert [ta[i] for i in range(len(ta))] == [tb[i] for i in range(len(tb))]
    assert ia.tolist() == ib.tolist() and da == db


def test_the_cache_round_trips_and_a_later_run_opens_it(tmp_path):
    names, captions = _captions()
    codec = _codec(captions)
    lines = []
    built = prepare_captions(names, captions, codec, 12, str(tmp_path), log=lines.append)
    memory = tokenize_captions(names, captions, codec, 12)
    _same(built, memory)
    total = sum(len(c) for c in captions.values())
    assert 2 <= memory[2] < total and len(lines) == 1 and "tokenized" in lines[0]
    # decoded back: every kept caption is bos + its text + eos
    targets, image_of, _ = built
    kept = [c for n in names for c in captions[n] if 0 < len(codec.encode(c)) <= 12]
    assert [codec.decode(targets[i][1:-1]) for i in range(len(targets))] == kept
    assert [names[r] for r in image_of] == [n for n in names for c in captions[n] if 0 < len(codec.encode(c)) <= 12]
    assert isinstance(targets.ids, np.memmap)         # memory-mapped, not in memory
    folder = _folders(tmp_path)
    mtime = os.stat(tmp_path / folder[0] / "tgt.ids").st_mtime_ns
    again = prepare_captions(names, captions, codec, 12, str(tmp_path), log=lines.append)
    _same(again, memory)
    assert len(lines) == 1 and _folders(tmp_path) == folder       # opened, not rebuilt
    assert os.stat(tmp_path / folder[0] / "tgt.ids").st_mtime_ns == mtime


def test_changed_captions_splits_codec_or_max_len_give_another_cache(tmp_path):
    names, captions = _captions()
    codec = _codec(captions)
    prepare_captions(names, captions, codec, 12, str(tmp_path))
    changed = {**captions, "3.jpg": [*captions["3.jpg"][:-1], "a dog on grass"]}
    _same(prepare_captions(names, changed, codec, 12, str(tmp_path)), tokenize_captions(names, changed, codec, 12))
    prepare_captions(names[:-1], captions, codec, 12, str(tmp_path))                     # another split
    prepare_captions(names, captions, codec, 8, str(tmp_path))                           # another max_len
    other = TextCodec.build("word", ["a dog runs"])
    _same(prepare_captions(names, captions, other, 12, str(tmp_path)), tokenize_captions(names, captions, other, 12))
    assert len(_folders(tmp_path)) == 5


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "header"])
def test_a_corrupt_cache_is_rebuilt_never_trusted(tmp_path, damage):
    names, captions = _captions()
    codec = _codec(captions)
    prepare_captions(names, captions, codec, 12, str(tmp_path))
    folder = tmp_path / _folders(tmp_path)[0]
    target = folder / ("header.json" if damage == "header" else "tgt.ids")
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[3] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-2])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text("{not json")
    lines = []
    rebuilt = prepare_captions(names, captions, codec, 12, str(tmp_path), log=lines.append)
    _same(rebuilt, tokenize_captions(names, captions, codec, 12))
    assert any("rebuilding the prepared data" in line for line in lines), lines
    assert _folders(tmp_path) == [folder.name]


def test_a_failure_while_writing_leaves_no_cache(tmp_path, monkeypatch):
    names, captions = _captions()
    codec = _codec(captions)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepared_captions, "tokenize_captions", interrupted)
    prepared = tmp_path / "prepared"
    with pytest.raises(KeyboardInterrupt):
        prepare_captions(names, captions, codec, 12, str(prepared))
    assert not prepared.exists()       # the folder this call made goes with its temporary folder
    prepared.mkdir()
    (prepared / f".tmp-captions-{2 ** 22 + 7}-x").mkdir()   # left by a killed build (no such process)
    monkeypatch.undo()
    _same(prepare_captions(names, captions, codec, 12, str(prepared)), tokenize_captions(names, captions, codec, 12))
    assert [n for n in os.listdir(prepared) if n.startswith(".tmp")] == []


@pytest.mark.parametrize("errno_, reason", [(errno.ENOSPC, "No space left on device"),
                                            (errno.EROFS, "Read-only file system")])
def test_a_prepared_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, errno_, reason):
    names, captions = _captions()

    def fail(*args, **kwargs):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(prepared_captions.ArrayWriter, "finish", fail)
    with pytest.raises(SeqgenError) as e:
        prepare_captions(names, captions, _codec(captions), 12, str(tmp_path / "prep"))
    assert str(e.value).startswith(f"--prepared-dir {tmp_path / 'prep'}: cannot write") and reason in str(e.value)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "prep")


def test_caption_examples_from_the_cache_equal_those_in_memory(tmp_path):
    names, captions = _captions()
    codec = _codec(captions)
    a = CaptionExamples(names, captions, codec, 12)
    b = CaptionExamples(names, captions, codec, 12, prepared_dir=str(tmp_path))
    _same((a.targets, a.image_of, a.dropped), (b.targets, b.image_of, b.dropped))
    assert a.names == b.names == names


def test_a_captioning_run_keeps_its_captions_in_the_prepared_folder_and_the_next_run_opens_them(tmp_path):
    import dataclasses

    from seqgen.tasks.captioning import train_captioning
    from test_captioning import shapes_run, write_shapes_dataset

    write_shapes_dataset(tmp_path, sizes=(("train", 40), ("valid", 8), ("test", 2)))
    shared = tmp_path / "prepared"
    run = shapes_run(tmp_path, steps=2)
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, prepared_dir=str(shared)))
    logs: list[list[str]] = [[], []]
    for i in (0, 1):
        train_captioning(run, str(tmp_path / f"run{i}"), log=logs[i].append)
    assert len(_folders(shared)) == 1
    assert any("tokenized" in line and "training captions" in line for line in logs[0])
    assert not any("training captions into" in line for line in logs[1])      # opened, not written again
    own = shapes_run(tmp_path, steps=2)                                            # no --prepared-dir: OUT/prepared
    train_captioning(own, str(tmp_path / "own"), log=lambda m: None)
    assert len(_folders(tmp_path / "own" / "prepared")) == 1
