"""Hostile file names, paths and outputs (issue #21, second hostile review): each test fails without its fix.

Spreadsheet formulas in CSV cells, control characters on the terminal, image names leading out of --images,
two processes writing one run folder or output file, outputs that are inputs, resume with the folder spelled
another way, attention-map names that collide, and file names with line breaks, tabs or undecodable bytes.
(Disk-full cases are in test_faults.py.)
"""
import csv
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager

import pytest
from conftest import write_image_folder, write_tiny_captioner
from PIL import Image

import seqgen
from seqgen.checkpoint import save_checkpoint
from seqgen.cli import build_parser, main
from seqgen.config import flags_to_dict
from seqgen.data.captions import CaptionDataConfig, load_splits
from seqgen.generation import GenerationConfig
from seqgen.log import printable, quiet, warning
from seqgen.model import load_model
from seqgen.outputs import output_lock_path, run_folder_lock_path, spreadsheet_cell, unspreadsheet_cell
from seqgen.runs import holds_run_folder
from seqgen.tasks import caption_folder as folder_module
from seqgen.tasks.caption_folder import caption_folder, read_done

GEN = GenerationConfig(beam=1, max_len=4)
FAST = ["--quiet", "--num-workers", 0, "--beam", 1, "--max-len", 4, "--device", "cpu"]
TINY_LM = ["--level", "char", "--hidden", 8, "--emb", 8, "--layers", 1, "--seq-len", 16, "--batch-size", 4,
           "--max-steps", 2, "--eval-every", 2, "--valid-fraction", "0.1", "--progress", "false", "--device", "cpu"]
# what a terminal acts on: C0 controls, DEL, C1 controls, Unicode line/paragraph separators
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    """(the model, its checkpoint path): an untrained tiny captioner with attention (nonsense, deterministic)."""
    path = write_tiny_captioner(tmp_path_factory.mktemp("captioner") / "model.pt")
    return load_model(str(path), task="captioning"), path


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    """An untrained word-level translation checkpoint."""
    from seqgen.decoders.rnn import DecoderConfig
    from seqgen.encoders.rnn import RNNEncoderConfig
    from seqgen.model import ModelConfig, Seq2Seq
    from seqgen.tokenizers import TextCodec
    codec = TextCodec.build("word", ["a b c d e"])
    model = Seq2Seq(ModelConfig(task="translation", decoder=DecoderConfig(emb=8, hidden=8),
                                text_encoder=RNNEncoderConfig(emb=8, hidden=8)), tgt=codec, src=codec)
    path = tmp_path_factory.mktemp("translator") / "mt.pt"
    save_checkpoint(str(path), model.to_payload())
    return path


def png(path, seed: int = 0):
    """A small image at `path` (the format from its extension)."""
    Image.new("RGB", (32, 32), ((seed * 40) % 256, (seed * 90) % 256, 128)).save(path)
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    """`seqgen ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(status: int, err: str, *fragments: str) -> str:
    assert status == 2 and err.endswith("\n") and err.count("\n") == 1 and err.startswith("seqgen: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def snapshot(folder) -> dict:
    """Every file under `folder` (but lock files) and its bytes."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names if not n.endswith(".lock")}


# -- 1. CSV formula injection ------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["=1+2", "+cmd", "-2", "@SUM(A1)", "\tx", "\rx", "'quoted", "''", "'=x", "plain",
                                  "", "a=b", "'"])
def test_spreadsheet_cells_never_start_a_formula_and_read_back_as_written(text):
    cell = spreadsheet_cell(text)
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")) and unspreadsheet_cell(cell) == text


