#!/usr/bin/env python
"""Benchmark: what a training run's resident memory is made of — mapped files, the malloc heap (in use and
free-but-resident) and the rest — and how much activation memory a step keeps for its backward.

    python scripts/bench_train_heap.py --data-dir ../shared/data --minutes 6
    python scripts/bench_train_heap.py --data-dir ../shared/data --minutes 6 --trim-every 2
    python scripts/bench_train_heap.py --data-dir ../shared/data --minutes 6 -- --max-len 30
    python scripts/bench_train_heap.py --saved-only

Runs the shipped `multi30k-de-en` recipe (seqgen/zoo/registry.py) in this process for --minutes training minutes
(the allocator tuned as the `seqgen` CLI tunes it: one arena, no mmap, so every malloc'd block is in one heap)
and reads /proc/self/status and glibc's `mallinfo2()` every 2 s; prints the samples of the last third of the run
(the plateau) and the median logged tokens/s. --trim-every S also calls `malloc_trim(0)` every S seconds from
the sampling thread, to see what handing free heap pages back saves and costs. Then, or alone with --saved-only,
counts the tensors autograd saves for one training step of the default model on 64 random sentence pairs of
20 and of 50 tokens each way (bf16 autocast where the CPU has it), by width and dtype. glibc on Linux only.
`scripts/bench_train_memory.py` draws the whole RSS curve of a run from outside the process.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import json
import os
import statistics
import sys
import threading
import time

import torch

from seqgen.allocator import tune_cpu_allocator
from seqgen.bench import print_rows, process_memory
from seqgen.zoo.registry import ENTRIES


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def heap_sampler(libc: ctypes.CDLL, trim_every: float, rows: list, done: threading.Event) -> None:
    """Append (seconds, VmRSS, RssFile, RssAnon, heap touched, in use, free) MiB every 2 s until `done`."""
    t0 = last_trim = time.perf_counter()
    while not done.is_set():
        if trim_every and time.perf_counter() - last_trim >= trim_every:
            libc.malloc_trim(0)
            last_trim = time.perf_counter()
        info, mem = libc.mallinfo2(), process_memory(os.getpid())
        rows.append((time.perf_counter() - t0, mem["rss"], mem["file"], mem["anon"], info.arena / 2**20,
                     info.uordblks / 2**20, info.fordblks / 2**20))
        done.wait(2.0)


def run_recipe(data_dir: str, minutes: float, out: str, trim_every: float, seed: int, extra: list[str]) -> None:
    from seqgen.cli import main as seqgen_main
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")   # as seqgen/allocator.py loads it
    libc.mallinfo2.restype = MallInfo2
    argv = [a.replace("{data}", data_dir) for a in ENTRIES["multi30k-de-en"].recipe]
    argv[argv.index("--eval-every") + 1] = "300"
    argv[argv.index("--seed") + 1] = str(seed)
    rows: list = []
    done = threading.Event()
    thread = threading.Thread(target=heap_sampler, args=(libc, trim_every, rows, done), daemon=True)
    thread.start()
    try:
        if seqgen_main([*argv, "--time-budget", str(minutes), "--device", "cpu", "--log-every", "50",
                        "--out", out, *extra]):
            sys.exit("bench_train_heap: the training run failed")
    finally:
        done.set()
        thread.join()
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:   # one record per log line
        speeds = [r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r]
    plateau = [r for r in rows if r[0] >= rows[-1][0] * 2 / 3]
    print_rows([("seconds", "VmRSS | RssFile | RssAnon | heap touched | heap in use | heap free (MiB)")]
               + [(f"{r[0]:.0f}", " | ".join(f"{v:,.0f}" for v in r[1:])) for r in plateau])
    print(f"peak VmRSS {max(r[1] for r in rows):,.0f} MiB; median {statistics.median(speeds) if speeds else 0:,.0f} "
          f"tokens/s over {len(speeds)} log lines" + (f"; malloc_trim every {trim_every:g} s" if trim_every else ""))


def saved_activations() -> None:
    """Bytes autograd saves for one training step of the default translation model, by (width, dtype)."""
    from seqgen.data.batch import Batch
    from seqgen.model import load_model
    from seqgen.precision import autocast
    model = load_model("multi30k-de-en", task="translation")
    model.train()
    torch.manual_seed(0)
    src_vocab, tgt_vocab = len(model.src.vocab), len(model.tgt.vocab)
    for length in (20, 50):
        batch = Batch(target=torch.randint(4, tgt_vocab, (64, length + 1)),
                      source=torch.randint(4, src_vocab, (64, length)), source_lengths=torch.full((64,), length))
        seen: dict[int, int] = {}
        by_kind: collections.Counter = collections.Counter()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = storage.nbytes()
                by_kind[(t.shape[-1] if t.dim() else 1, str(t.dtype).replace("torch.", ""))] += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast("auto", torch.device("cpu")):
            loss, _ = model.loss(batch, 0.1)
        loss.backward()
        model.zero_grad(set_to_none=True)
        print(f"64 pairs of {length} tokens: {sum(seen.values()) / 2**20:,.0f} MiB saved for backward; largest: "
              + ", ".join(f"width {w} {dt} {n / 2**20:,.0f} MiB" for (w, dt), n in by_kind.most_common(4)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("SEQGEN_DATA", os.path.join("..", "shared", "data")))
    p.add_argument("--minutes", type=float, default=6.0, help="training minutes (default: 6)")
    p.add_argument("--trim-every", type=float, default=0.0,
                   help="also malloc_trim(0) every this many seconds (default: 0, never)")
    p.add_argument("--out", default="runs/bench-heap", help="the run folder (default: runs/bench-heap); must be new")
    p.add_argument("--seed", type=int, default=1, help="the run's --seed (default: 1)")
    p.add_argument("--saved-only", action="store_true", help="only count the saved activations (no training run)")
    p.add_argument("extra", nargs="*", help="more `seqgen train` options for the run, after --: `-- --max-len 30`")
    args = p.parse_args()
    if not args.saved_only:
        if args.minutes <= 0 or args.trim_every < 0:
            p.error("--minutes must be > 0 and --trim-every >= 0")
        if not os.path.isfile(os.path.join(args.data_dir, "multi30k", "train.de")):
            p.error(f"--data-dir {args.data_dir}: no multi30k/train.de there")
        if os.path.exists(args.out):
            p.error(f"--out {args.out} exists; give a new folder")
        tune_cpu_allocator()   # as the seqgen CLI does, before any thread starts
        run_recipe(args.data_dir, args.minutes, args.out, args.trim_every, args.seed, args.extra)
    saved_activations()
    return 0


if __name__ == "__main__":
    sys.exit(main())
