#!/usr/bin/env python
"""Caption every image in folders (or given files) with a trained captioner: `seqgen caption` as a script.

    python scripts/caption_folder.py runs/cap/best.pt photos/ --out captions.jsonl
    python scripts/caption_folder.py runs/cap/best.pt photos/ --out captions.csv --recursive --beam 5 \\
        --batch-size 64 --attention-png attention/ --skipped skipped.tsv
    torchrun --nproc_per_node 4 scripts/caption_folder.py runs/cap/best.pt photos/ --out captions.jsonl
        # 4 processes (one per GPU, or sharing the CPU cores), each captioning every 4th batch; one merged file

Streams the folder (bounded memory however many images), decodes images in --num-workers processes, runs
the CNN and beam search 64 images at a time and appends {"image", "caption", "score"} records (JSONL, or CSV
by extension) flushed after every batch. Run it again after an interruption: images already in the output
are skipped (--overwrite starts over). Unreadable images are listed with their reason; the exit status is 0
unless no image at all could be captioned. In Python:

    from seqgen import load_model
    from seqgen.generation import GenerationConfig
    from seqgen.tasks.caption_folder import caption_folder
    model = load_model("runs/cap/best.pt", task="captioning")
    summary = caption_folder(model, ["photos/"], "captions.jsonl", GenerationConfig(beam=5))
"""
from __future__ import annotations

import sys

from seqgen.cli import main as seqgen_main

if __name__ == "__main__":
    sys.exit(seqgen_main(["caption", *sys.argv[1:]]))
