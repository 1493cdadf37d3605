"""Folder captioning sharded over processes (`torchrun ... seqgen caption`): the merged output is the file one
process writes, byte for byte, also after a kill and a rerun; the part files' naming, merging and resume rules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_image_folder, write_tiny_captioner

from seqgen.cli import main
from seqgen.generation import GenerationConfig
from seqgen.model import load_model
from seqgen.tasks.caption_folder import caption_folder, find_parts, merge_parts, part_path

N_IMAGES = 30
BROKEN = {"img007b.jpg": b"", "img019b.png": b"this is not an image\n"}   # decode failures, inside the batches


@pytest.fixture(scope="module")
def model_and_folder(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained tiny captioner (nonsense captions, but deterministic) and a folder of 30 small images and
    two broken files."""
    d = tmp_path_factory.mktemp("sharded")
    write_tiny_captioner(d / "model.pt")
    folder = write_image_folder(d / "photos", N_IMAGES)
    for name, data in BROKEN.items():
        (folder / name).write_bytes(data)
    return d / "model.pt", folder


def argv(ckpt: Path, folder: Path, out: Path, *extra) -> list[str]:
    return ["caption", str(ckpt), str(folder), "--out", str(out), "--batch-size", "4", "--beam", "2",
            "--max-len", "8", "--num-workers", "0", "--quiet", "--device", "cpu", *map(str, extra)]


def torchrun(args: list[str], log: Path, *, script: Path | None = None) -> int:
    """`torchrun --nproc_per_node 2 -m seqgen.cli ARGS` (or `script ARGS`), 1 thread per process; returns the
    exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    program = [str(script)] if script else ["-m", "seqgen.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program, *args]
    with open(log, "w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300, check=False).returncode


# A torchrun worker that is `seqgen ARGV`, except that process 1 is SIGKILLed halfway through writing its
# third batch of records (what the OOM killer or a lost machine does); torchrun then stops process 0.
KILLED_WORKER = """
import os, signal, sys
from seqgen.tasks import caption_folder

