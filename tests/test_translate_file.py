"""`seqgen translate` on files and pipes: resumable chunked output, line-by-line answers, `generate --stream`."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import seqgen.tasks.translate_file as tf
from conftest import run_cli
from seqgen.checkpoint import save_checkpoint
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from test_serve import WORDS, tiny_lm, tiny_translator

GEN = GenerationConfig(beam=3, max_len=8, amp="off")


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(n)]


def write_input(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(tf, "CHUNK_LINES", 7)


@pytest.mark.parametrize("n_best", [1, 2])
def test_a_run_killed_at_any_point_continues_to_the_uninterrupted_file(tmp_path, small_chunks, monkeypatch, n_best):
    model = tiny_translator()
    gen = GenerationConfig(beam=3, n_best=n_best, max_len=8, amp="off")
    src = write_input(tmp_path / "in.de", sentences(40))
    tf.translate_file(model, src, str(tmp_path / "ref.en"), gen, progress=False)
    expected = (tmp_path / "ref.en").read_bytes()
    assert expected.count(b"\n") >= 40 and not (tmp_path / "ref.en.resume.json").exists()

    real_translate = tf.translate_nbest
    rng = random.Random(n_best)
    out = tmp_path / "out.en"
    for attempt in range(12):
        calls = [0]
        stop_after = rng.randint(0, 5)
        torn = rng.random() < 0.5

        class Killed(BaseException):
            pass

        def flaky(*args, **kwargs):
            if calls[0] == stop_after:
                if torn and out.exists():           # a kill in the middle of writing a chunk
                    with open(out, "ab") as f:
                        f.write(b"half a chun")
                raise Killed()
            calls[0] += 1
            return real_translate(*args, **kwargs)

        monkeypatch.setattr(tf, "translate_nbest", flaky)
        try:
            tf.translate_file(model, src, str(out), gen, progress=False)
            break
        except Killed:
            continue
    monkeypatch.setattr(tf, "translate_nbest", real_translate)
    if (tmp_path / "out.en.resume.json").exists():
        tf.translate_file(model, src, str(out), gen, progress=False)
    assert out.read_bytes() == expected


def test_other_settings_and_foreign_files_are_refused(tmp_path, small_chunks):
    model = tiny_translator()
    src = write_input(tmp_path / "in.de", sentences(20))
    out = tmp_path / "out.en"
    out.write_text("my notes\n")
    with pytest.raises(SeqgenError, match="--overwrite"):
        tf.translate_file(model, src, str(out), GEN, progress=False)
    assert out.read_text() == "my notes\n"                    # nothing lost
    tf.translate_file(model, src, str(out), GEN, progress=False, overwrite=True)
    assert out.read_text().count("\n") == 20
    (tmp_path / "out.en.resume.json").write_text('{"input": "elsewhere"}')
    with pytest.raises(SeqgenError, match="other settings"):
        tf.translate_file(model, src, str(out), GEN, progress=False)


def test_parts_of_a_sharded_run_merge_in_input_order(tmp_path, small_chunks):
    """Two processes' part files (as under torchrun) merge into the single-process file, whatever was killed."""
    from seqgen.distributed import Distributed

    class Fake(Distributed):
        def __init__(self, rank, world):
            self._rank, self._world = rank, world

        rank = property(lambda self: self._rank)
        world = property(lambda self: self._world)
        is_main = property(lambda self: self._rank == 0)

        def barrier(self):
            pass

    model = tiny_translator()
    src = write_input(tmp_path / "in.de", sentences(30))
    tf.translate_file(model, src, str(tmp_path / "ref.en"), GEN, progress=False)
    out = str(tmp_path / "out.en")
    tf.translate_file(model, src, out, GEN, progress=False, dist=Fake(1, 2))   # rank 1 only: its part, no merge
    assert os.path.exists(tf.part_path(out, 1, 2)) and not os.path.exists(out)
    tf.translate_file(model, src, out, GEN, progress=False, dist=Fake(0, 2))   # rank 0: its chunks, then merge
    assert open(out, "rb").read() == (tmp_path / "ref.en").read_bytes()
    assert not tf.find_parts(out)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    save_checkpoint(str(d / "mt.pt"), tiny_translator().to_payload())
    save_checkpoint(str(d / "lm.pt"), tiny_lm().to_payload())
    return d


