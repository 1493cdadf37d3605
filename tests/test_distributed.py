"""Data-parallel training on the CPU (gloo) and the GPU-only code paths that a CPU can still exercise.

Two processes (torch.multiprocessing, gloo on a free port, the torchrun environment variables set by hand)
run several tiny translation trainings in one session (`ddp_runs`); the single-process references run in
the test process. What is proved:

- a 2-process step is a single-process step over the same global batch: the weights equal those of one
  process training on each pair of batches padded into one (and those of one process with --accumulate 2),
  within 1e-5, and both processes hold identical weights;
- a 2-process checkpoint resumed in 1 process (with --accumulate 2) and a 1-process checkpoint resumed in 2
  processes end where the uninterrupted run ends (dropout on: the masks depend on the batch's place in the
  global batch, not on the process), and a resume with another global batch starts at the right batch;
- a non-finite loss on one process skips the step on both; the time budget stops both at the same step even
  when their clocks disagree; only process 0 writes files, and the logged loss is the global one;
- `torchrun --nproc_per_node 2 -m seqgen.cli train lm` works unchanged and matches `--accumulate 2`;
- device and backend selection, the autocast choice, bf16 and fp16 (loss scaling) autocast on the CPU, and
  the --compile fallback.
"""
from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as tmp

from seqgen.checkpoint import load_checkpoint
from seqgen.data.batch import Batch
from seqgen.data.batching import pad_sequences, shard_positions
from seqgen.data.parallel import ParallelBatches
from seqgen.decoders.rnn import DecoderConfig, RNNDecoder
from seqgen.distributed import Distributed, LaunchInfo, backend_for, choose_device, launch_info, setup
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.errors import SeqgenError
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.precision import autocast_dtype, native_bf16
from seqgen.tasks.translation import encode_source
from seqgen.tokenizers import TextCodec
from seqgen.train import TrainConfig, Trainer

STEPS, CUT = 8, 3     # steps of a full run; the step the interrupted runs stop at (an evaluation step:
                      # a run that stops evaluates, and with the plateau schedule evaluations set the LR)


# -- a tiny translation task (unequal token counts per batch: the loss weighting matters) -------------------

def _task(dropout: float) -> tuple[Seq2Seq, ParallelBatches]:
    rng = random.Random(0)
    src, tgt = [], []
    for _ in range(70):
        xs = [str(rng.randrange(10)) for _ in range(rng.randint(1, 9))]
        src.append(" ".join(xs))
        tgt.append(" ".join(reversed(xs)))
    codec = TextCodec.build("word", src + tgt)
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(task="translation",
                                decoder=DecoderConfig(cell="gru", emb=16, hidden=24, attention="luong_general",
                                                      dropout=dropout),
                                text_encoder=RNNEncoderConfig(cell="gru", emb=16, hidden=12, dropout=dropout)),
                    tgt=codec, src=codec)
    v = codec.vocab
    data = ParallelBatches([encode_source(codec, s) for s in src], [codec.encode(t) for t in tgt], pad=v.pad,
                           bos=v.bos, eos=v.eos, max_tokens=48, seed=5)
    return model, data


class Recorded:
    """A BatchSource that notes which slices the trainer asked for."""

    def __init__(self, data):
        self.data, self.calls = data, []

    def num_batches(self, epoch: int) -> int:
        return self.data.num_batches(epoch)

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1):
        self.calls.append((epoch, start, stop, step))
        return self.data.iter_batches(epoch, start, stop, step)


def _merge(a: Batch, b: Batch, pad: int) -> Batch:
    """Two batches padded into one (the padding is invisible: packed encoder, masks, ignore_index)."""
    def rows(x, lengths=None):
        return [r[: int(n)].tolist() for r, n in zip(x, lengths)] if lengths is not None else x.tolist()
    src, lengths = pad_sequences(rows(a.source, a.source_lengths) + rows(b.source, b.source_lengths), pad)
    tgt_rows = [r for r in rows(a.target) + rows(b.target)]
    target = torch.full((len(tgt_rows), max(len(r) for r in tgt_rows)), pad, dtype=torch.long)
    for i, r in enumerate(tgt_rows):
        target[i, : len(r)] = torch.tensor(r)
    return Batch(target=target, source=src, source_lengths=lengths)


