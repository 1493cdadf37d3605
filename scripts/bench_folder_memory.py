#!/usr/bin/env python
"""Benchmark: memory of `seqgen caption` over a large folder (issue #5, item 7) — RSS must stay flat.

    python scripts/bench_folder_memory.py                          # 20,000 generated 64px images
    python scripts/bench_folder_memory.py --images 100000 --folder /tmp/many

Generates --images small JPEG/PNG files (coloured shapes on noise; a few broken files mixed in) into
--folder (kept between runs: generation is skipped when the folder already holds them), builds an untrained
`tiny`-backbone captioning model (memory does not depend on the weights), captions the folder to JSONL with
`caption_folder` (the code behind `seqgen caption`) and samples the resident memory (RSS) of the main process
and of its DataLoader workers every --sample-seconds. Prints RSS at the start (model loaded, before the
folder is listed), at each 10% of the images, at the end, and the peak; writes OUT/memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

from seqgen.allocator import tune_cpu_allocator
from seqgen.bench import MemorySampler, print_rows


def make_folder(folder: str, n: int, size: int, seed: int) -> None:
    """n images named 000000.jpg ... (every 10th a PNG); every 1000th file is broken on purpose."""
    from PIL import Image, ImageDraw
    os.makedirs(folder, exist_ok=True)
    if len(os.listdir(folder)) >= n:
        return
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for i in range(n):
        ext = ".png" if i % 10 == 9 else ".jpg"
        path = os.path.join(folder, f"{i:06d}{ext}")
        if i % 1000 == 999:
            with open(path, "wb") as f:          # a truncated/garbage file the run must skip and report
                f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
            continue
        im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(4, size // 3)
            d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        im.save(path, quality=85) if ext == ".jpg" else im.save(path)
    print(f"generated {n:,} images in {time.perf_counter() - t0:.0f}s into {folder}", file=sys.stderr)


def tiny_captioner(size: int, seed: int):
    """An untrained tiny-CNN + attention-LSTM captioner (the weights do not change memory use)."""
    from seqgen.decoders.rnn import DecoderConfig
    from seqgen.encoders.cnn import CNNEncoderConfig
    from seqgen.model import ModelConfig, Seq2Seq
    from seqgen.tokenizers import TextCodec
    torch.manual_seed(seed)
    words = "a the red blue green circle square left of right above below".split()
    codec = TextCodec.build("word", [" ".join(words)])
    cfg = ModelConfig(task="captioning", image_encoder=CNNEncoderConfig(backbone="tiny", image_size=size),
                      decoder=DecoderConfig(cell="lstm", emb=64, hidden=128, attention="luong_general"))
    return Seq2Seq(cfg, tgt=codec).eval()


def main() -> int:
    tune_cpu_allocator()   # as the seqgen CLI does (seqgen/allocator.py); SEQGEN_MALLOC=system to compare
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--folder", default="runs/bench_memory/images", help="where the images are generated")
    p.add_argument("--out", default="runs/bench_memory")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default: seqgen's choice)")
    p.add_argument("--sample-seconds", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    from seqgen.generation import GenerationConfig
    from seqgen.tasks.caption_folder import caption_folder

    make_folder(args.folder, args.images, args.size, args.seed)
    model = tiny_captioner(args.size, args.seed)
    os.makedirs(args.out, exist_ok=True)
    out_jsonl = os.path.join(args.out, "captions.jsonl")
    sampler = MemorySampler(os.getpid(), args.sample_seconds, children=True)
    time.sleep(2 * args.sample_seconds)           # a "start" sample before any image is listed
    summary = caption_folder(model, [args.folder], out_jsonl, GenerationConfig(beam=args.beam, max_len=12),
                             batch_size=args.batch_size, num_workers=args.num_workers, resume=False,
                             progress=True)
    time.sleep(2 * args.sample_seconds)
    sampler.stop()

    s = [(t, mem["rss"], workers) for t, mem, workers in sampler.samples]    # (seconds, main RSS, workers' RSS)
    start_main, end_main = s[0][1], s[-1][1]
    peak_main = max(m for _, m, _ in s)
    peak_workers = max(w for _, _, w in s)
    # RSS at each tenth of the run (by time, which is proportional to images at a steady rate)
    t_end = s[-1][0]
    tenths = [min(s, key=lambda x: abs(x[0] - t_end * k / 10)) for k in range(11)]
    result = {"images": args.images, "captioned": summary.captioned, "skipped": len(summary.skipped),
              "images_per_s": summary.images_per_second, "rss_start_mib": start_main, "rss_end_mib": end_main,
              "rss_peak_mib": peak_main, "workers_rss_peak_mib": peak_workers,
              "rss_by_tenth_mib": [round(m, 1) for _, m, _ in tenths],
              "workers_rss_by_tenth_mib": [round(w, 1) for _, _, w in tenths]}
    with open(os.path.join(args.out, "memory.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    rows = [("images in the folder", f"{args.images:,} ({args.size}px, 1 in 1000 broken)"),
            ("captioned / skipped", f"{summary.captioned:,} / {len(summary.skipped):,}"),
            ("images/s", f"{summary.images_per_second:.0f}"),
            ("main process RSS at start (MiB)", f"{start_main:.1f}"),
            ("main process RSS at end (MiB)", f"{end_main:.1f}"),
            ("main process RSS peak (MiB)", f"{peak_main:.1f}"),
            ("main RSS at each 10% (MiB)", " ".join(f"{m:.0f}" for _, m, _ in tenths)),
            ("workers' RSS, summed, peak (MiB)", f"{peak_workers:.1f}"),
            ("workers' RSS at each 10% (MiB)", " ".join(f"{w:.0f}" for _, _, w in tenths))]
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