def test_sigkill_then_rerun_gives_the_uninterrupted_file(tiny_models, tmp_path):
    src = write_input(tmp_path / "in.de", sentences(9000, seed=3))
    ref, out = tmp_path / "ref.en", tmp_path / "out.en"
    run_cli("translate", tiny_models / "mt.pt", src, "--out", ref, "--greedy", "--max-len", "6")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "seqgen.cli", "translate", str(tiny_models / "mt.pt"), src, "--out", str(out),
           "--greedy", "--max-len", "6"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.stat().st_size == 0) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_bytes().count(b"\n") if out.exists() else 0
    assert partial < 9000, "the run ended before it could be killed"
    again = run_cli("translate", tiny_models / "mt.pt", src, "--out", out, "--greedy", "--max-len", "6")
    assert out.read_bytes() == ref.read_bytes()
    assert "already there from an earlier run" in again.stderr or partial == 0


def test_line_by_line_answers_before_the_next_line(tiny_models):
    proc = subprocess.Popen([sys.executable, "-m", "seqgen.cli", "translate", str(tiny_models / "mt.pt"),
                             "--line-buffered", "--greedy", "--max-len", "5"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        answers = []
        for line in ("ein mann", "eine frau im park", "hund"):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            answers.append(proc.stdout.readline())            # blocks until this line is answered
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    batch = run_cli("translate", tiny_models / "mt.pt", "--greedy", "--max-len", "5",
                    input="ein mann\neine frau im park\nhund\n")
    assert "".join(answers) == batch.stdout and len(answers) == 3


def test_generate_stream_prints_what_generate_prints(tiny_models):
    for flags in (["--temperature", "0.9"], ["--greedy"], ["--beam", "3"]):
        plain = run_cli("generate", tiny_models / "lm.pt", "--prompt", "RO", "--max-len", "40", *flags)
        streamed = run_cli("generate", tiny_models / "lm.pt", "--prompt", "RO", "--max-len", "40", "--stream", *flags)
        assert streamed.stdout == plain.stdout, flags


def test_endless_or_broken_input_is_one_line_and_leaves_nothing_behind(tiny_models, tmp_path):
    (tmp_path / "bad.de").write_bytes(b"ein mann\n\xff\n")
    for source, message in (("/dev/zero", "/dev/zero:1: a line longer than"), (tmp_path / "bad.de", "bad.de:2:1: invalid UTF-8")):
        proc = run_cli("translate", tiny_models / "mt.pt", source, "--out", tmp_path / "out.en", check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not list(tmp_path.glob("out.en*"))
    piped = run_cli("translate", tiny_models / "mt.pt", check=False, input="x" * (17 << 20))
    assert piped.returncode == 2 and "<stdin>:1: a line longer than" in piped.stderr


def test_torchrun_translates_a_file_in_shards_and_merges_in_input_order(tiny_models, tmp_path):
    """Real torchrun, 2 processes (gloo): the merged file equals a single-process run's, no parts remain."""
    src = write_input(tmp_path / "in.de", sentences(5000, seed=5))       # 3 chunks of 2,048 lines
    ref, out = tmp_path / "ref.en", tmp_path / "out.en"
    run_cli("translate", tiny_models / "mt.pt", src, "--out", ref, "--greedy", "--max-len", "6")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "seqgen.cli", "translate", str(tiny_models / "mt.pt"), str(src), "--out", str(out),
                           "--greedy", "--max-len", "6"],
                          capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["in.de", "out.en", "ref.en"]     # no part files, no sidecar


def test_torchrun_translate_needs_an_input_file_and_an_output_file(tiny_models, tmp_path, monkeypatch, capsys):
    """Under torchrun every process would read stdin or write stdout: refused in one line before any work."""
    import seqgen.distributed
    from seqgen.cli import main
    monkeypatch.setattr(seqgen.distributed, "setup", lambda device: seqgen.distributed.Distributed(rank=0, world=2))
    src = write_input(tmp_path / "in.de", sentences(3))
    for argv in ([str(src)], [str(src), "--out", "-"], ["-", "--out", str(tmp_path / "o.en")]):
        assert main(["translate", str(tiny_models / "mt.pt"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "under torchrun, seqgen translate shares an input file" in err, err
    assert sorted(os.listdir(tmp_path)) == ["in.de"]