if os.environ["RANK"] == "1":
    append, count = caption_folder._append, [0]

    def dying_append(f, text, out_path):
        count[0] += 1
        if count[0] == 3:
            append(f, text[:len(text) // 2], out_path)
            os.kill(os.getpid(), signal.SIGKILL)
        append(f, text, out_path)
    caption_folder._append = dying_append

from seqgen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def one_process(ckpt: Path, folder: Path, out: Path, capsys, *extra) -> str:
    """The reference: the same command in this process (one thread, like each torchrun worker)."""
    assert main(argv(ckpt, folder, out, "--skipped", str(out) + ".skipped", *extra)) == 0
    return capsys.readouterr().err


def test_two_processes_write_the_file_one_process_writes(model_and_folder, tmp_path, capsys):
    ckpt, folder = model_and_folder
    for ext in ("jsonl", "csv"):
        ref, out = tmp_path / f"reference.{ext}", tmp_path / f"captions.{ext}"
        one_process(ckpt, folder, ref, capsys)
        log = tmp_path / f"torchrun-{ext}.log"
        extra = []
        if ext == "csv":           # --overwrite: what an earlier run left (output and parts) is dropped
            stale = "image,caption,score\n" + f"{folder / 'img003.png'},stale,0.000000\n"
            out.write_text(stale)
            Path(part_path(str(out), 1, 3)).write_text(stale)
            extra = ["--overwrite"]
        args = argv(ckpt, folder, out, "--skipped", str(out) + ".skipped", *extra)
        assert torchrun(args, log) == 0, log.read_text()[-3000:]
        assert out.read_bytes() == ref.read_bytes(), ext
        assert not find_parts(str(out)) and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
        # the summary: once (process 0), for the whole run, and the same skipped images with their reasons
        text = log.read_text()
        assert text.count(f"seqgen: captioned {N_IMAGES} image(s)") == 1, text[-3000:]
        skipped = sorted(Path(str(out) + ".skipped").read_text().splitlines())
        assert skipped == sorted(Path(str(ref) + ".skipped").read_text().splitlines())
        assert [os.path.basename(line.split("\t")[0]) for line in skipped] == sorted(BROKEN)
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [os.path.basename(r["image"]) for r in records] == sorted(set(os.listdir(folder)) - set(BROKEN))


def test_killed_sharded_run_resumes_to_the_same_file(model_and_folder, tmp_path, capsys):
    ckpt, folder = model_and_folder
    ref, out = tmp_path / "reference.jsonl", tmp_path / "captions.jsonl"
    # Batches of 1: a kill right after the first records leaves most of the folder to do, and the rerun's
    # batches hold the same images as the reference's. (The rerun batches what is left: with larger batches
    # an image can land in a batch of another size, whose matmuls may round the last digit of a score
    # differently; the same holds for a single process resumed after a kill.)
    one_process(ckpt, folder, ref, capsys, "--batch-size", 1)

    worker = tmp_path / "killed_worker.py"
    worker.write_text(KILLED_WORKER)
    log = tmp_path / "killed.log"
    assert torchrun(argv(ckpt, folder, out, "--batch-size", 1), log, script=worker) != 0, log.read_text()[-3000:]
    assert not out.exists()
    parts = find_parts(str(out))
    assert [os.path.basename(p) for p in parts] == ["captions.part-0-of-2.jsonl", "captions.part-1-of-2.jsonl"]
    torn = Path(parts[1]).read_text()
    assert torn.count("\n") == 2 and not torn.endswith("\n")        # two batches and half a record
    log = tmp_path / "rerun.log"
    assert torchrun(argv(ckpt, folder, out, "--batch-size", 1), log) == 0, log.read_text()[-3000:]
    assert out.read_bytes() == ref.read_bytes()
    assert not find_parts(str(out))


def test_parts_of_a_killed_run_are_finished_and_merged_by_one_process(model_and_folder, tmp_path):
    """What a kill leaves (parts with a torn last record, of another process count too) is skipped, finished
    and merged in listing order by a rerun, here without torchrun."""
    ckpt, folder = model_and_folder
    model = load_model(str(ckpt), task="captioning")
    gen = GenerationConfig(beam=2, max_len=8)
    ref, out = tmp_path / "reference.jsonl", tmp_path / "captions.jsonl"
    caption_folder(model, [str(folder)], str(ref), gen, batch_size=1, num_workers=0, progress=False,
                   log=lambda m: None)     # batches of 1: see test_killed_sharded_run_resumes_to_the_same_file
    lines = ref.read_text().splitlines(keepends=True)
    # process 1 of 2 finished two batches and was cut off mid-record; process 0 of 3 finished one batch
    Path(part_path(str(out), 1, 2)).write_text("".join(lines[4:8] + lines[12:16]) + lines[16][:20])
    Path(part_path(str(out), 0, 3)).write_text("".join(lines[20:24]))
    summary = caption_folder(model, [str(folder)], str(out), gen, batch_size=1, num_workers=0, progress=False,
                             log=lambda m: None)
    assert out.read_bytes() == ref.read_bytes()
    assert not find_parts(str(out))
    assert summary.already_done == 12 and summary.captioned == len(lines) - 12
    assert sorted(os.path.basename(p) for p, _ in summary.skipped) == sorted(BROKEN)
    # a second rerun finds everything done
    again = caption_folder(model, [str(folder)], str(out), gen, num_workers=0, progress=False, log=lambda m: None)
    assert again.captioned == 0 and again.already_done == len(lines) and out.read_bytes() == ref.read_bytes()


def test_part_names_and_merge_order(tmp_path):
    out = str(tmp_path / "caps.csv")
    assert part_path(out, 1, 4) == str(tmp_path / "caps.part-1-of-4.csv")
    for rank, world in ((1, 10), (0, 2), (3, 10), (1, 2)):
        Path(part_path(out, rank, world)).write_text("image,caption,score\n")
    (tmp_path / "caps.part-x-of-2.csv").write_text("")          # not a part
    (tmp_path / "caps.part-0-of-2.jsonl").write_text("")        # another output's part
    assert [os.path.basename(p) for p in find_parts(out)] == [
        "caps.part-0-of-2.csv", "caps.part-1-of-2.csv", "caps.part-1-of-10.csv", "caps.part-3-of-10.csv"]

    # merge: the output's records first as they were, then the parts' new ones in listing order, duplicates
    # dropped, images the listing does not know last; a torn record is not merged
    out = str(tmp_path / "m.jsonl")

    def rec(name: str) -> str:
        return json.dumps({"image": name, "caption": "x", "score": 0.0}) + "\n"
    Path(out).write_text(rec("z") + rec("c"))
    Path(part_path(out, 0, 2)).write_text(rec("e") + rec("a") + rec("c") + rec("unknown") + rec("f")[:10])
    Path(part_path(out, 1, 2)).write_text(rec("b") + rec("d"))
    position = {name: i for i, name in enumerate("abcdef")}.get
    assert merge_parts(out, find_parts(out), position) == 5
    assert Path(out).read_text() == "".join(map(rec, ["z", "c", "a", "b", "d", "e", "unknown"]))
    assert not find_parts(out) and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
