"""`--init-from MODEL`: a new run from another model's weights and vocabularies (all three tasks, torchrun)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_cli
from seqgen.checkpoint import load_checkpoint
from seqgen.errors import SeqgenError
from seqgen.model import load_model
from seqgen.tasks.lm import train_lm
from test_captioning import shapes_run, write_shapes_dataset
from test_cli_translation import TINY, reverse_pairs, write_lines
from test_lm_training import tiny_run

# Task A and task B share their characters but not their text: what A learnt (spelling, spaces) helps on B.
TEXT_A = "the quick brown fox jumps over the lazy dog. " * 60
TEXT_B = "a lazy brown dog sleeps; the quick fox jumps over it. " * 50


def quiet(_msg: str) -> None:
    pass


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def lm_a(tmp_path_factory):
    d = tmp_path_factory.mktemp("warm_lm")
    (d / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (d / "b.txt").write_text(TEXT_B, encoding="utf-8")
    train_lm(tiny_run(d / "a.txt", max_steps=150), str(d / "a"), log=quiet)
    return d


def test_lm_started_from_task_a_beats_the_same_steps_from_scratch_on_task_b(lm_a, tmp_path):
    d = lm_a
    scratch = train_lm(tiny_run(d / "b.txt", max_steps=30, eval_every=10), str(tmp_path / "scratch"), log=quiet)
    warm = train_lm(tiny_run(d / "b.txt", max_steps=30, eval_every=10, init_from=str(d / "a" / "best.pt")),
                    str(tmp_path / "warm"), log=quiet)
    assert warm.best < 0.7 * scratch.best, (warm.best, scratch.best)
    # a new run: its own step count, schedule and best score, and the record of where it started
    assert warm.step == 30
    evals = [r for r in metrics(tmp_path / "warm") if "eval" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    payload = load_checkpoint(str(tmp_path / "warm" / "last.pt"))
    run = json.loads(payload["run_config"])
    assert run["train"]["init_from"] == str(d / "a" / "best.pt")
    a = load_model(str(d / "a" / "best.pt"))
    assert load_model(str(tmp_path / "warm" / "best.pt")).tgt == a.tgt       # A's vocabulary, not one built on B


def test_lm_warm_start_keeps_the_weights_and_takes_a_new_dropout(lm_a, tmp_path):
    """Step 0 of a warm run is the source model (its validation loss on A's text is A's best), and a training-only
    setting such as dropout is the user's."""
    d = lm_a
    a = load_model(str(d / "a" / "best.pt"))
    run = tiny_run(d / "a.txt", max_steps=1, eval_every=1, lr=1e-12, init_from=str(d / "a" / "best.pt"))
    run.decoder.dropout = 0.25
    state = train_lm(run, str(tmp_path / "w"), overrides={"decoder": {"dropout": 0.25}}, log=quiet)
    first = load_checkpoint(str(d / "a" / "last.pt"))
    assert state.best == pytest.approx(json.loads(first["trainer"]["state"])["best"], abs=1e-4)
    warm = load_model(str(tmp_path / "w" / "best.pt"))
    assert warm.config.decoder.dropout == 0.25 and warm.config.decoder.hidden == a.config.decoder.hidden


def test_lm_warm_start_refuses_architecture_and_vocabulary_changes_naming_each(lm_a, tmp_path):
    d = lm_a
    run = tiny_run(d / "b.txt", init_from=str(d / "a" / "best.pt"))
    out = tmp_path / "w"
    with pytest.raises(SeqgenError) as e:
        train_lm(run, str(out), overrides={"decoder": {"hidden": 128, "layers": 2, "dropout": 0.1},
                                           "data": {"level": "word"}}, log=quiet)
    msg = str(e.value)
    assert "\n" not in msg
    assert "decoder.hidden 128 (the model's: 64)" in msg and "decoder.layers 2 (the model's: 1)" in msg
    assert "data.level" in msg and "dropout" not in msg
    assert not out.exists()


def test_init_from_and_resume_keep_their_meanings(lm_a, tmp_path):
    d = lm_a
    src = str(d / "a" / "best.pt")
    out = str(tmp_path / "w")
    train_lm(tiny_run(d / "b.txt", max_steps=10, eval_every=10, init_from=src), out, log=quiet)
    # --resume continues the warm run (its own last.pt), and --init-from cannot change under it
    state = train_lm(tiny_run(d / "b.txt", max_steps=20, eval_every=10, init_from=src), out, resume=True,
                     overrides={"train": {"max_steps": 20}}, log=quiet)
    assert state.step == 20
    with pytest.raises(SeqgenError, match="--init-from cannot change on --resume"):
        train_lm(tiny_run(d / "b.txt", max_steps=30), out, resume=True,
                 overrides={"train": {"max_steps": 30, "init_from": str(tmp_path / "other.pt")}}, log=quiet)
    # a run folder that holds a model is still never overwritten
    with pytest.raises(SeqgenError, match="already holds a trained model"):
        train_lm(tiny_run(d / "b.txt", init_from=src), out, log=quiet)


def test_init_from_bad_models_are_one_line_and_write_nothing(lm_a, tmp_path):
    d = lm_a
    cases = {str(tmp_path / "missing.pt"): "no such checkpoint file",
             str(d / "a.txt"): "a.txt",
             f"{d}/a/best.pt,{d}/a/last.pt": "one model starts a run",
             "no-such-shipped-model": "no-such-shipped-model"}
    for source, words in cases.items():
        out = tmp_path / f"w{abs(hash(source))}"
        with pytest.raises(SeqgenError) as e:
            train_lm(tiny_run(d / "b.txt", init_from=source), str(out), log=quiet)
        assert "\n" not in str(e.value) and words in str(e.value) and "--init-from" in str(e.value), str(e.value)
        assert not out.exists()