def test_caption_csv_and_skipped_tsv_cells_are_neutralised_and_resume_reads_them(captioner, tmp_path, monkeypatch):
    model, _ = captioner
    names = ["=cmd|' -C calc'!A0.png", "+1+2.png", "-3.png", "@SUM(A1).png", "'quoted.png", "plain.png"]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(names):
        png(folder / name, i)
    (folder / "=broken.jpg").write_bytes(b"")
    monkeypatch.chdir(folder)         # `seqgen caption MODEL . --out x.csv`: the keys are the bare names
    out = tmp_path / "caps.csv"
    summary = caption_folder(model, ["=broken.jpg", "."], str(out), GEN, num_workers=0, progress=False, log=quiet,
                             skipped_path=str(tmp_path / "skipped.tsv"))
    assert summary.captioned == len(names)
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert sorted(row[0] for row in rows) == sorted(spreadsheet_cell(n) for n in names)
    assert not [c for row in rows for c in row[:2] if c.startswith(("=", "+", "-", "@", "\t", "\r"))]
    assert (tmp_path / "skipped.tsv").read_text(encoding="utf-8") == "'=broken.jpg\tempty file\n"
    assert read_done(str(out)) == set(names)
    again = caption_folder(model, ["."], str(out), GEN, num_workers=0, progress=False, log=quiet)
    assert again.captioned == 0 and again.already_done == len(names)


# -- 3. terminal escapes -----------------------------------------------------------------------------------

def test_printable_escapes_every_control_character_and_nothing_else():
    assert printable("a\x1b]0;owned\x07b") == "a\\x1b]0;owned\\x07b"
    assert printable("\x00\t\n\r\x0b\x7f\x85\x9b\u2028\u2029") == "\\x00\\t\\n\\r\\x0b\\x7f\\x85\\x9b\\u2028\\u2029"
    assert printable("caf\udce9.jpg") == "caf\\udce9.jpg"              # an undecodable byte of a file name
    text = "héllo wörld 中文 😀 /tmp/a b.jpg \\x1b"
    assert printable(text) == text
    every = "".join(map(chr, range(0x200)))
    assert not CONTROL.search(printable(every)) and printable(printable(every)) == printable(every)
    assert warning("bad \x1b[2J name") == "seqgen: warning: bad \\x1b[2J name"


EVIL = "\x1b]0;owned\x07\x1b[2J\x9b31m"


def test_control_characters_in_file_names_never_reach_the_terminal(captioner, tmp_path, capsys):
    _, ckpt = captioner
    # an error line naming the file
    status, out, err = cli(capsys, "train", "lm", "--text", tmp_path / f"{EVIL}.txt", "--out", tmp_path / "run")
    assert_one_error_line(status, err, "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m.txt: no such file")
    assert not CONTROL.search(err.replace("\n", ""))
    # the caption summary and skip listing
    folder = write_image_folder(tmp_path / f"photos{EVIL}", 2)
    (folder / f"{EVIL}.jpg").write_bytes(b"")
    status, out, err = cli(capsys, "caption", ckpt, folder, "--out", tmp_path / "caps.jsonl", *FAST)
    assert status == 0 and "skipped" in err and "\\x1b[2J\\x9b31m.jpg: empty file" in err
    assert not CONTROL.search(err.replace("\n", "")) and len(err.splitlines()) == 2
    # progress lines of training (the Trainer's log) and the result line
    text = tmp_path / f"text{EVIL}.txt"
    text.write_text("lorem ipsum dolor sit amet\n" * 20)
    status, out, err = cli(capsys, "train", "lm", "--text", text, "--out", tmp_path / f"run{EVIL}", *TINY_LM)
    assert status == 0 and "done: 2 steps" in out and "text\\x1b]0;owned" in out + err
    assert not CONTROL.search((out + err).replace("\n", ""))


# -- 4. image names leading out of --images ----------------------------------------------------------------

