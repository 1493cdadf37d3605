#!/usr/bin/env python
"""Benchmark: character LM on Tiny Shakespeare under a wall-clock budget (issue #2's targets).

    python scripts/bench_charlm.py --text ../shared/data/tinyshakespeare/input.txt --minutes 30
    SEQGEN_DATA=../shared/data python scripts/bench_charlm.py --minutes 30

Split as nanoGPT's shakespeare_char: first 90% of characters train, last 10% validation; the loss is in
nats per character. Prints one table: validation loss, characters/s trained, characters/s generated at
batch 1 (sampling and greedy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from seqgen.allocator import tune_cpu_allocator
from seqgen.bench import generation_rate
from seqgen.decoders.rnn import DecoderConfig
from seqgen.generation import GenerationConfig
from seqgen.inference.lm import generate_text
from seqgen.model import load_model
from seqgen.tasks.lm import LMDataConfig, LMRunConfig, train_lm
from seqgen.train import TrainConfig


def default_text() -> str | None:
    root = os.environ.get("SEQGEN_DATA")
    return os.path.join(root, "tinyshakespeare", "input.txt") if root else None


def main() -> int:
    tune_cpu_allocator()   # as the seqgen CLI does (seqgen/allocator.py); SEQGEN_MALLOC=system to compare
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--text", default=default_text(), help="input.txt (default: $SEQGEN_DATA/tinyshakespeare/input.txt)")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget (default: 30)")
    p.add_argument("--out", default="runs/bench_charlm")
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru"])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--emb", type=int, default=384)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--gen-chars", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if not args.text or not os.path.isfile(args.text):
        print("bench_charlm: error: pass --text input.txt or set SEQGEN_DATA (Tiny Shakespeare not found)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    run = LMRunConfig(
        data=LMDataConfig(text=args.text, level="char", valid_fraction=0.1, seq_len=args.seq_len,
                          batch_size=args.batch_size),
        decoder=DecoderConfig(cell=args.cell, emb=args.emb, hidden=args.hidden, layers=args.layers,
                              dropout=args.dropout),
        train=TrainConfig(lr=args.lr, warmup_steps=100, schedule="cosine", max_steps=10**9,
                          time_budget=args.minutes, eval_every=args.eval_every, log_every=100,
                          checkpoint_every=args.eval_every, seed=args.seed, device="cpu", progress=False))
    t0 = time.perf_counter()
    state = train_lm(run, args.out, resume=args.resume)
    wall = time.perf_counter() - t0
    with open(os.path.join(args.out, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    curve = [(r["step"], r["eval"]["loss"]) for r in records if "eval" in r]
    model = load_model(os.path.join(args.out, "best.pt"))
    sample_cps = generation_rate(model, GenerationConfig(temperature=0.8, max_len=args.gen_chars), prompt="ROMEO:",
                                 seed=args.seed)
    greedy_cps = generation_rate(model, GenerationConfig(max_len=args.gen_chars), prompt="ROMEO:", seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    rows = [
        ("machine", f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"),
        ("model", f"{args.cell} {args.layers}x{args.hidden}, emb {args.emb}, {params/1e6:.2f}M params, seq {args.seq_len}, batch {args.batch_size}"),
        ("training budget", f"{args.minutes:.1f} min ({state.train_seconds/60:.1f} min training, {wall/60:.1f} min wall incl. eval)"),
        ("steps", f"{state.step}"),
        ("best validation loss (nats/char)", f"{state.best:.4f}"),
        ("train chars/s (median of log windows)", f"{sorted(speeds)[len(speeds)//2]:,.0f}" if speeds else "n/a"),
        ("generate chars/s, batch 1, T=0.8", f"{sample_cps:,.0f}"),
        ("generate chars/s, batch 1, greedy", f"{greedy_cps:,.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n| " + "metric".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print("\nvalidation loss by step: " + ", ".join(f"{s}:{v:.3f}" for s, v in curve))
    print("\nsample (T=0.8):\n" + generate_text(model, "ROMEO:", GenerationConfig(temperature=0.8, max_len=300),
                                               seed=args.seed)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