# -- translation and captioning through the CLI ----------------------------------------------------------

@pytest.fixture(scope="module")
def mt_a(tmp_path_factory):
    d = tmp_path_factory.mktemp("warm_mt")
    src, tgt = reverse_pairs(1500, seed=0)
    files = dict(src=write_lines(d / "a.src", src), tgt=write_lines(d / "a.tgt", tgt))
    vsrc, vtgt = reverse_pairs(60, seed=1)
    files.update(vsrc=write_lines(d / "v.src", vsrc), vtgt=write_lines(d / "v.tgt", vtgt))
    bsrc, btgt = reverse_pairs(300, seed=7)
    files.update(bsrc=write_lines(d / "b.src", bsrc), btgt=write_lines(d / "b.tgt", btgt))
    run_cli("train", "translation", "--src-train", files["src"], "--tgt-train", files["tgt"], "--src-valid",
            files["vsrc"], "--tgt-valid", files["vtgt"], "--out", d / "a", *TINY, "--max-steps", 120,
            "--eval-every", 120, "--eval-max-len", 12)
    return d, files


def test_translation_warm_start_and_its_refusals(mt_a, tmp_path):
    d, f = mt_a
    data = ["--src-train", f["bsrc"], "--tgt-train", f["btgt"], "--src-valid", f["vsrc"], "--tgt-valid", f["vtgt"],
            "--lr", "0.003", "--warmup-steps", 5, "--progress", "false", "--max-steps", 20, "--eval-every", 20,
            "--eval-max-len", 12, "--batch-size", 32, "--dropout", "0.1"]
    warm = run_cli("train", "translation", *data, "--init-from", d / "a" / "best.pt", "--out", tmp_path / "warm")
    run_cli("train", "translation", *data, *TINY[:12], "--out", tmp_path / "scratch")
    bleu = {name: json.loads(open(tmp_path / name / "metrics.jsonl").read().splitlines()[-1])["eval"]["bleu"]
            for name in ("warm", "scratch")}
    assert bleu["warm"] > bleu["scratch"] + 20, bleu
    assert f"weights from {d / 'a' / 'best.pt'}" in warm.stdout + warm.stderr
    assert load_model(str(tmp_path / "warm" / "best.pt")).config.decoder.dropout == 0.1
    bad = run_cli("train", "translation", *data, "--init-from", d / "a" / "best.pt", "--out", tmp_path / "bad",
                  "--hidden", 128, "--enc-layers", 2, "--attention", "luong_dot", "--vocab-size", 500, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    for words in ("decoder.hidden 128 (the model's: 64)", "encoder.layers 2 (the model's: 1)",
                  "decoder.attention 'luong_dot' (the model's: 'bahdanau')", "data.vocab_size"):
        assert words in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
    lm = run_cli("train", "lm", "--text", f["src"], "--out", tmp_path / "lm", "--init-from", d / "a" / "best.pt",
                 check=False)
    assert lm.returncode == 2 and "--init-from" in lm.stderr and "translation" in lm.stderr, lm.stderr
    assert not (tmp_path / "lm").exists()


def test_captioning_warm_start_beats_scratch_after_the_same_steps(tmp_path):
    write_shapes_dataset(tmp_path, sizes=(("train", 300), ("valid", 30), ("test", 10)))
    from seqgen.tasks.captioning import train_captioning
    train_captioning(shapes_run(tmp_path, steps=150), str(tmp_path / "a"), log=quiet)
    warm_run = shapes_run(tmp_path, steps=10)
    warm_run.train.init_from = str(tmp_path / "a" / "best.pt")
    warm = train_captioning(warm_run, str(tmp_path / "warm"), log=quiet)
    scratch = train_captioning(shapes_run(tmp_path, steps=10), str(tmp_path / "scratch"), log=quiet)
    assert warm.best > scratch.best + 0.5, (warm.best, scratch.best)
    bad = shapes_run(tmp_path, steps=10)
    bad.train.init_from = str(tmp_path / "a" / "best.pt")
    with pytest.raises(SeqgenError, match=r"encoder.backbone 'resnet18' \(the model's: 'tiny'\)"):
        train_captioning(bad, str(tmp_path / "bad"), overrides={"encoder": {"backbone": "resnet18"}}, log=quiet)


def test_torchrun_warm_start_equals_one_process_accumulating(lm_a, tmp_path):
    """Every process loads the same weights: two processes of one batch each equal one process of two."""
    d = lm_a
    argv = ["train", "lm", "--text", str(d / "b.txt"), "--init-from", str(d / "a" / "best.pt"), "--seq-len", "16",
            "--batch-size", "4", "--max-steps", "4", "--eval-every", "4", "--warmup-steps", "1", "--lr", "0.01",
            "--progress", "false", "--device", "cpu", "--seed", "3", "--amp", "off", "--dropout", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "seqgen.cli", *argv, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=240, env=env, check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_cli(*argv, "--out", tmp_path / "one", "--accumulate", 2)
    a = load_checkpoint(str(tmp_path / "ddp" / "last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "one" / "last.pt"))["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