def test_image_names_outside_images_are_refused_without_saying_whether_they_exist(tmp_path, capsys):
    data, images = tmp_path / "data", tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in range(4):
        png(images / f"in{i}.png", i)
    png(tmp_path / "secret.png", 9)
    os.symlink(tmp_path / "secret.png", images / "link.png")
    captions = data / "captions.tsv"
    lines = set()
    for name in ["../../secret.png", "../../nothing.png", str(tmp_path / "secret.png"), "/nonexistent/x.png",
                 "link.png"]:
        captions.write_text("".join(f"in{i}.png\ta red circle\n" for i in range(4)) + f"{name}\ta blue square\n")
        status, _, err = cli(capsys, "train", "captioning", "--images", images, "--captions", captions,
                             "--out", tmp_path / "run", "--backbone", "tiny", "--image-size", 32)
        assert_one_error_line(status, err, "1 image name(s) lead outside --images", "--allow-outside-images")
        lines.add(err.replace(repr(name), "NAME"))
        assert not (tmp_path / "run").exists()
    assert len(lines) == 1, lines       # the same line whether the file outside exists or not
    # the user may opt in
    args = build_parser().parse_args(["train", "captioning", "--out", "x", "--allow-outside-images"])
    assert flags_to_dict(args)["data"]["allow_outside_images"] is True
    captions.write_text("".join(f"in{i}.png\ta red circle\n" for i in range(4)) + "../../secret.png\ta blue square\n")
    splits = load_splits(CaptionDataConfig(images=str(images), captions=str(captions), valid_fraction=0.2,
                                           allow_outside_images=True), seed=1)
    assert "../../secret.png" in splits.train + splits.valid


# -- 5. one writer per run folder and per output file ------------------------------------------------------

HOLDER = ("import sys\nfrom seqgen.outputs import acquire_lock\nlock = acquire_lock(sys.argv[1], 'it')\n"
          "print('held', flush=True)\nsys.stdin.read()\nlock.release()\n")


@contextmanager
def held_by_another_process(lock_path):
    """Another process holds `lock_path` (taken as seqgen takes it) during the block; yields its pid."""
    root = os.path.dirname(os.path.dirname(seqgen.__file__))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=root))
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc.pid
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


def test_a_second_training_run_in_a_locked_run_folder_is_refused_and_touches_nothing(tmp_path, capsys):
    text, out = tmp_path / "text.txt", tmp_path / "run"
    text.write_text("lorem ipsum dolor sit amet\n" * 20)
    assert cli(capsys, "train", "lm", "--text", text, "--out", out, *TINY_LM)[0] == 0
    before = snapshot(out)
    with held_by_another_process(run_folder_lock_path(str(out))) as pid:
        for again in (["--resume", "--max-steps", 4], []):
            status, _, err = cli(capsys, "train", "lm", "--text", text, "--out", out, *TINY_LM, *again)
            assert_one_error_line(status, err, f"the run folder {out} is in use by another seqgen (pid {pid} on ",
                                  str(out / ".seqgen.lock"), "nothing was changed")
            assert snapshot(out) == before
    with held_by_another_process(run_folder_lock_path(str(tmp_path / "new"))):   # a run folder being made
        status, _, err = cli(capsys, "train", "lm", "--text", text, "--out", tmp_path / "new", *TINY_LM)
        assert_one_error_line(status, err, "is in use by another seqgen")
    assert not (tmp_path / "new").exists()          # the holder made it for its lock, and removed it
    status, _, err = cli(capsys, "train", "lm", "--text", text, "--out", out, *TINY_LM, "--resume", "--max-steps", 4)
    assert status == 0, err
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "metrics.jsonl", "prepared"]   # the lock file went


def test_a_second_writer_of_a_locked_output_file_is_refused(captioner, translator, tmp_path, capsys):
    _, ckpt = captioner
    folder = write_image_folder(tmp_path / "photos", 2)
    source = tmp_path / "src.txt"
    source.write_text("a b c\n")
    for out, command in [(tmp_path / "caps.jsonl", ["caption", ckpt, folder, *FAST]),
                         (tmp_path / "hyp.txt", ["translate", translator, source, "--greedy"])]:
        out.write_text("earlier work\n")
        with held_by_another_process(output_lock_path(str(out))) as pid:
            status, _, err = cli(capsys, *command, "--out", out)
            assert_one_error_line(status, err, f"--out {out} is in use by another seqgen (pid {pid} on ")
            assert out.read_text() == "earlier work\n"
        out.unlink()
        assert cli(capsys, *command, "--out", out)[0] == 0
        assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".lock")) == []