class MergedPairs:
    """The single-process reference: batch i of an epoch = batches 2i and 2i+1 of `data` in one batch."""

    def __init__(self, data: ParallelBatches):
        self.data = data

    def num_batches(self, epoch: int) -> int:
        return self.data.num_batches(epoch) // 2

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1):
        raw = list(self.data.iter_batches(epoch))
        merged = [_merge(raw[2 * i], raw[2 * i + 1], self.data.pad) for i in range(len(raw) // 2)]
        return iter(merged[start:stop:step])


def _trainer(out: Path, *, dropout: float = 0.0, merged: bool = False, log=None, **train) -> Trainer:
    cfg = {"lr": 1e-2, "warmup_steps": 0, "schedule": "plateau", "plateau_patience": 1, "plateau_factor": 0.5,
           "clip_norm": 0.5, "label_smoothing": 0.1, "max_steps": STEPS, "eval_every": 3, "log_every": 1,
           "checkpoint_every": 100, "seed": 3, "progress": False, "device": "cpu", "amp": "off", **train}
    model, data = _task(dropout)
    data = Recorded(MergedPairs(data) if merged else data)
    # a constant validation score: every evaluation after the first halves the LR (plateau), so a process
    # that missed process 0's evaluation would train with another LR and end with other weights
    return Trainer(model, data, lambda m: {"loss": 1.0}, TrainConfig(**cfg), str(out), log=log or (lambda m: None))


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst:.3g}"


# -- the 2-process runs (one spawn for all of them) ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SkewedClock:
    """`time` as seqgen.train sees it, with a clock running 3x fast: this process thinks it trained longer."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def perf_counter() -> float:
        return 3 * time.perf_counter()


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import seqgen.train
    root = Path(folder)
    dist = setup("cpu")          # opens the gloo group, as under torchrun
    assert (dist.rank, dist.world, backend_for(dist.device)) == (rank, world, "gloo")
    results = {}

    def run(name: str, trainer: Trainer, resume: str | None = None) -> None:
        if resume:
            trainer.resume(resume)
        state = trainer.train()
        results[name] = {"weights": _weights(trainer), "step": state.step, "epoch": state.epoch,
                         "batch": state.batch_in_epoch, "calls": trainer.data.calls}

    run("full", _trainer(root / "ddp_full"))
    run("cut", _trainer(root / "ddp_cut", dropout=0.2, max_steps=CUT))
    run("from_1", _trainer(root / "ddp_from_1", dropout=0.2), resume=str(root / "one_cut" / "last.pt"))

    class NaNOnRank1:          # the second training forward of process 1 (step 2) gives a NaN loss
        calls = 0

        def __call__(self, module, args, output):
            if isinstance(module, RNNDecoder) and rank == 1:
                NaNOnRank1.calls += 1
                if NaNOnRank1.calls == 2:
                    return output[0] * float("nan"), output[1]
    handle = torch.nn.modules.module.register_module_forward_hook(NaNOnRank1())
    run("nan", _trainer(root / "ddp_nan"))
    handle.remove()

    if rank == 1:
        seqgen.train.time = _SkewedClock()
    run("budget", _trainer(root / "ddp_budget", max_steps=1000, time_budget=0.3 / 60))
    torch.save(results, root / f"rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # the 1-process checkpoint that the 2-process session resumes
    _trainer(root / "one_cut", dropout=0.2, accumulate=2, max_steps=CUT).train()
    ctx = tmp.start_processes(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=False,
                              start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:   # a process waiting in a collective the other never joins
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process runs hung")
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return root, ranks


def _both(ranks, name):
    a, b = ranks[0][name], ranks[1][name]
    assert (a["step"], a["epoch"], a["batch"]) == (b["step"], b["epoch"], b["batch"])
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), f"{name}: the processes disagree on {k}"
    return a


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_process_step_equals_one_process_step_over_the_global_batch(ddp_runs, tmp_path):
    root, ranks = ddp_runs
    ddp = _both(ranks, "full")
    assert ddp["step"] == STEPS and ddp["epoch"] >= 1, "the run should cross an epoch boundary"
    merged = _trainer(tmp_path / "merged", merged=True)
    merged.train()
    # One batch of twice the rows sums its gradient in another order than two batches whose gradients are
    # averaged: float32 rounding, grown over the steps at lr 1e-2 (2.5e-5 on the AVX2-only CPU of 2026-12-02; within
    # 1e-5 on the AVX-512 machine before). The accumulate run below adds the same per-batch gradients: 1e-5.
    _assert_close(ddp["weights"], _weights(merged), atol=1e-4)
    accumulated = _trainer(tmp_path / "accumulated", accumulate=2)
    accumulated.train()
    _assert_close(ddp["weights"], _weights(accumulated))
    # process 0 wrote everything once; its log holds the global loss (what one process logs over both batches)
    got, want = _metrics(root / "ddp_full"), _metrics(tmp_path / "accumulated")
    assert [(r["step"], "eval" in r) for r in got] == [(r["step"], "eval" in r) for r in want]
    assert [r["loss"] for r in got if "loss" in r] == pytest.approx([r["loss"] for r in want if "loss" in r],
                                                                     abs=1e-5)
    assert sorted(os.listdir(root / "ddp_full")) == ["best.pt", "last.pt", "metrics.jsonl"]
    _assert_close(ddp["weights"], load_checkpoint(str(root / "ddp_full" / "last.pt"))["model"], atol=0)


def test_two_process_checkpoint_resumes_in_one_process(ddp_runs, tmp_path):
    root, ranks = ddp_runs
    _both(ranks, "cut")
    cut = root / "ddp_cut" / "last.pt"
    # the same global batch (2 batches a step): the run ends where an uninterrupted one ends
    uninterrupted = _trainer(tmp_path / "full", dropout=0.2, accumulate=2)
    uninterrupted.train()
    resumed = _trainer(tmp_path / "resumed", dropout=0.2, accumulate=2)
    resumed.resume(str(cut))
    resumed.train()
    assert resumed.data.calls[0] == (0, 2 * CUT, resumed.data.calls[0][2], 1)
    _assert_close(_weights(uninterrupted), _weights(resumed))
    _assert_close(_weights(uninterrupted), ranks[0]["from_1"]["weights"])   # and so does the 1 -> 2 resume
    # another global batch (1 batch a step) continues from the same global position
    logs = []
    single = _trainer(tmp_path / "single", dropout=0.2, log=logs.append)
    single.resume(str(cut))
    state = single.train()
    assert f"resumed from {cut} at step {CUT} (epoch 0, batch {2 * CUT})" in logs
    assert single.data.calls[0] == (0, 2 * CUT, single.data.calls[0][2], 1)
    assert state.step == STEPS and all(torch.isfinite(w).all() for w in _weights(single).values())


def test_one_process_checkpoint_resumes_in_two_processes(ddp_runs):
    _, ranks = ddp_runs
    run = _both(ranks, "from_1")
    assert run["step"] == STEPS
    # process r starts at global batch 2 * CUT + r and takes every other batch
    for r in range(2):
        epoch, start, _, step = ranks[r]["from_1"]["calls"][0]
        assert (epoch, start, step) == (0, 2 * CUT + r, 2)
    # its weights equal the uninterrupted 1-process run: checked in test_two_process_checkpoint_resumes_...


def test_non_finite_loss_on_one_process_skips_the_step_on_both(ddp_runs, tmp_path):
    root, ranks = ddp_runs
    ddp = _both(ranks, "nan")
    assert ddp["step"] == STEPS
    assert [r["step"] for r in _metrics(root / "ddp_nan") if r.get("skipped")] == [1]

    class NaNAtForward4:       # one process, 2 batches a step: forward 4 is step 2's second batch
        calls = 0

        def __call__(self, module, args, output):
            if isinstance(module, RNNDecoder):
                NaNAtForward4.calls += 1
                if NaNAtForward4.calls == 4:
                    return output[0] * float("nan"), output[1]
    handle = torch.nn.modules.module.register_module_forward_hook(NaNAtForward4())
    try:
        single = _trainer(tmp_path / "single", accumulate=2)
        single.train()
    finally:
        handle.remove()
    _assert_close(ddp["weights"], _weights(single))


def test_time_budget_stops_both_processes_at_the_same_step(ddp_runs):
    # process 1's clock runs 3x fast: deciding alone, it would stop first and leave process 0 waiting forever
    run = _both(ddp_runs[1], "budget")
    assert 0 < run["step"] < 1000


# -- torchrun itself ----------------------------------------------------------------------------------------

def _lm_argv(text: Path, out: Path) -> list[str]:
    return ["train", "lm", "--text", str(text), "--out", str(out), "--level", "char", "--hidden", "24",
            "--emb", "16", "--layers", "1", "--dropout", "0.1", "--seq-len", "16", "--batch-size", "4",
            "--max-steps", "6", "--eval-every", "3", "--log-every", "1", "--warmup-steps", "2", "--lr", "0.01",
            "--progress", "false", "--device", "cpu", "--seed", "3", "--amp", "off"]


def test_torchrun_runs_the_cli_unchanged(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 30)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "seqgen.cli", *_lm_argv(text, tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("done: 6 steps") == 1, output          # process 0 alone prints
    assert output.count("eval step 3:") == 1 and output.count("step 2 | epoch 0") == 1, output
    assert sorted(os.listdir(tmp_path / "ddp")) == ["best.pt", "last.pt", "metrics.jsonl", "prepared"]
    steps = [r["step"] for r in _metrics(tmp_path / "ddp") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    one = subprocess.run([sys.executable, "-m", "seqgen.cli", *_lm_argv(text, tmp_path / "one"), "--accumulate", "2"],
                         capture_output=True, text=True, timeout=240, env=env, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(str(tmp_path / "ddp" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "one" / "last.pt"))
    _assert_close(a["model"], b["model"])
    assert json.loads(a["trainer"]["state"])["batch_in_epoch"] == json.loads(b["trainer"]["state"])["batch_in_epoch"]


# -- the pieces ---------------------------------------------------------------------------------------------

def test_shard_positions_hand_out_whole_global_steps():
    # 11 batches, 2 processes x accumulate 2 from position 2: steps take [2..5], [6..9]; 10 is left over
    assert list(shard_positions(11, 0, 2, start=2, group=4)) == [2, 4, 6, 8]
    assert list(shard_positions(11, 1, 2, start=2, group=4)) == [3, 5, 7, 9]
    assert list(shard_positions(11, 0, 1, start=3)) == list(range(3, 11))    # one process: everything
    assert list(shard_positions(5, 1, 2, start=4)) == []                     # no whole step left
    with pytest.raises(ValueError):
        shard_positions(10, 0, 2, group=3)


def test_launch_info_reads_torchrun_environment():
    assert launch_info({}) == LaunchInfo()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch_info(env) == LaunchInfo(rank=3, world=4, local_rank=1, local_world=2)
    with pytest.raises(SeqgenError, match="inconsistent"):
        launch_info({"RANK": "2", "WORLD_SIZE": "2"})


def test_device_and_backend_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert choose_device("auto", cuda_count=0) == cpu
    assert choose_device("auto", local_rank=1, local_world=2, cuda_count=2) == gpu     # one GPU per process
    assert choose_device("cuda", local_rank=1, local_world=2, cuda_count=4) == gpu
    assert choose_device("cuda:3", cuda_count=4) == torch.device("cuda", 3)
    assert choose_device("cpu", local_rank=1, local_world=2, cuda_count=2) == cpu
    with pytest.raises(SeqgenError, match="no CUDA GPU"):
        choose_device("cuda", cuda_count=0)
    with pytest.raises(SeqgenError, match="use --device cuda"):
        choose_device("cuda:0", local_rank=1, local_world=2, cuda_count=2)
    with pytest.raises(SeqgenError, match="this machine has 2"):
        choose_device("auto", local_rank=2, local_world=3, cuda_count=2)
    with pytest.raises(SeqgenError, match="unknown device"):
        choose_device("gpu0")
    assert backend_for(cpu) == "gloo" and backend_for(gpu) == "nccl"
    assert setup("cpu") == Distributed()   # no torchrun: a world of one, no process group
    assert not tdist.is_initialized()


def test_autocast_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for device in (cpu, gpu):     # auto: bf16 where the hardware has it (AVX512-BF16/AMX CPUs, Ampere+ GPUs)
        assert autocast_dtype("auto", device, bf16=True) == torch.bfloat16
        assert autocast_dtype("auto", device, bf16=False) is None
        assert autocast_dtype("off", device, bf16=True) is None
        assert autocast_dtype("fp16", device, bf16=True) == torch.float16
    assert autocast_dtype("bf16", cpu, bf16=False) == torch.bfloat16     # emulated: slow, but it works
    with pytest.raises(SeqgenError, match="has no bfloat16"):
        autocast_dtype("bf16", gpu, bf16=False)
    assert autocast_dtype("auto", torch.device("meta")) is None
    assert native_bf16(cpu) in (True, False)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_trains_on_the_cpu(tmp_path, amp):
    seen = set()

    def note_dtype(module, args, output):
        if isinstance(module, torch.nn.Linear):
            seen.add(output.dtype)
    handle = torch.nn.modules.module.register_module_forward_hook(note_dtype)
    try:
        trainer = _trainer(tmp_path / "run", amp=amp, max_steps=6, schedule="constant")
        before = _weights(trainer)
        trainer.train()
    finally:
        handle.remove()
    want = torch.bfloat16 if amp == "bf16" else torch.float16
    assert want in seen, f"autocast never ran a Linear in {want}"
    after = _weights(trainer)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    losses = [r["loss"] for r in _metrics(tmp_path / "run") if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    saved = load_checkpoint(str(tmp_path / "run" / "last.pt"))["trainer"]
    assert ("grad_scaler" in saved) == (amp == "fp16")     # fp16's loss scale resumes with the run


def test_compile_failure_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch):
    def broken_compile(fn, *a, **k):
        def run(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return run
    eager = _trainer(tmp_path / "eager", max_steps=4)
    eager.train()
    monkeypatch.setattr(torch, "compile", broken_compile)
    logs = []
    compiled = _trainer(tmp_path / "compiled", max_steps=4, compile=True, log=logs.append)
    compiled.train()
    warnings = [m for m in logs if "--compile" in m]
    assert warnings == [("seqgen: warning: --compile failed (RuntimeError: InvalidCxxCompiler: No working C++ "
                         "compiler found); training without it")]
    _assert_close(_weights(eager), _weights(compiled), atol=0)
