#!/usr/bin/env python
"""Warm start (`--init-from`) against training from scratch on a small in-domain set: the two learning curves.

    python scripts/bench_warmstart.py --data-dir ../shared/data --out runs/warmstart

The small set: the first --pairs pairs of Multi30k's validation set (the shipped model trained on the training
set and never on these), validated on the remaining ones (greedy BLEU every --eval-every steps, the curve), and
both runs' best.pt scored on test_2016_flickr with beam 5. The warm run starts from the shipped
`multi30k-de-en` (its vocabulary and architecture) with a small constant learning rate; the scratch run trains
the default translation model with a 1,000-piece vocabulary (8,000 pieces cannot be learnt from so little
text) and the default schedule. Same steps, same batches of 64 sentences. Quality is by steps, so the curves
do not depend on the machine's load; the minutes do.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from seqgen.bench import print_rows
from seqgen.cli import main as seqgen_main
from seqgen.generation import GenerationConfig
from seqgen.inference.translation import translate
from seqgen.metrics import corpus_bleu
from seqgen.model import load_model

WARM = ["--init-from", "multi30k-de-en", "--lr", "1e-4", "--schedule", "constant", "--warmup-steps", "0"]
SCRATCH = ["--vocab-size", "1000"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("SEQGEN_DATA", os.path.join("..", "shared", "data")))
    p.add_argument("--out", default="runs/warmstart", help="folder for the data split and the two runs")
    p.add_argument("--pairs", type=int, default=800, help="training pairs taken from val.de/val.en (default: 800)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of each run (default: 400)")
    p.add_argument("--eval-every", type=int, default=50, help="validation every N steps (default: 50)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--png", help="also draw the two curves into this PNG")
    args = p.parse_args()
    d = os.path.join(args.data_dir, "multi30k")
    src = open(os.path.join(d, "val.de"), encoding="utf-8").read().splitlines()
    tgt = open(os.path.join(d, "val.en"), encoding="utf-8").read().splitlines()
    if not 0 < args.pairs < len(src):
        print(f"bench_warmstart: error: --pairs must be in 1..{len(src) - 1}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    files = {}
    for name, lines in (("train.de", src[:args.pairs]), ("train.en", tgt[:args.pairs]),
                        ("valid.de", src[args.pairs:]), ("valid.en", tgt[args.pairs:])):
        files[name] = os.path.join(args.out, name)
        with open(files[name], "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    common = ["train", "translation", "--src-train", files["train.de"], "--tgt-train", files["train.en"],
              "--src-valid", files["valid.de"], "--tgt-valid", files["valid.en"], "--max-steps", str(args.steps),
              "--eval-every", str(args.eval_every), "--checkpoint-every", str(args.eval_every), "--batch-size", "64",
              "--seed", str(args.seed), "--progress", "false", "--max-epochs", "100000"]
    test_src = open(os.path.join(d, "test_2016_flickr.de"), encoding="utf-8").read().splitlines()
    test_ref = open(os.path.join(d, "test_2016_flickr.en"), encoding="utf-8").read().splitlines()
    curves, rows = {}, [("run", "minutes | validation BLEU (greedy) by step | test_2016_flickr BLEU (beam 5)")]
    start = translate(load_model("multi30k-de-en", task="translation"), src[args.pairs:], GenerationConfig(),
                      batch_size=64)
    start_bleu = corpus_bleu(start, tgt[args.pairs:])["bleu"]
    for name, extra in (("warm start (multi30k-de-en)", WARM), ("from scratch", SCRATCH)):
        out = os.path.join(args.out, "warm" if extra is WARM else "scratch")
        t0 = time.perf_counter()
        if not os.path.exists(os.path.join(out, "best.pt")) and seqgen_main([*common, *extra, "--out", out]):
            print(f"bench_warmstart: error: the {name} run failed", file=sys.stderr)
            return 1
        minutes = (time.perf_counter() - t0) / 60
        evals = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"eval"' in line]
        curves[name] = [(0, start_bleu if extra is WARM else 0.0)] + [(e["step"], e["eval"]["bleu"]) for e in evals]
        hyps = translate(load_model(os.path.join(out, "best.pt"), task="translation"), test_src,
                         GenerationConfig(beam=5), batch_size=64)
        curve = ", ".join(f"{s}: {b:.1f}" for s, b in curves[name])
        rows.append((name, f"{minutes:.1f} | {curve} | {corpus_bleu(hyps, test_ref)['bleu']:.2f}"))
    print_rows(rows)
    print(f"(step 0 of the warm run: the shipped model itself; {args.pairs} training pairs, "
          f"{len(src) - args.pairs} validation pairs)")
    if args.png:
        from seqgen.plots import _pyplot, _save
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in curves.items():
            ax.plot([s for s, _ in pts], [b for _, b in pts], marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("validation BLEU (greedy)")
        ax.legend()
        _save(fig, args.png)
        print(f"curves in {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