def test_under_torchrun_only_process_0_takes_the_run_folder_lock(tmp_path, monkeypatch):
    seen = []

    @holds_run_folder
    def train(run, out_dir, *, resume=False):
        seen.append(os.path.exists(run_folder_lock_path(out_dir)))

    train(None, str(tmp_path / "a"))
    assert seen == [True] and not (tmp_path / "a").exists()    # made for the lock, removed: nothing was written
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    train(None, str(tmp_path / "b"))
    assert seen == [True, False]


# -- 6. outputs that are inputs ----------------------------------------------------------------------------

def test_an_output_that_is_an_input_is_refused_and_nothing_is_written(captioner, translator, tmp_path, capsys):
    _, ckpt = captioner
    folder = write_image_folder(tmp_path / "photos", 3)
    src, ref, metrics = tmp_path / "src.txt", tmp_path / "ref.txt", tmp_path / "run" / "metrics.jsonl"
    src.write_text("a b c\n")
    ref.write_text("c b a\n")
    metrics.parent.mkdir()
    metrics.write_text('{"step": 1, "loss": 2.0}\n')
    os.link(src, tmp_path / "src-hardlink.txt")
    os.symlink(ref, tmp_path / "ref-symlink.txt")
    out = tmp_path / "caps.jsonl"
    before, model_bytes = snapshot(tmp_path), translator.read_bytes()
    never = "seqgen never writes over its inputs (nothing was written)"
    for args, says in [
        (["translate", translator, src, "--out", translator], f"--out {translator} is MODEL {translator}"),
        (["translate", translator, src, "--out", tmp_path / "src-hardlink.txt"], "is the input"),
        (["evaluate", translator, "--src", src, "--ref", ref, "--out", ref], f"--out {ref} is --ref {ref}"),
        (["evaluate", translator, "--src", src, "--ref", ref, "--out", tmp_path / "ref-symlink.txt"], "is --ref"),
        (["evaluate", translator, "--src", src, "--ref", ref, "--out", translator], "is MODEL"),
        (["plot", metrics.parent, "--out", metrics], "is the metrics log"),
        (["caption", ckpt, folder, "--out", out, "--skipped", out], "--skipped"),
        (["caption", ckpt, folder / "img001.png", "--out", out, "--skipped", folder / "img001.png"], "is the input"),
        (["caption", ckpt, folder, "--out", out, "--skipped", folder / "img002.png"], "is an image of the input"),
        (["caption", ckpt, folder, "--out", out, "--attention-png", folder], "--attention-png"),
        (["caption", ckpt, folder, "--out", out, "--attention-png", folder / "maps", "--recursive"], "--recursive"),
    ]:
        status, _, err = cli(capsys, *args, *(FAST if args[0] == "caption" else []))
        assert_one_error_line(status, err, says)
        assert never in err or "is the same file as --out" in err or "would caption its maps" in err, err
        assert snapshot(tmp_path) == before and translator.read_bytes() == model_bytes and not out.exists()


# -- 9. resume whatever the folder's spelling --------------------------------------------------------------

