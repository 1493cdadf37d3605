"""Crash safety by fault injection, and errors that say what to do when memory or disk runs out.

A training run and a folder-captioning run are SIGKILLed at many points (mid-step, mid-evaluation, in every
phase of a checkpoint write, mid-log-line, mid-output-record, and from outside at random moments), rerun
each time, and must end exactly where an uninterrupted run ends; after every kill each checkpoint on disk
loads and last.pt is the latest complete one.

Most kills are planned: a forked child runs `seqgen.cli.main(argv)` with one I/O or compute call patched to
SIGKILL the process at a chosen point (`_arm`). The children come from a forkserver that has imported
seqgen once, so a child starts in milliseconds instead of the 2-3 s of a fresh `python -m seqgen.cli`; they
are still separate processes, killed with a real SIGKILL. The random kills and each chain's final run use
the real `python -m seqgen.cli` (`_run_cli`).
"""
from __future__ import annotations

import errno
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder, write_tiny_captioner

from seqgen.atomic import remove_partial_writes
from seqgen.checkpoint import load_checkpoint, save_checkpoint
from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.errors import OutOfMemory, SeqgenError, report_out_of_memory
from seqgen.generation import GenerationConfig
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.outputs import RUN_FOLDER_LOCK
from seqgen.runs import check_out_dir
from seqgen.tokenizers import TextCodec

# Children are forked from a server that imported these once (see the module docstring).
_CHILDREN = multiprocessing.get_context("forkserver")
_CHILDREN.set_forkserver_preload(["seqgen.cli", "seqgen.tasks.lm", "seqgen.tasks.captioning",
                                  "seqgen.tasks.caption_folder"])


# -- the kill switch (runs inside a child) ----------------------------------------------------------------

