#!/usr/bin/env python
"""Benchmark: data-parallel scaling of `seqgen train translation` on this machine's CPU cores.

    python scripts/bench_ddp.py --data-dir ../shared/data/multi30k --seconds 120
    python scripts/bench_ddp.py --synthetic --seconds 20          # no data needed (a smoke test)

Runs the real command line under torchrun, once with 1 process and once with 2 processes (--procs),
each process with --threads torch threads (default 1), for --seconds of training time each, and prints
the training target tokens/s of all processes together (what rank 0 logs: every step's global batch)
and the scaling efficiency, tokens/s(N) / (N x tokens/s(1)).

Every run trains the task's default model (--config YAML to change it) on the same data with the same
per-process batch (--max-tokens, or --batch-size sentences), so N processes train on N batches a step.
The sentencepiece model is trained once here and passed to every run (--src-spm): no run spends its
time on it, and all runs share one vocabulary. Validation uses 16 sentences (only the training rate
counts). The first logged window (start-up, first allocations) is left out of the rate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

from seqgen.allocator import tune_cpu_allocator
from seqgen.tasks.translation import TranslationDataConfig, build_codecs, read_corpus


def default_data_dir() -> str | None:
    root = os.environ.get("SEQGEN_DATA")
    return os.path.join(root, "multi30k") if root else None


def write_lines(path: str, lines: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return path


def synthetic(folder: str, n: int = 20000) -> tuple[str, str, str, str]:
    """Reverse sequences of number words: a stand-in corpus of Multi30k-like sentence lengths."""
    rng = random.Random(0)
    src = [" ".join(str(rng.randrange(2000)) for _ in range(rng.randint(6, 24))) for _ in range(n)]
    tgt = [" ".join(reversed(s.split())) for s in src]
    return (write_lines(os.path.join(folder, "train.src"), src), write_lines(os.path.join(folder, "train.tgt"), tgt),
            write_lines(os.path.join(folder, "val.src"), src[:16]), write_lines(os.path.join(folder, "val.tgt"), tgt[:16]))


def first_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(16)]


def prepare(args, folder: str) -> list[str]:
    """The data flags every run shares (files, vocabulary, batch size)."""
    batch = ["--max-tokens", str(args.max_tokens)] if args.max_tokens else ["--batch-size", str(args.batch_size)]
    if args.synthetic:
        src, tgt, vsrc, vtgt = synthetic(folder)
        return ["--src-train", src, "--tgt-train", tgt, "--src-valid", vsrc, "--tgt-valid", vtgt, "--level", "word",
                *batch]
    d = args.data_dir
    if not d or not os.path.isfile(os.path.join(d, "train.de")):
        sys.exit(f"bench_ddp: no Multi30k at {d!r}: pass --data-dir (or set SEQGEN_DATA), or --synthetic")
    vsrc = write_lines(os.path.join(folder, "val.de"), first_lines(os.path.join(d, "val.de")))
    vtgt = write_lines(os.path.join(folder, "val.en"), first_lines(os.path.join(d, "val.en")))
    t0 = time.perf_counter()
    corpus, _ = read_corpus(os.path.join(d, "train.de"), os.path.join(d, "train.en"), "", what="training")
    codec, _ = build_codecs(TranslationDataConfig(vocab_size=args.vocab_size), corpus)
    spm = os.path.join(folder, "joint.model")
    with open(spm, "wb") as f:
        f.write(codec.tokenizer.model_proto)
    print(f"sentencepiece ({args.vocab_size} pieces) trained once in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return ["--src-train", os.path.join(d, "train.de"), "--tgt-train", os.path.join(d, "train.en"),
            "--src-valid", vsrc, "--tgt-valid", vtgt, "--src-spm", spm, *batch]


def run(args, procs: int, data_flags: list[str], folder: str) -> dict:
    out = os.path.join(folder, f"run{procs}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "seqgen.cli", "train", "translation", *data_flags, "--out", out, "--device", "cpu",
           "--time-budget", str(args.seconds / 60), "--max-steps", str(10 ** 9), "--eval-every", str(10 ** 9),
           "--checkpoint-every", str(10 ** 9), "--log-every", str(args.log_every), "--progress", "false",
           "--eval-max-len", "20"]
    if args.config:
        cmd += ["--config", args.config]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_ddp: {procs} process(es) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        logs = [json.loads(line) for line in f if '"tokens_per_s"' in line]
    rates = [r["tokens_per_s"] for r in logs[1:]] or [r["tokens_per_s"] for r in logs]
    return {"procs": procs, "threads": args.threads, "steps": logs[-1]["step"] if logs else 0,
            "tokens_per_s": statistics.mean(rates) if rates else 0.0, "windows": len(rates), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    tune_cpu_allocator()   # as the seqgen CLI does (seqgen/allocator.py); SEQGEN_MALLOC=system to compare
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--data-dir", default=default_data_dir(), help="Multi30k folder (default: $SEQGEN_DATA/multi30k)")
    p.add_argument("--synthetic", action="store_true", help="a generated corpus instead of Multi30k")
    p.add_argument("--seconds", type=float, default=120.0, help="training seconds per run (default: 120)")
    p.add_argument("--procs", default="1,2", help="process counts to compare, the first is the baseline (default: 1,2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch and process (default: 64)")
    p.add_argument("--max-tokens", type=int, default=0, help="token budget per batch instead of --batch-size")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint sentencepiece pieces (default: 8000)")
    p.add_argument("--log-every", type=int, default=10, help="steps per logged rate window (default: 10)")
    p.add_argument("--config", help="YAML run config (model, training) for every run")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    procs = [int(x) for x in args.procs.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_ddp-") as folder:
        data_flags = prepare(args, folder)
        results = []
        for n in procs:
            print(f"{n} process(es) x {args.threads} thread(s), {args.seconds:g}s of training ...", file=sys.stderr)
            results.append(run(args, n, data_flags, folder))
    base = results[0]["tokens_per_s"] / results[0]["procs"]
    print(f"\nseqgen train translation, data-parallel on {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores), {'synthetic' if args.synthetic else args.data_dir}")
    print(f"{'processes x threads':<20} {'tokens/s':>10} {'steps':>7} {'scaling':>8}")
    for r in results:
        r["scaling"] = r["tokens_per_s"] / (r["procs"] * base) if base else 0.0
        print(f"{r['procs']} x {r['threads']:<16} {r['tokens_per_s']:>10,.0f} {r['steps']:>7} {r['scaling']:>8.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
