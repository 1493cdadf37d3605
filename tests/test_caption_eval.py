"""`seqgen evaluate MODEL --images DIR --captions FILE [--split FILE]`: caption metrics of a captioning model."""
import json

import pytest

from conftest import run_cli
from seqgen.metrics import caption_scores
from seqgen.tasks.captioning import train_captioning
from test_captioning import shapes_run, write_shapes_dataset
from test_translate_file import tiny_models  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("capeval")
    splits = write_shapes_dataset(d, sizes=(("train", 300), ("valid", 30), ("test", 20)))
    train_captioning(shapes_run(d, steps=60), str(d / "run"), log=lambda m: None)
    return d, splits


def test_evaluate_prints_the_numbers_validation_computed_for_the_same_captions(run, tmp_path):
    d, splits = run
    # the validation decoding (greedy, 12 tokens, no trigram rule) on the validation split: the run's own numbers
    proc = run_cli("evaluate", d / "run" / "best.pt", "--images", d / "images", "--captions", d / "captions.tsv",
                   "--split", d / "valid.txt", "--greedy", "--max-len", 12, "--no-repeat-ngram", 0, "--json",
                   "--out", tmp_path / "caps.jsonl", "--device", "cpu")
    got = json.loads(proc.stdout)
    last = [json.loads(line) for line in open(d / "run" / "metrics.jsonl") if '"eval"' in line][-1]["eval"]
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"):
        assert got[key] == pytest.approx(last[key], abs=1e-9), key
    assert got["images"] == 30 and got["beam"] == 1
    records = [json.loads(line) for line in open(tmp_path / "caps.jsonl")]
    assert [r["image"] for r in records] == [n for n, _ in splits["valid"]]
    refs = [[c] for _, c in splits["valid"]]
    assert caption_scores([r["caption"] for r in records], refs)["cider"] == pytest.approx(got["cider"], abs=1e-12)


def test_evaluate_defaults_to_beam_5_over_every_captioned_image_and_writes_tsv(run, tmp_path):
    d, _ = run
    proc = run_cli("evaluate", d / "run" / "best.pt", "--images", d / "images", "--captions", d / "captions.tsv",
                   "--out", tmp_path / "caps.tsv", "--device", "cpu")
    line = proc.stdout.strip()
    assert line.startswith("BLEU-1 ") and "| ROUGE-L " in line and "| CIDEr-D " in line, line
    assert "(350 images, beam 5)" in line, line
    rows = (tmp_path / "caps.tsv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 350 and all(len(r.split("\t")) == 2 for r in rows)


def test_evaluate_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, tiny_models):
    d, _ = run
    model = d / "run" / "best.pt"
    ghost = tmp_path / "ghost.txt"
    ghost.write_text("valid0000.png\nnot-there.png\n")
    unlisted = tmp_path / "unlisted.txt"
    unlisted.write_text("valid0000.png\n")
    (d / "images" / "valid0000.png").rename(tmp_path / "moved.png")
    try:
        missing_file = run_cli("evaluate", model, "--images", d / "images", "--captions", d / "captions.tsv",
                               "--split", unlisted, "--out", tmp_path / "o.jsonl", check=False)
    finally:
        (tmp_path / "moved.png").rename(d / "images" / "valid0000.png")
    cases = {
        "a split naming an image without captions": (
            [model, "--images", d / "images", "--captions", d / "captions.tsv", "--split", ghost],
            "have no caption in the captions file (not-there.png)"),
        "a translation model": ([tiny_models / "mt.pt", "--images", d / "images", "--captions", d / "captions.tsv"],
                                "translation"),
        "both kinds of flags": ([model, "--images", d / "images", "--captions", d / "captions.tsv", "--src", ghost],
                                "give one set"),
        "no captions": ([model, "--images", d / "images"], "--images and --captions are both required"),
        "no images folder": ([model, "--images", tmp_path / "nope", "--captions", d / "captions.tsv"],
                             "no such folder"),
        "an output format": ([model, "--images", d / "images", "--captions", d / "captions.tsv"], ".jsonl"),
        "a missing model": ([tmp_path / "missing.pt", "--images", d / "images", "--captions", d / "captions.tsv"],
                            "missing.pt"),
    }
    for what, (argv, words) in cases.items():
        out = tmp_path / ("o.csv" if what == "an output format" else "o.jsonl")
        proc = run_cli("evaluate", *argv, "--out", out, check=False)
        assert proc.returncode == 2, (what, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, (what, proc.stderr)
        assert not out.exists(), what
    assert missing_file.returncode == 2 and "are not files in --images" in missing_file.stderr, missing_file.stderr
    assert "valid0000.png" in missing_file.stderr and not (tmp_path / "o.jsonl").exists()
