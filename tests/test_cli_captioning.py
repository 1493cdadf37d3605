"""CLI round trip for captioning: `seqgen train captioning`, `seqgen caption` (JSONL/CSV, resume, hostile
folders, exit codes) and the errors a user meets."""
import csv
import json
import os

import pytest
from PIL import Image

from conftest import run_cli
from seqgen.cli import main
from seqgen.checkpoint import save_checkpoint
from seqgen.decoders.rnn import DecoderConfig
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.tokenizers import TextCodec
from test_captioning import write_shapes_dataset
from test_images import make_hostile_folder


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("clicap")
    splits = write_shapes_dataset(d, sizes=(("train", 60), ("valid", 8), ("test", 6)), seed=3)
    out = d / "run"
    proc = run_cli("train", "captioning", "--images", d / "images", "--captions", d / "captions.tsv",
                   "--train-split", d / "train.txt", "--valid-split", d / "valid.txt", "--backbone", "tiny",
                   "--freeze", "false", "--image-size", 32, "--num-workers", 0, "--min-freq", 1,
                   "--cell", "gru", "--emb", 16, "--hidden", 32, "--max-steps", 6, "--eval-every", 3,
                   "--batch-size", 16, "--progress", "false", "--eval-max-len", 10, "--out", out)
    assert "best validation CIDEr-D" in proc.stdout
    return d, splits, out


def test_train_then_caption_jsonl_and_csv(cli_run, tmp_path):
    d, splits, out = cli_run
    assert {"best.pt", "last.pt", "metrics.jsonl"} <= set(os.listdir(out))
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, _ in splits["test"]:
        Image.open(d / "images" / name).save(folder / name)
    expect = make_hostile_folder(folder)
    n_good = 6 + sum(r is None for r in expect.values())
    jsonl = tmp_path / "caps.jsonl"
    proc = run_cli("caption", out / "best.pt", folder, "--out", jsonl, "--beam", 3, "--batch-size", 4,
                   "--max-len", 10, "--quiet", "--skipped", tmp_path / "skipped.tsv")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    names = [os.path.basename(r["image"]) for r in records]
    assert len(names) == n_good and names == sorted(names)          # the shapes + the good hostile files
    assert "skipped" in proc.stderr and "truncated" in proc.stderr and "Traceback" not in proc.stderr
    assert len((tmp_path / "skipped.tsv").read_text().splitlines()) == len(expect) + 6 - n_good
    # rerun: nothing new, nothing duplicated
    proc = run_cli("caption", out / "best.pt", folder, "--out", jsonl, "--quiet", "--max-len", 10)
    assert "already there" in proc.stderr
    assert len(jsonl.read_text().splitlines()) == n_good
    # CSV, greedy, explicit files
    csv_out = tmp_path / "caps.csv"
    run_cli("caption", out / "best.pt", *[folder / n for n, _ in splits["test"][:2]], "--out", csv_out, "--greedy",
            "--quiet", "--num-workers", 0)
    with open(csv_out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(r["image"]) for r in rows] == [n for n, _ in splits["test"][:2]]
    float(rows[0]["score"])


def cli(capsys, *args) -> tuple[int, str]:
    """`seqgen ARGS` in this process (fast; the subprocess round trip is tested above): (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_caption_errors(cli_run, tmp_path, capsys):
    d, splits, out = cli_run
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"")
    code, err = cli(capsys, "caption", out / "best.pt", tmp_path / "bad", "--out", tmp_path / "c.jsonl", "--quiet")
    assert code == 1 and "no image could be captioned" in err and "empty file" in err
    codec = TextCodec.build("char", ["abc"])
    lm = Seq2Seq(ModelConfig(task="lm", decoder=DecoderConfig(emb=8, hidden=8)), tgt=codec)
    save_checkpoint(str(tmp_path / "lm.pt"), lm.to_payload())
    cases = [
        ([tmp_path / "lm.pt", d / "images", "--out", tmp_path / "a.jsonl"], "is a language model: use it with `seqgen generate`; this needs an image captioning model"),
        ([out / "best.pt", d / "images", "--out", tmp_path / "a.txt"], "use .jsonl or .csv"),
        ([out / "best.pt", tmp_path / "nope", "--out", tmp_path / "a.jsonl"], "no such file or folder"),
        ([out / "best.pt", d / "images", "--out", tmp_path / "a.jsonl", "--beam", 0], "--beam must be between 1 and 1,000, got 0"),
    ]
    for args, message in cases:
        code, err = cli(capsys, "caption", *args, "--quiet")
        assert code == 2 and message in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_errors_and_resume(cli_run, tmp_path, capsys):
    d, _, out = cli_run
    code, err = cli(capsys, "train", "captioning", "--captions", d / "captions.tsv", "--out", tmp_path / "r")
    assert code == 2 and "--images is required" in err
    code, err = cli(capsys, "train", "captioning", "--resume", "--out", out, "--max-steps", 8, "--min-freq", 3)
    assert code == 2 and "--min-freq cannot change on --resume" in err
    code, err = cli(capsys, "train", "captioning", "--images", d / "images", "--captions", d / "captions.tsv",
                    "--out", out)
    assert code == 2 and "already holds a trained model" in err
    proc = run_cli("train", "captioning", "--resume", "--out", out, "--max-steps", 8)
    assert "resumed from" in proc.stdout + proc.stderr and "done: 8 steps" in proc.stdout
