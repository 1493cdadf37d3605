#!/usr/bin/env python
"""Cross-entropy then self-critical captioning on Flickr8k: wall time of each stage and the test-split scores.

    python scripts/bench_scst.py --data-dir ../shared/data --out runs/scst-bench

Stage 1 trains the shipped captioner's recipe (`flickr8k-captioner` in seqgen/zoo/registry.py: frozen
EfficientNet-Lite0 features, cross-entropy) into OUT/xe; stage 2 fine-tunes its best.pt with SCST (the flags in
SCST_RECIPE, on the feature cache stage 1 made) into OUT/scst. Each best.pt is then scored on the Flickr8k test
split with `seqgen evaluate`'s code (beam 5, at most 30 tokens, no repeated trigram: the caption defaults).
The minutes include feature extraction and validation; the evaluation is not counted. Run it alone on the
machine. A stage whose best.pt exists is not trained again (its minutes are then shown as n/a).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from seqgen.bench import print_rows
from seqgen.cli import main as seqgen_main
from seqgen.generation import GenerationConfig
from seqgen.inference.captioning import default_caption_gen
from seqgen.model import load_model
from seqgen.tasks.caption_eval import evaluate_captions
from seqgen.zoo import get

# SCST after cross-entropy: a small learning rate on a cosine (the decoder is already trained), no label smoothing
# (the loss is a policy gradient), the 5 best captions of a beam search scored against their mean (sampled
# captions spent the first ~400 steps sharpening the distribution), a reward of CIDEr-D plus the smoothed BLEU-4
# (CIDEr-D alone raised test CIDEr-D but not BLEU-4), and a short EMA of the weights. docs/performance.md has the runs.
SCST_RECIPE = ["--scst", "--scst-samples", "5", "--scst-candidates", "beam", "--scst-bleu-weight", "1.0",
               "--scst-baseline", "mean", "--scst-max-len", "20", "--lr", "1e-4", "--schedule", "cosine",
               "--warmup-steps", "0", "--label-smoothing", "0", "--ema", "0.99", "--batch-size", "32",
               "--max-epochs", "1000", "--patience", "0", "--progress", "false"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("SEQGEN_DATA", os.path.join("..", "shared", "data")))
    p.add_argument("--out", default="runs/scst-bench", help="folder for the two runs (default: runs/scst-bench)")
    p.add_argument("--scst-steps", type=int, default=3200,
                   help="SCST steps, the length of its cosine schedule (default: 3200, ~45 minutes on 2 bf16 cores)")
    p.add_argument("--scst-minutes", type=float, default=45.0,
                   help="at most this many SCST training minutes, validation excluded (--time-budget; default: 45)")
    p.add_argument("--eval-every", type=int, default=200, help="SCST validation every N steps (default: 200)")
    p.add_argument("--seed", type=int, default=1, help="the SCST run's seed (stage 1 is the recipe's, seed 1)")
    args = p.parse_args()
    flickr = os.path.join(args.data_dir, "flickr8k")
    if not os.path.isdir(flickr):
        print(f"bench_scst: error: {flickr}: no such folder (--data-dir)", file=sys.stderr)
        return 2
    xe, scst = os.path.join(args.out, "xe"), os.path.join(args.out, "scst")
    recipe = [a.replace("{data}", args.data_dir) for a in get("flickr8k-captioner").entry.recipe]
    minutes: dict[str, float | None] = {}

    def stage(name: str, argv: list[str], out: str) -> None:
        if os.path.exists(os.path.join(out, "best.pt")):
            minutes[name] = None
            return
        print(f"bench_scst: seqgen {' '.join(argv)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if seqgen_main(argv):
            raise SystemExit(f"bench_scst: the {name} stage failed")
        minutes[name] = (time.perf_counter() - t0) / 60

    stage("xe", [*recipe, "--out", xe], xe)
    data = recipe[2:recipe.index("--seed")]           # --images ... --valid-split ...
    stage("scst", ["train", "captioning", *data, "--init-from", os.path.join(xe, "best.pt"), "--feature-cache",
                   os.path.join(xe, "features"), *SCST_RECIPE, "--max-steps", str(args.scst_steps),
                   "--time-budget", str(args.scst_minutes), "--seed", str(args.seed),
                   "--eval-every", str(args.eval_every), "--checkpoint-every", str(args.eval_every), "--out", scst],
          scst)
    gen: GenerationConfig = default_caption_gen()
    rows = [("stage", "minutes", "test BLEU-1 / 2 / 3 / 4", "ROUGE-L", "CIDEr-D")]
    for name, run in (("cross-entropy", xe), ("+ SCST", scst)):
        model = load_model(os.path.join(run, "best.pt"), task="captioning")
        _, _, s = evaluate_captions(model, os.path.join(flickr, "images"), os.path.join(flickr, "captions.tsv"),
                                    os.path.join(flickr, "test.txt"), gen)
        took = minutes["xe" if run == xe else "scst"]
        rows.append((name, "n/a" if took is None else f"{took:.1f}",
                     " / ".join(f"{s[f'bleu{n}']:.2f}" for n in range(1, 5)), f"{s['rouge_l']:.4f}",
                     f"{s['cider']:.4f}"))
    print_rows([(r[0], " | ".join(r[1:])) for r in rows])
    if all(v is not None for v in minutes.values()):
        print(f"total training minutes (feature extraction and validation included): {sum(minutes.values()):.1f} "
              f"(target: <= 60)")
    print("targets: test BLEU-4 >= 23.0 and CIDEr-D >= 0.60, beam 5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
