#!/usr/bin/env python
"""One table for this machine: `seqgen bench` as a script (no dataset, no network).

    python scripts/bench_all.py                            # CPU or the GPU, about a minute on 2 CPU cores
    python scripts/bench_all.py --device cuda --seconds 10 --json bench.json
    python scripts/bench_all.py --threads 1                # next to other work (see docs/performance.md)

Rows: train tokens/s (the default translation model), decode sentences/s greedy and beam 5 (batch 64),
caption images/s (CNN + beam 5, batch 64), char generation chars/s (batch 1); each with its model FLOP/s and
MFU against the matmul rate measured in the same run (float32; on CUDA also bfloat16). The measurements,
inputs and FLOP counting are in seqgen/bench.py; the real-data benchmarks are the other bench_*.py scripts.
"""
from __future__ import annotations

import sys

from seqgen.cli import main as seqgen_main

if __name__ == "__main__":
    sys.exit(seqgen_main(["bench", *sys.argv[1:]]))