def _die(where: str) -> None:
    """Note where, then die the way the OOM killer or a power cut does: no cleanup, no finally blocks."""
    print(f"KILLED {where}", flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kind: str, n: int, target: str = "last.pt") -> None:
    """Patch the child so that it SIGKILLs itself at the `n`-th event `kind` of this process.

    step: after the forward of a training step, before the update.  eval: as an evaluation starts.
    torn / before_rename / after_rename: in the n-th save of `target` (last.pt, best.pt), after writing half of
    the temp file / after the complete temp file is fsynced / after the rename, before the folder's fsync.
    metrics: halfway through writing a metrics.jsonl line.  caption_batch: while a caption batch is decoded.
    caption_torn / caption_appended: halfway through writing a batch of caption records / right after it.
    """
    import seqgen.atomic
    import seqgen.checkpoint
    import seqgen.train
    from seqgen.model import Seq2Seq
    from seqgen.tasks import caption_folder
    from seqgen.train import Trainer

    count = itertools.count(1)

    def due() -> bool:
        return next(count) == n

    if kind == "step":
        loss = Seq2Seq.loss

        def dying_loss(self, *a, **k):
            out = loss(self, *a, **k)
            if due():
                _die(f"in training step {n} of this process")
            return out
        Seq2Seq.loss = dying_loss
    elif kind == "eval":
        run_eval = Trainer.run_eval

        def dying_eval(self):
            if due():
                _die(f"evaluating at step {self.state.step}")
            return run_eval(self)
        Trainer.run_eval = dying_eval
    elif kind in ("torn", "before_rename", "after_rename"):
        armed = []   # the save in progress when it is the one to kill
        real_save, real_replace, real_fsync_dir = seqgen.train.save_checkpoint, os.replace, seqgen.atomic.fsync_dir

        def save(path, payload):
            if os.path.basename(path) == target and due():
                armed.append(f"{kind} while saving {target} (step {json.loads(payload['metrics'])['step']})")
            real_save(path, payload)

        class TornTorch:   # `torch` as seqgen.checkpoint sees it
            def __getattr__(self, name):
                return getattr(torch, name)

            def save(self, obj, f, *a, **k):
                if not armed or kind != "torn" or isinstance(f, io.BytesIO):
                    return torch.save(obj, f, *a, **k)
                buf = io.BytesIO()
                torch.save(obj, buf)
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die(armed[0])

        class DyingOs:     # `os` as seqgen.atomic sees it
            def __getattr__(self, name):
                return getattr(os, name)

            def replace(self, src, dst):
                if armed and kind == "before_rename":
                    _die(armed[0])
                real_replace(src, dst)

        def fsync_dir(folder):
            if armed and kind == "after_rename":
                _die(armed[0])
            real_fsync_dir(folder)

        seqgen.train.save_checkpoint = save
        seqgen.checkpoint.torch = TornTorch()
        seqgen.atomic.os, seqgen.atomic.fsync_dir = DyingOs(), fsync_dir
    elif kind == "metrics":
        write = Trainer._write_metrics

        def half_line(self, record):
            if due():
                with open(self.metrics_path, "a", encoding="utf-8") as f:
                    line = json.dumps(record)
                    f.write(line[:len(line) // 2])
                _die(f"writing the metrics line of step {record['step']}")
            write(self, record)
        Trainer._write_metrics = half_line
    elif kind == "caption_batch":
        caption_tensor = caption_folder.caption_tensor

        def dying_batch(*a, **k):
            if due():
                _die(f"decoding caption batch {n}")
            return caption_tensor(*a, **k)
        caption_folder.caption_tensor = dying_batch
    elif kind in ("caption_torn", "caption_appended"):
        append = caption_folder._append

        def dying_append(f, text, out_path):
            if not due():
                return append(f, text, out_path)
            if kind == "caption_torn":
                append(f, text[:len(text) // 2], out_path)
                _die(f"writing caption batch {n}")
            append(f, text, out_path)
            _die(f"after caption batch {n}")
        caption_folder._append = dying_append
    else:
        raise ValueError(kind)


def _child(argv: list[str], kill: dict | None, log_path: str) -> None:
    """A forked child's body: `seqgen ARGV` with output to `log_path`, killed where `kill` says."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)   # as in the test process and the CLI runs below: the same floating-point sums
    if kill:
        _arm(**kill)
    import seqgen.cli
    sys.exit(seqgen.cli.main(argv))


def _run_child(argv: list, kill: dict | None, log: Path) -> int:
    """Run `seqgen ARGV` in a forked child; returns its exit code (-9 when it was SIGKILLed)."""
    log.write_text("")
    p = _CHILDREN.Process(target=_child, args=([str(a) for a in argv], kill, str(log)))
    p.start()
    p.join(timeout=120)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise AssertionError(f"seqgen {' '.join(map(str, argv))} hung:\n{log.read_text()[-2000:]}")
    return p.exitcode


def _run_cli(argv: list, log: Path, *, kill_when=None, rng: random.Random | None = None) -> int:
    """Run the real `python -m seqgen.cli ARGV` (output to `log`); with `kill_when`, SIGKILL it from outside a
    random 0-30 ms after `kill_when()` first holds. Returns the exit code (-9 when killed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "seqgen.cli", *map(str, argv)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        try:
            if kill_when is not None:
                while proc.poll() is None and not kill_when():
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.03))
                proc.send_signal(signal.SIGKILL)   # too late when it has finished: then it just ran to the end
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- training: kill, resume, repeat -------------------------------------------------------------------------

def _lm_argv(text: Path, out: Path) -> list:
    return ["train", "lm", "--text", text, "--out", out, "--level", "char", "--hidden", 32, "--emb", 16,
            "--layers", 1, "--dropout", 0.1, "--seq-len", 32, "--batch-size", 8, "--max-steps", 60,
            "--eval-every", 10, "--checkpoint-every", 3, "--log-every", 2, "--warmup-steps", 5, "--lr", "0.01",
            "--progress", "false", "--device", "cpu", "--seed", 3]


def _write_text(path: Path) -> Path:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and then the cat sat on the mat".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(9)) for _ in range(80)) + "\n")
    return path


def _check_run_folder(out: Path) -> int | None:
    """Every *.pt in `out` is a complete checkpoint; returns the step of last.pt (None when there is none)."""
    for pt in out.glob("*.pt"):
        load_checkpoint(str(pt))                   # SeqgenError (a failed test) if truncated or corrupt
    assert not list(out.glob(".tmp-*.pt")), "a partial write must never look like a checkpoint"
    if not (out / "last.pt").exists():
        return None
    return json.loads(load_checkpoint(str(out / "last.pt"))["metrics"])["step"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# The planned kills, in order: (kind, n, target) for `_arm`, where the child says it died, and the step of
# last.pt afterwards. Checkpoints every 3 steps and at each evaluation, evaluations every 10, log lines every 2.
PLANNED_TRAINING_KILLS = [
    # the step-0 checkpoint, before any training: no checkpoint exists yet, the rerun starts over
    (("torn", 1, "last.pt"), "torn while saving last.pt (step 0)", None),
    (("step", 5, None), "in training step 5 of this process", 3),
    (("before_rename", 1, "last.pt"), "before_rename while saving last.pt (step 6)", 3),
    (("after_rename", 2, "last.pt"), "after_rename while saving last.pt (step 9)", 9),
    (("torn", 1, "best.pt"), "torn while saving best.pt (step 10)", 9),           # the first best.pt
    (("after_rename", 1, "best.pt"), "after_rename while saving best.pt (step 10)", 9),   # best.pt newer than last
    (("metrics", 3, None), "writing the metrics line of step 12", 10),
    (("step", 1, None), "in training step 1 of this process", 10),               # right after a resume
    (("eval", 1, None), "evaluating at step 20", 18),
    (("torn", 1, "last.pt"), "torn while saving last.pt (step 20)", 18),         # right after best.pt of step 20
]


def _progress_lines(log: Path) -> int:
    return len(re.findall(r"^step \d+ \|", log.read_text(), re.M))


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    text = _write_text(tmp_path / "text.txt")
    ref, out = tmp_path / "reference", tmp_path / "run"
    assert _run_child(_lm_argv(text, ref), None, tmp_path / "reference.log") == 0

    last = None
    for i, ((kind, n, target), where, step) in enumerate(PLANNED_TRAINING_KILLS):
        log = tmp_path / f"kill{i}.log"
        kill = {"kind": kind, "n": n, **({"target": target} if target else {})}
        rc = _run_child(_lm_argv(text, out) + (["--resume"] if i else []), kill, log)
        assert rc == -signal.SIGKILL, f"kill {i} ({kind} {n}) never happened (exit {rc}):\n{log.read_text()[-2000:]}"
        assert f"KILLED {where}\n" in log.read_text()
        if last is not None:   # the resumed run started from the latest complete checkpoint
            assert f"resumed from {out / 'last.pt'} at step {last} " in log.read_text()
        last = _check_run_folder(out)
        assert last == step
        if i == 0:             # only the partial write, which is not a checkpoint (besides the dead run's lock file
            # and the run's own prepared data, OUT/prepared)
            assert [name.startswith(".tmp-last.pt-") for name in os.listdir(out)
                    if name not in (RUN_FOLDER_LOCK, "prepared")] == [True]

    # two kills from outside at random moments (after 1-3 progress lines), then the real CLI runs to the end
    rng = random.Random(7)
    for i in range(2):
        log, lines = tmp_path / f"external{i}.log", rng.randint(1, 3)
        rc = _run_cli(_lm_argv(text, out) + ["--resume"], log, rng=rng,
                      kill_when=lambda log=log, lines=lines: _progress_lines(log) >= lines)
        assert rc in (-signal.SIGKILL, 0), log.read_text()[-2000:]
        assert f"resumed from {out / 'last.pt'} at step {last} " in log.read_text()
        step = _check_run_folder(out)
        assert step >= last, "last.pt went back in time"
        last = step
    final = tmp_path / "final.log"
    assert _run_cli(_lm_argv(text, out) + ["--resume"], final) == 0, final.read_text()[-2000:]

    assert _check_run_folder(out) == 60
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(str(ref / name))["model"], load_checkpoint(str(out / name))["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the log has every step once, and the same validation losses
    got, want = _metrics(out), _metrics(ref)
    assert [(r["step"], "eval" in r) for r in got] == [(r["step"], "eval" in r) for r in want]
    assert [r["eval"]["loss"] for r in got if "eval" in r] == [r["eval"]["loss"] for r in want if "eval" in r]
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


# -- captioning a folder: kill, rerun, repeat ---------------------------------------------------------------

def _caption_checkpoint(path: Path) -> Path:
    return write_tiny_captioner(path)


def _image_folder(folder: Path, n: int = 40) -> Path:
    return write_image_folder(folder, n)


def test_killed_folder_captioning_captions_each_image_once(tmp_path):
    ckpt = _caption_checkpoint(tmp_path / "model.pt")
    folder = _image_folder(tmp_path / "photos")

    def argv(out):
        # float32: a resumed run batches other images together, which under bf16 can change a caption
        return ["caption", ckpt, folder, "--out", out, "--batch-size", 4, "--beam", 2, "--max-len", 8,
                "--num-workers", 0, "--quiet", "--device", "cpu", "--amp", "off"]

    ref, out = tmp_path / "reference.jsonl", tmp_path / "captions.jsonl"
    assert _run_child(argv(ref), None, tmp_path / "reference.log") == 0
    planned = [("caption_torn", 3), ("caption_batch", 2), ("caption_appended", 2)]
    for i, (kind, n) in enumerate(planned):
        log = tmp_path / f"kill{i}.log"
        assert _run_child(argv(out), {"kind": kind, "n": n}, log) == -signal.SIGKILL, log.read_text()[-2000:]
        done = [os.path.basename(json.loads(line)["image"]) for line in out.read_text().splitlines(keepends=True)
                if line.endswith("\n")]   # all but a record cut off by the kill
        assert done == sorted(os.listdir(folder))[:len(done)]       # once each, in order, so far
    assert len(done) > 20 and out.read_bytes().endswith(b"\n")      # the next run cleaned the cut-off record
    # a kill from outside once it has written a batch, then the real CLI finishes the folder
    rc = _run_cli(argv(out), tmp_path / "external.log", rng=random.Random(3),
                  kill_when=lambda: len(out.read_text().splitlines()) > len(done))
    assert rc in (-signal.SIGKILL, 0), (tmp_path / "external.log").read_text()[-2000:]
    assert _run_cli(argv(out), tmp_path / "final.log") == 0, (tmp_path / "final.log").read_text()

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [os.path.basename(r["image"]) for r in records] == sorted(os.listdir(folder))   # each once, in order
    assert out.read_text() == ref.read_text()                                            # the same captions


# -- out of memory ------------------------------------------------------------------------------------------

CUDA_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
CPU_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)")


def test_report_out_of_memory_translates_only_allocation_failures():
    for error in (CUDA_OOM, CPU_OOM, MemoryError()):
        with pytest.raises(OutOfMemory, match="^out of memory doing X; lower Y$"):
            with report_out_of_memory("doing X", "lower Y"):
                raise error
    with pytest.raises(RuntimeError, match="shape mismatch"):      # other errors pass through untouched
        with report_out_of_memory("doing X", "lower Y"):
            raise RuntimeError("shape mismatch")
    with pytest.raises(OutOfMemory, match="^out of memory validating; lower --valid-batch-size$"):
        with report_out_of_memory("validating", "lower --valid-batch-size"):   # the outer caller knows the flag
            with report_out_of_memory("translating", "lower --batch-size"):
                raise CUDA_OOM
    assert issubclass(OutOfMemory, SeqgenError)


def _lm_run(text: Path, **train):
    from seqgen.tasks.lm import LMDataConfig, LMRunConfig
    from seqgen.train import TrainConfig
    cfg = dict(lr=1e-2, warmup_steps=5, max_steps=12, eval_every=100, checkpoint_every=3, log_every=100, seed=3,
               progress=False, device="cpu")
    cfg.update(train)
    return LMRunConfig(data=LMDataConfig(text=str(text), level="char", seq_len=32, batch_size=8),
                       decoder=DecoderConfig(cell="lstm", emb=16, hidden=32, layers=1, dropout=0.0),
                       train=TrainConfig(**cfg))


class _FailAtForward:
    """A global forward hook: in the `n`-th forward of a module of type `module_type`, calls `before()` (to look
    at the disk at that moment), then raises `error` (if any)."""

    def __init__(self, module_type, n: int, error: BaseException | None, before=lambda: None):
        self.module_type, self.n, self.error, self.before, self.calls = module_type, n, error, before, 0

    def __call__(self, module, args, output):
        if isinstance(module, self.module_type):
            self.calls += 1
            if self.calls == self.n:
                self.before()
                if self.error is not None:
                    raise self.error

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("error", [CUDA_OOM, CPU_OOM], ids=["cuda", "cpu"])
def test_out_of_memory_in_training_names_the_batch_size_and_keeps_last_checkpoint(tmp_path, error):
    from seqgen.decoders.rnn import RNNDecoder
    from seqgen.tasks.lm import train_lm
    text, out = _write_text(tmp_path / "text.txt"), tmp_path / "run"
    snapshot = {}
    with _FailAtForward(RNNDecoder, 8, error, lambda: snapshot.update(last=(out / "last.pt").read_bytes())):
        with pytest.raises(OutOfMemory) as info:
            train_lm(_lm_run(text), str(out), log=lambda m: None)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("out of memory at step 8 on a batch of 8 sequences x 32 tokens; lower --batch-size (now 8)")
    assert f"{out / 'last.pt'} of step 6 is intact" in msg
    assert (out / "last.pt").read_bytes() == snapshot["last"] and _check_run_folder(out) == 6
    # and the advice works: resume with a smaller batch
    state = train_lm(_lm_run(text), str(out), resume=True, overrides={"data": {"batch_size": 4}}, log=lambda m: None)
    assert state.step == 12


def test_disk_full_while_training_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from seqgen.decoders.rnn import RNNDecoder
    from seqgen.tasks.lm import train_lm
    text, out = _write_text(tmp_path / "text.txt"), tmp_path / "run"
    real_fsync, snapshot = os.fsync, {}

    def fsync(fd):   # the disk fills up during step 8: the checkpoint of step 9 cannot be written
        if snapshot:
            raise OSError(28, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)

    def disk_full():
        snapshot["last"] = (out / "last.pt").read_bytes()
    with _FailAtForward(RNNDecoder, 8, None, disk_full):
        with pytest.raises(SeqgenError, match=r"last.pt: cannot save the checkpoint of step 9 \(No space left on "
                                              r"device\); the previous one is intact"):
            train_lm(_lm_run(text), str(out), log=lambda m: None)
    monkeypatch.undo()
    assert (out / "last.pt").read_bytes() == snapshot["last"] and _check_run_folder(out) == 6
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


class _FullDisk:
    """A file on a disk that fills up: the writes past its first `room` bytes fail with ENOSPC (what torch.save then
    reports is its own RuntimeError, "unexpected pos ...", with the OSError only as its context)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)


def _fill_disk_at(monkeypatch, mode: str, n: int, before=lambda: None, room: int = 1024) -> None:
    """From the `n`-th file seqgen.atomic opens with `mode` on, the disk fills up after `room` bytes of the file
    (`before()` runs first)."""
    import seqgen.atomic
    count = itertools.count(1)

    def opener(file, mode_="r", *args, **kwargs):
        f = open(file, mode_, *args, **kwargs)
        if mode_ == mode and next(count) >= n:
            before()
            return _FullDisk(f, room)
        return f
    monkeypatch.setattr(seqgen.atomic, "open", opener, raising=False)


def test_disk_full_inside_torch_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from seqgen.tasks.lm import train_lm
    text, out = _write_text(tmp_path / "text.txt"), tmp_path / "run"
    snapshot = {}
    # the fitted vocabulary (OUT/prepared/vocab-*.pt), then saves at steps 0, 3, 6: the third save fails inside
    # torch.save
    _fill_disk_at(monkeypatch, "wb", 4, lambda: snapshot.setdefault("last", (out / "last.pt").read_bytes()))
    with pytest.raises(SeqgenError, match=r"last.pt: cannot save the checkpoint of step 6 \(No space left on "
                                          r"device\); the previous one is intact: free space and continue"):
        train_lm(_lm_run(text), str(out), log=lambda m: None)
    monkeypatch.undo()
    assert (out / "last.pt").read_bytes() == snapshot["last"] and _check_run_folder(out) == 3
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


def test_disk_full_when_translating_leaves_the_old_output_and_no_temp_file(tmp_path, monkeypatch, capsys):
    """An earlier output is never replaced without --overwrite; a disk that fills before the first chunk is
    written is one line and leaves nothing behind (no empty output, no resume sidecar, no temp file)."""
    import seqgen.tasks.translate_file as tf
    from seqgen.checkpoint import save_checkpoint as save
    from seqgen.cli import main
    codec = TextCodec.build("word", ["a b c d"])
    model = Seq2Seq(ModelConfig(task="translation", decoder=DecoderConfig(emb=8, hidden=8),
                                text_encoder=RNNEncoderConfig(emb=8, hidden=8)), tgt=codec, src=codec)
    save(str(tmp_path / "mt.pt"), model.to_payload())
    (tmp_path / "src.txt").write_text("a b\nc d\n")
    out = tmp_path / "hyp.txt"
    out.write_text("the earlier translations\n")
    args = ["translate", str(tmp_path / "mt.pt"), str(tmp_path / "src.txt"), "--greedy"]
    assert main([*args, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "the earlier translations\n"
    fresh = tmp_path / "new.txt"
    monkeypatch.setattr(tf, "open", lambda file, mode="r", *a, **k: _FullDisk(open(file, mode, *a, **k), 0)
                        if mode == "a" else open(file, mode, *a, **k), raising=False)
    assert main([*args, "--out", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seqgen: error: {fresh}: cannot write the translations (No space left on device)")
    assert len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["hyp.txt", "mt.pt", "src.txt"]     # nothing holding the space


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device whose writes fail: ENOSPC)")
def test_disk_full_when_captioning_is_the_friendly_line_not_the_failed_close(tmp_path, capsys):
    from seqgen.cli import main
    ckpt, folder = _caption_checkpoint(tmp_path / "model.pt"), _image_folder(tmp_path / "photos", n=3)
    out = tmp_path / "caps.jsonl"
    os.symlink("/dev/full", out)        # every flush fails, and so does the close after it
    status = main(["caption", str(ckpt), str(folder), "--out", str(out), "--overwrite", "--quiet", "--beam", "1",
                   "--max-len", "4", "--num-workers", "0"])
    assert status == 2 and capsys.readouterr().err == (
        f"seqgen: error: {out}: cannot write the captions (No space left on device); the finished batches are kept, "
        f"run the same command again to continue\n")


def test_out_of_memory_when_captioning_a_folder_keeps_finished_batches(tmp_path):
    from seqgen.encoders.cnn import CNNImageEncoder
    from seqgen.inference.captioning import caption_images
    from seqgen.model import load_model
    from seqgen.tasks.caption_folder import caption_folder
    model = load_model(str(_caption_checkpoint(tmp_path / "model.pt")), task="captioning")
    folder, out = _image_folder(tmp_path / "photos", n=12), tmp_path / "captions.jsonl"
    with _FailAtForward(CNNImageEncoder, 2, CUDA_OOM):
        with pytest.raises(OutOfMemory) as info:
            caption_folder(model, [str(folder)], str(out), GenerationConfig(beam=2, max_len=8), batch_size=4,
                           num_workers=0, progress=False, log=lambda m: None)
    assert str(info.value) == (f"out of memory captioning a batch of 4 images (beam 2); lower --batch-size (now 4) "
                               f"or --beam; the finished batches are kept in {out}: run again to continue")
    assert len(out.read_text().splitlines()) == 4
    with _FailAtForward(CNNImageEncoder, 1, CPU_OOM):       # the Python API names the same settings
        with pytest.raises(OutOfMemory, match="captioning a batch of 3 images .* lower the batch size"):
            caption_images(model, sorted(str(p) for p in folder.iterdir())[:3], batch_size=3)


def test_out_of_memory_when_translating_names_the_batch_size():
    from seqgen.encoders.rnn import RNNTextEncoder
    from seqgen.inference.translation import translate
    torch.manual_seed(0)
    codec = TextCodec.build("word", ["a b c d e f"])
    model = Seq2Seq(ModelConfig(task="translation", decoder=DecoderConfig(emb=8, hidden=16),
                                text_encoder=RNNEncoderConfig(emb=8, hidden=16)), tgt=codec, src=codec)
    with _FailAtForward(RNNTextEncoder, 2, CUDA_OOM):
        with pytest.raises(OutOfMemory, match=r"^out of memory translating a batch of 2 sentences x 3 tokens "
                                              r"\(beam 3\); lower --batch-size \(now 2\) or --beam$"):
            translate(model, ["a b c d e", "a b c d", "a b", "b c"], GenerationConfig(beam=3), batch_size=2)


# -- the pieces the fault tests rely on ---------------------------------------------------------------------

def test_partial_writes_are_not_checkpoints_and_are_cleaned(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), {"w": torch.ones(2)})
    (tmp_path / ".tmp-last.pt-abc123").write_bytes(b"PK\x03\x04half")   # what a kill mid-write leaves
    (tmp_path / ".tmp-best.pt-xyz").write_bytes(b"")
    assert [p.name for p in tmp_path.glob("*.pt")] == ["last.pt"]
    assert remove_partial_writes(str(path)) == [str(tmp_path / ".tmp-last.pt-abc123")]
    assert sorted(os.listdir(tmp_path)) == [".tmp-best.pt-xyz", "last.pt"]


def test_resume_in_a_folder_without_a_checkpoint_starts_the_run(tmp_path):
    assert check_out_dir(str(tmp_path), resume=True) is None           # killed before its first checkpoint
    with pytest.raises(SeqgenError, match="does not exist"):
        check_out_dir(str(tmp_path / "typo"), resume=True)
    save_checkpoint(str(tmp_path / "best.pt"), {"w": torch.ones(1)})
    with pytest.raises(SeqgenError, match="best.pt but no last.pt"):
        check_out_dir(str(tmp_path), resume=True)
    save_checkpoint(str(tmp_path / "last.pt"), {"w": torch.ones(1)})
    assert check_out_dir(str(tmp_path), resume=True) == str(tmp_path / "last.pt")


class _NaNAtForwards:
    """A global forward hook making the decoder's logits NaN in the forwards numbered `bad` (1-based)."""

    def __init__(self, bad):
        self.bad, self.calls = bad, 0

    def __call__(self, module, args, output):
        from seqgen.decoders.rnn import RNNDecoder
        if isinstance(module, RNNDecoder):
            self.calls += 1
            if self.calls in self.bad:
                logits, state = output
                return logits * float("nan"), state

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_non_finite_losses_are_skipped_counted_and_stop_training_after_n_in_a_row(tmp_path):
    from seqgen.tasks.lm import train_lm
    text = _write_text(tmp_path / "text.txt")
    logs: list[str] = []
    # two isolated bad batches: skipped (no update, no step), counted in the log, training finishes
    out = tmp_path / "isolated"
    with _NaNAtForwards({4, 9}):
        state = train_lm(_lm_run(text, max_bad_steps=2), str(out), log=logs.append)
    assert state.step == 12
    skipped = [r for r in _metrics(out) if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3, 7] and all(r["skipped"] == "non-finite loss" for r in skipped)
    assert [m for m in logs if "non-finite" in m] == ["step 3: non-finite loss (nan), batch skipped (1/2)",
                                                      "step 7: non-finite loss (nan), batch skipped (1/2)"]
    weights = load_checkpoint(str(out / "last.pt"))["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())

    # from the 8th forward on every loss is NaN: stop after max_bad_steps in a row, last good checkpoint intact
    out = tmp_path / "stops"
    with _NaNAtForwards(set(range(8, 100))):
        with pytest.raises(SeqgenError) as info:
            train_lm(_lm_run(text, max_bad_steps=3), str(out), log=lambda m: None)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("training stopped: 3 consecutive non-finite losses at step 7; lower --lr")
    assert _check_run_folder(out) == 6
    weights = load_checkpoint(str(out / "last.pt"))["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())
