#!/usr/bin/env python
"""Checkpoint averaging and ensembles against the best single model: test BLEU and decoding speed.

    python scripts/bench_combine.py --data-dir ../shared/data --run runs/mt-seed2 --with multi30k-de-en

RUN is a translation run folder trained with `--keep-checkpoints N` (its step-STEP.pt files); --with names
other models of the same target vocabulary (other runs' best.pt, or a shipped name). Rows: each single model
(RUN/best.pt and every --with model), the average of RUN's last k kept checkpoints for each k in --last, and
the ensembles (RUN/best.pt with the --with models; the best average with them). Every row is decoded on
Multi30k test_2016_flickr with beam 5 (batch 64, the `seqgen translate` defaults) and scored with sacreBLEU;
the speed is sentences/s of that decoding, best of --repeat runs. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from seqgen.average import average_models
from seqgen.bench import print_rows
from seqgen.generation import GenerationConfig
from seqgen.inference.translation import translate
from seqgen.metrics import corpus_bleu
from seqgen.model import Ensemble, load_model
from seqgen.train import kept_checkpoints


def score(model, src: list[str], ref: list[str], repeat: int) -> tuple[float, float]:
    """(BLEU, sentences/s): beam 5, batch 64; the speed is the best of `repeat` decodings."""
    gen = GenerationConfig(beam=5)
    translate(model, src[:32], gen)                      # warm-up
    best, hyps = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        hyps = translate(model, src, gen, batch_size=64)
        best = min(best, time.perf_counter() - t0)
    return corpus_bleu(hyps, ref)["bleu"], len(src) / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("SEQGEN_DATA", os.path.join("..", "shared", "data")))
    p.add_argument("--run", required=True, help="a translation run folder with step-STEP.pt files")
    p.add_argument("--with", dest="others", action="append", default=[],
                   help="another model for the ensembles (repeatable): a checkpoint or a shipped name")
    p.add_argument("--last", default="2,4,8", help="average the last k kept checkpoints, for each k (default: 2,4,8)")
    p.add_argument("--repeat", type=int, default=2, help="decodings per row for the speed (default: 2)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    d = os.path.join(args.data_dir, "multi30k")
    src = open(os.path.join(d, "test_2016_flickr.de"), encoding="utf-8").read().splitlines()
    ref = open(os.path.join(d, "test_2016_flickr.en"), encoding="utf-8").read().splitlines()
    kept = kept_checkpoints(args.run)
    if not kept:
        print(f"bench_combine: error: {args.run} has no step-STEP.pt files (train with --keep-checkpoints N)",
              file=sys.stderr)
        return 2
    rows, results = [("model", "test_2016_flickr BLEU (beam 5), decoding speed")], {}

    def row(name: str, model) -> None:
        model.eval()
        bleu, speed = score(model, src, ref, args.repeat)
        results[name] = (bleu, model)
        rows.append((name, f"{bleu:.2f}, {speed:.1f} sentences/s"))
        print(f"{name}: BLEU {bleu:.2f}, {speed:.1f} sentences/s", file=sys.stderr, flush=True)

    best_path = os.path.join(args.run, "best.pt")
    row(f"{best_path} (single)", load_model(best_path, task="translation"))
    for other in args.others:
        row(f"{other} (single)", load_model(other, task="translation"))
    singles = max(b for b, _ in results.values())
    averages = []
    for k in (int(k) for k in args.last.split(",")):
        if k < 2 or k > len(kept):
            continue
        name = f"average of the last {k} ({os.path.basename(kept[-k])}..{os.path.basename(kept[-1])})"
        row(name, average_models(kept[-k:]))
        averages.append(name)
    if args.others:
        members = [load_model(best_path, task="translation")] + [load_model(o, task="translation")
                                                                 for o in args.others]
        row(f"ensemble: best.pt + {' + '.join(args.others)}", Ensemble(members))
        if averages:
            top = max(averages, key=lambda n: results[n][0])
            members = [results[top][1]] + [load_model(o, task="translation") for o in args.others]
            row(f"ensemble: best average + {' + '.join(args.others)}", Ensemble(members))
    print_rows(rows)
    gain = max(b for b, _ in results.values()) - singles
    print(f"best combined minus best single: {gain:+.2f} BLEU (target >= +0.70)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
