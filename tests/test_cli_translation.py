"""`seqgen train translation`, `seqgen translate`, `seqgen evaluate` through subprocess, and their errors."""
import json
import os
import random
import re

import pytest

from conftest import run_cli


def reverse_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    src = [" ".join(str(rng.randrange(10)) for _ in range(rng.randint(2, 6))) for _ in range(n)]
    return src, [" ".join(s.split()[::-1]) for s in src]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


TINY = ["--level", "word", "--enc-emb", 16, "--enc-hidden", 32, "--emb", 16, "--hidden", 64, "--dropout", 0,
        "--enc-dropout", 0, "--attention", "bahdanau", "--lr", "0.01", "--warmup-steps", 10, "--batch-size", 32,
        "--progress", "false", "--log-every", 50]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_tr")
    src, tgt = reverse_pairs(2000, seed=0)
    src[7] = ""                                       # one empty line: skipped and counted
    files = {"src": write_lines(d / "train.src", src), "tgt": write_lines(d / "train.tgt", tgt)}
    vsrc, vtgt = reverse_pairs(60, seed=1)
    files.update(vsrc=write_lines(d / "valid.src", vsrc), vtgt=write_lines(d / "valid.tgt", vtgt))
    tsrc, ttgt = reverse_pairs(80, seed=2)
    files.update(test_src=write_lines(d / "test.src", tsrc), test_ref=write_lines(d / "test.ref", ttgt))
    out = d / "run"
    proc = run_cli("train", "translation", "--src-train", files["src"], "--tgt-train", files["tgt"],
                   "--src-valid", files["vsrc"], "--tgt-valid", files["vtgt"], "--out", out, *TINY,
                   "--max-steps", 150, "--eval-every", 75, "--eval-max-len", 12)
    return d, files, out, proc


def test_train_writes_run_and_warns_about_empty_lines(trained):
    _, _, out, proc = trained
    assert {"best.pt", "last.pt", "metrics.jsonl"} <= set(os.listdir(out))
    assert "skipped 1 pair(s) with an empty line" in proc.stderr
    assert "best validation BLEU" in proc.stdout
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [75, 150] and "bleu" in evals[0]["eval"]


