"""CLI smoke tests through subprocess: train lm, generate, demo, and the bad-input errors."""
import os

import pytest

from conftest import run_cli

TEXT = "to be or not to be, that is the question.\n" * 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    text = d / "input.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = d / "run"
    run_cli("train", "lm", "--text", text, "--level", "char", "--out", out, "--hidden", 48, "--emb", 16,
            "--layers", 1, "--seq-len", 32, "--batch-size", 8, "--max-steps", 30, "--eval-every", 15,
            "--lr", "0.01", "--progress", "false", "--seed", 2)
    return d, text, out


def test_train_writes_checkpoints_and_log(trained):
    _, _, out = trained
    assert {"best.pt", "last.pt", "metrics.jsonl"} <= set(os.listdir(out))


def test_plot_saves_loss_curve_png(trained, tmp_path):
    _, _, out = trained
    png = tmp_path / "curves.png"
    run_cli("plot", out, "--out", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run_cli("plot", tmp_path / "nope", check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_generate_is_deterministic_for_a_seed(trained):
    _, _, out = trained
    a = run_cli("generate", out / "best.pt", "--prompt", "to be", "--temperature", "0.9", "--max-len", 40,
                "--seed", 7).stdout
    b = run_cli("generate", out / "best.pt", "--prompt", "to be", "--temperature", "0.9", "--max-len", 40,
                "--seed", 7).stdout
    assert a == b and a.startswith("to be")
    beam = run_cli("generate", out / "best.pt", "--prompt", "to", "--beam", 3, "--max-len", 20).stdout
    assert beam.startswith("to")


@pytest.mark.parametrize("args, message", [
    (["--prompt", "zebra"], "never saw"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-1"], "--temperature"),
])
def test_generate_bad_input_is_one_clear_line(trained, args, message):
    _, _, out = trained
    proc = run_cli("generate", out / "best.pt", *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_train_bad_inputs(trained, tmp_path):
    d, text, out = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("ok line\ncaf\xe9\n".encode("latin-1"))
    cases = [
        (["--text", tmp_path / "missing.txt"], "no such file"),
        (["--text", empty], "empty"),
        (["--text", latin], "latin1.txt:2:4: invalid UTF-8"),
        (["--text", tmp_path], "is a directory"),
    ]
    for extra, message in cases:
        proc = run_cli("train", "lm", *extra, "--out", tmp_path / "new", "--max-steps", 2, check=False)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # an existing run is never overwritten
    before = (out / "best.pt").read_bytes()
    proc = run_cli("train", "lm", "--text", text, "--out", out, "--max-steps", 2, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (out / "best.pt").read_bytes() == before


def test_checkpoint_errors(trained, tmp_path):
    _, _, out = trained
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes((out / "best.pt").read_bytes()[:1000])
    proc = run_cli("generate", truncated, check=False)
    assert proc.returncode == 2 and "truncated" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_runs_offline(tmp_path):
    proc = run_cli("demo", "--train", "--seconds", 4, "--out", tmp_path / "demo", timeout=240)
    assert "temperature 0.5" in proc.stdout and "beam search" in proc.stdout
    assert (tmp_path / "demo" / "best.pt").exists()


@pytest.mark.parametrize("level", ["word", "subword"])
def test_word_and_subword_levels_train_and_generate(tmp_path, level):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat .\nthe dog sat on the log .\n" * 30, encoding="utf-8")
    out = tmp_path / level
    run_cli("train", "lm", "--text", text, "--level", level, "--vocab-size", 40, "--out", out, "--hidden", 32,
            "--emb", 16, "--layers", 1, "--seq-len", 16, "--batch-size", 8, "--max-steps", 60,
            "--eval-every", 60, "--lr", "0.02", "--progress", "false")
    gen = run_cli("generate", out / "best.pt", "--prompt", "the cat", "--greedy", "--max-len", 12).stdout
    assert gen.startswith("the cat")


def test_checkpoint_of_another_task_is_refused(tmp_path):
    from seqgen.checkpoint import save_checkpoint
    from seqgen.decoders.rnn import DecoderConfig
    from seqgen.encoders.rnn import RNNEncoderConfig
    from seqgen.model import ModelConfig, Seq2Seq
    from seqgen.tokenizers import TextCodec

    codec = TextCodec.build("word", ["a b c"])
    model = Seq2Seq(ModelConfig(task="translation", decoder=DecoderConfig(emb=8, hidden=8),
                                text_encoder=RNNEncoderConfig(emb=8, hidden=8)), tgt=codec, src=codec)
    save_checkpoint(str(tmp_path / "mt.pt"), model.to_payload())
    proc = run_cli("generate", tmp_path / "mt.pt", "--prompt", "a", check=False)
    assert proc.returncode == 2 and "is a translation model: use it with `seqgen translate` or `seqgen evaluate`; this needs a language model" in proc.stderr
    assert "Traceback" not in proc.stderr