@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_resume_recognises_the_folder_however_it_is_spelled(captioner, tmp_path, monkeypatch, ext):
    model, _ = captioner
    write_image_folder(tmp_path / "photos", 5)
    os.symlink(tmp_path / "photos", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    out = f"caps.{ext}"
    assert caption_folder(model, ["photos"], out, GEN, num_workers=0, progress=False, log=quiet).captioned == 5
    written = open(out, "rb").read()
    assert read_done(out) == {f"photos/img00{i}.png" for i in range(5)}       # records keep the spelling
    for spelling in [str(tmp_path / "photos"), "./photos/", "link", str(tmp_path / "link") + "/", "photos"]:
        summary = caption_folder(model, [spelling], out, GEN, num_workers=0, progress=False, log=quiet)
        assert (summary.captioned, summary.already_done) == (0, 5), spelling
    assert open(out, "rb").read() == written
    # the same folder twice in one command: each image once
    twice = caption_folder(model, ["photos", str(tmp_path / "photos")], f"twice.{ext}", GEN, num_workers=0,
                           progress=False, log=quiet)
    assert twice.captioned == 5


# -- 10. attention-map names -------------------------------------------------------------------------------

def test_attention_maps_never_overwrite_each_other_and_the_count_is_true(captioner, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    model, _ = captioner
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i, name in enumerate(["a b.png", "a_b.png", "x.jpg", "x.png", "x-2.png"]):
        png(a / name, i)
    png(b / "x.png", 7)                                      # the same name in a second input folder
    att = tmp_path / "att"
    summary = caption_folder(model, [str(a), str(b)], str(tmp_path / "caps.jsonl"), GEN, num_workers=0,
                             progress=False, log=quiet, attention_png_dir=str(att))
    maps = sorted(os.listdir(att))
    assert summary.captioned == summary.attention_maps == len(maps) == 6, maps
    # a run killed after its first batch and rerun names every image as the uninterrupted run did
    real, calls = folder_module.caption_tensor, []

    def killed_in_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(folder_module, "caption_tensor", killed_in_second_batch)
    att2, out2 = tmp_path / "att2", str(tmp_path / "caps2.jsonl")
    with pytest.raises(KeyboardInterrupt):
        caption_folder(model, [str(a), str(b)], out2, GEN, batch_size=2, num_workers=0, progress=False, log=quiet,
                       attention_png_dir=str(att2))
    monkeypatch.undo()
    rest = caption_folder(model, [str(a), str(b)], out2, GEN, batch_size=2, num_workers=0, progress=False,
                          log=quiet, attention_png_dir=str(att2))
    assert rest.already_done == 2 and rest.attention_maps == 4 and sorted(os.listdir(att2)) == maps


# -- 17. line breaks, tabs and undecodable bytes in file names ---------------------------------------------

@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_file_names_with_line_breaks_tabs_and_undecodable_bytes(captioner, tmp_path, capsys, ext):
    _, ckpt = captioner
    folder = tmp_path / "photos"
    folder.mkdir()
    good = ["new\nline.png", "tab\there.png", os.fsdecode(b"caf\xe9.png"), "cr\rhere.png", "plain.png"]
    for i, name in enumerate(good):
        png(folder / name, i)
    for name in ["bad\nname.jpg", "bad\tname.jpg", os.fsdecode(b"bad\xff.jpg")]:
        (folder / name).write_bytes(b"")
    out, skipped = tmp_path / f"caps.{ext}", tmp_path / "skipped.tsv"
    status, _, err = cli(capsys, "caption", ckpt, folder, "--out", out, "--skipped", skipped, *FAST)
    assert status == 0 and len(err.splitlines()) == 1 + 3 and not CONTROL.search(err.replace("\n", ""))
    data = out.read_bytes()
    text = data.decode("utf-8")                                     # valid UTF-8, whatever the names
    if ext == "jsonl":
        records = [json.loads(line) for line in text.split("\n")[:-1]]
        assert sorted(r["image"] for r in records) == sorted(str(folder / n) for n in good)
    else:
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        assert len(rows) == 1 + len(good) and len(text.split("\n")) == 2 + len(good)   # one line per record
    lines = skipped.read_bytes().decode("utf-8").split("\n")[:-1]
    assert len(lines) == 3 and all(line.count("\t") == 1 for line in lines)
    lines = []                          # resume finds every image; any `log` gets one line per skipped image
    model = load_model(str(ckpt), task="captioning")
    summary = caption_folder(model, [str(folder)], str(out), GEN, num_workers=0, progress=False, log=lines.append)
    assert summary.already_done == len(good) and summary.captioned == 0 and out.read_bytes() == data
    assert len(lines) == 4 and not CONTROL.search("".join(lines))