def test_translate_then_evaluate_prints_sacrebleus_own_score(trained):
    import sacrebleu
    d, files, out, _ = trained
    hyp = d / "hyp.txt"
    run_cli("translate", out / "best.pt", files["test_src"], "--out", hyp, "--beam", 3, "--max-len", 12)
    hyps = hyp.read_text(encoding="utf-8").splitlines()
    refs = files["test_ref"].read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs) == 80
    proc = run_cli("evaluate", out / "best.pt", "--src", files["test_src"], "--ref", files["test_ref"],
                   "--beam", 3, "--max-len", 12, "--out", d / "hyp2.txt")
    assert (d / "hyp2.txt").read_text(encoding="utf-8").splitlines() == hyps
    bleu_line, chrf_line = proc.stdout.strip().splitlines()
    expected = sacrebleu.corpus_bleu(hyps, [refs])
    assert bleu_line.startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert float(re.search(r" = ([\d.]+) ", bleu_line).group(1)) == round(expected.score, 2)
    assert chrf_line.startswith("chrF2|") and float(chrf_line.split(" = ")[1]) == round(
        sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
    as_json = json.loads(run_cli("evaluate", out / "best.pt", "--src", files["test_src"], "--ref",
                                 files["test_ref"], "--beam", 3, "--max-len", 12, "--json").stdout)
    assert as_json["bleu"] == pytest.approx(expected.score, abs=1e-9)


def test_translate_stdin_nbest_and_attention_pngs(trained, tmp_path):
    import subprocess
    import sys
    _, files, out, _ = trained
    proc = subprocess.run([sys.executable, "-m", "seqgen.cli", "translate", str(out / "best.pt"), "--greedy",
                           "--max-len", "12"], input="1 2 3\n\n4 5\n", capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    assert "1 empty line(s)" in proc.stderr
    five = write_lines(tmp_path / "five.src", files["test_src"].read_text(encoding="utf-8").splitlines()[:5])
    nbest = run_cli("translate", out / "best.pt", five, "--beam", 3, "--n-best", 3, "--max-len", 12,
                    "--attention-png", tmp_path / "att").stdout.splitlines()
    assert len(nbest) == 3 * 5
    first = [line.split("\t") for line in nbest[:3]]
    assert [f[0] for f in first] == ["1", "1", "1"]
    scores = [float(f[1]) for f in first]
    assert scores == sorted(scores, reverse=True)
    pngs = sorted(os.listdir(tmp_path / "att"))
    assert pngs == [f"{i:05d}.png" for i in range(1, 6)]


def assert_one_line_error(args, message):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, (args, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_decoding_bad_inputs_are_one_clear_line(trained, tmp_path):
    from seqgen.checkpoint import save_checkpoint
    from seqgen.decoders.rnn import DecoderConfig
    from seqgen.model import ModelConfig, Seq2Seq
    from seqgen.tokenizers import TextCodec
    _, files, out, _ = trained
    short = write_lines(tmp_path / "short.tgt", ["1"] * 5)
    latin = tmp_path / "latin1.src"
    latin.write_bytes(b"1 2\n3 \xe9 4\n")
    lm = Seq2Seq(ModelConfig(task="lm", decoder=DecoderConfig(emb=8, hidden=8)), tgt=TextCodec.build("char", ["ab"]))
    save_checkpoint(str(tmp_path / "lm.pt"), lm.to_payload())
    for args, message in [
        (["evaluate", out / "best.pt", "--src", files["test_src"], "--ref", short],
         f"{files['test_src']} has 80 lines but {short} has 5"),
        (["translate", out / "best.pt", latin], f"{latin}:2:3: invalid UTF-8"),
        (["translate", tmp_path / "lm.pt", files["test_src"]], "is a language model: use it with `seqgen generate`; this needs a translation model"),
        (["translate", out / "best.pt", files["test_src"], "--greedy", "--beam", 4], "--greedy cannot"),
    ]:
        assert_one_line_error(args, message)


def test_training_bad_inputs_are_one_clear_line_and_overwrite_nothing(trained, tmp_path):
    _, files, out, _ = trained
    short = write_lines(tmp_path / "short.tgt", ["1"] * 5)
    before = {f: os.path.getmtime(out / f) for f in ("best.pt", "last.pt")}
    for args, message in [
        (["train", "translation", "--src-train", files["src"], "--tgt-train", short, "--src-valid", files["vsrc"],
          "--tgt-valid", files["vtgt"], "--out", tmp_path / "r1"], f"{files['src']} has 2000 lines but {short} has 5"),
        (["train", "translation", "--src-train", files["src"], "--tgt-train", files["tgt"], "--out", out],
         "already holds a trained model"),
        (["train", "translation", "--out", out, "--resume", "--level", "char"], "--level cannot change on --resume"),
    ]:
        assert_one_line_error(args, message)
    assert before == {f: os.path.getmtime(out / f) for f in ("best.pt", "last.pt")}
    assert not os.path.exists(tmp_path / "r1" / "last.pt")


def test_yaml_config_and_flags_and_resume(trained, tmp_path):
    _, files, _, _ = trained
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  src_train: {files['src']}\n  tgt_train: {files['tgt']}\n  src_valid: {files['vsrc']}\n"
        f"  tgt_valid: {files['vtgt']}\n  level: char\n"
        f"encoder:\n  hidden: 16\n  emb: 8\ndecoder:\n  hidden: 32\n  emb: 8\n  input_feeding: true\n"
        f"train:\n  max_steps: 4\n  eval_every: 2\n  progress: false\n", encoding="utf-8")
    out = tmp_path / "run"
    run_cli("train", "translation", "--config", config, "--out", out, "--attention", "luong_dot", "--enc-hidden", 16)
    from seqgen.checkpoint import load_checkpoint
    saved = json.loads(load_checkpoint(str(out / "last.pt"))["run_config"])
    assert saved["data"]["level"] == "char" and saved["decoder"]["attention"] == "luong_dot"
    assert saved["decoder"]["input_feeding"] is True and saved["decoder"]["cell"] == "gru"  # task default kept
    proc = run_cli("train", "translation", "--out", out, "--resume", "--max-steps", 6)
    assert "done: 6 steps" in proc.stdout
