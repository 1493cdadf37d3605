#!/usr/bin/env python
"""Benchmark: what a beam search costs per batch as the batch shrinks — the decoder's steps against the rest
(the encoder and the search's own bookkeeping).

    python scripts/bench_beam_batch.py --data-dir ../shared/data
    python scripts/bench_beam_batch.py --data-dir ../shared/data --batch-sizes 64 32 16 8 --beam 5

Translates the first --sentences sentences of Multi30k test_2016_flickr with the shipped `multi30k-de-en` model
(sorted by length and cut into batches, as `seqgen translate` does) at each batch size, best of --repeats, then
once more with `RNNDecoder.step` timed; and in arrival order (consecutive sentences per batch, unsorted across
batches, as a server's requests come), best of --repeats. A server's batch is as large as the requests in
flight, so this is the ceiling of `seqgen serve`'s throughput at that many clients (scripts/bench_serve.py
measures the server).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from seqgen.allocator import tune_cpu_allocator
from seqgen.bench import best_seconds, print_rows
from seqgen.decoders.rnn import RNNDecoder
from seqgen.generation import GenerationConfig
from seqgen.inference.translation import translate
from seqgen.model import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("SEQGEN_DATA", os.path.join("..", "shared", "data")))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 32, 16], help="(default: 64 32 16)")
    p.add_argument("--beam", type=int, default=5, help="(default: 5)")
    p.add_argument("--sentences", type=int, default=640, help="test sentences to translate (default: 640)")
    p.add_argument("--repeats", type=int, default=2, help="timed translations per batch size (default: 2)")
    args = p.parse_args()
    path = os.path.join(args.data_dir, "multi30k", "test_2016_flickr.de")
    if not os.path.isfile(path):
        p.error(f"--data-dir {args.data_dir}: no multi30k/test_2016_flickr.de there")
    if min(args.batch_sizes) < 1 or args.beam < 1 or args.sentences < 1 or args.repeats < 1:
        p.error("--batch-sizes, --beam, --sentences and --repeats must be >= 1")
    tune_cpu_allocator()   # as the seqgen CLI does
    model = load_model("multi30k-de-en", task="translation")
    with open(path, encoding="utf-8") as f:
        sentences = f.read().splitlines()[:args.sentences]
    gen = GenerationConfig(beam=args.beam)
    translate(model, sentences[:64], gen)   # warm-up: the first batch builds oneDNN primitives and weight copies

    spent = {"seconds": 0.0, "calls": 0}
    plain_step = RNNDecoder.step

    def timed_step(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return plain_step(self, *a, **kw)
        finally:
            spent["seconds"] += time.perf_counter() - t0
            spent["calls"] += 1

    rows = [("batch", "sentences/s | ms per batch | decoder steps per batch | ms per step | ms per batch outside "
                      "the decoder's steps | sentences/s in arrival order")]
    for size in args.batch_sizes:
        batches = -(-len(sentences) // size)
        best = best_seconds(lambda: translate(model, sentences, gen, batch_size=size), args.repeats, model.device)
        spent.update(seconds=0.0, calls=0)
        RNNDecoder.step = timed_step
        try:
            total = best_seconds(lambda: translate(model, sentences, gen, batch_size=size), 1, model.device)
        finally:
            RNNDecoder.step = plain_step
        # as a server meets them: consecutive sentences, each batch as long as its longest sentence
        arrival = best_seconds(lambda: [translate(model, sentences[i:i + size], gen, batch_size=size)
                                        for i in range(0, len(sentences), size)], args.repeats, model.device)
        rows.append((str(size), f"{len(sentences) / best:,.1f} | {best * 1000 / batches:,.1f} | "
                                f"{spent['calls'] / batches:.1f} | {spent['seconds'] * 1000 / spent['calls']:.2f} | "
                                f"{(total - spent['seconds']) * 1000 / batches:,.1f} | "
                                f"{len(sentences) / arrival:,.1f}"))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
