#!/usr/bin/env python
"""Train an image captioner: a thin wrapper over `seqgen train captioning` that fills in a dataset folder.

    python scripts/train_captioner.py --data-dir ../shared/data/flickr8k --out runs/cap
    SEQGEN_DATA=../shared/data python scripts/train_captioner.py --out runs/cap --backbone efficientnet_lite0 \\
        --weights imagenet --time-budget 45 --eval-every 1000

A data folder holds images/, captions.tsv (or a Karpathy dataset_*.json / COCO json / Flickr8k token file
named by --captions) and train.txt / val.txt split files; any flag given explicitly wins. Every other flag
is `seqgen train captioning`'s (see `seqgen train captioning --help`): with a frozen backbone (the default)
the image features are computed once into OUT/features and training reads them from there.
"""
from __future__ import annotations

import os
import sys

from seqgen.cli import main as seqgen_main


def default_data_dir() -> str | None:
    root = os.environ.get("SEQGEN_DATA")
    return os.path.join(root, "flickr8k") if root else None


def dataset_flags(data_dir: str, argv: list[str]) -> list[str]:
    """--images/--captions/--train-split/--valid-split from `data_dir` where the user did not give them."""
    found = {"--images": "images", "--captions": "captions.tsv", "--train-split": "train.txt",
             "--valid-split": "val.txt"}
    extra = []
    for flag, name in found.items():
        path = os.path.join(data_dir, name)
        if flag not in argv and os.path.exists(path):
            extra += [flag, path]
    return extra


def run(argv: list[str]) -> int:
    data_dir = default_data_dir()
    if "--data-dir" in argv:
        i = argv.index("--data-dir")
        if i + 1 >= len(argv):
            print("train_captioner.py: --data-dir needs a folder", file=sys.stderr)
            return 2
        data_dir = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    if data_dir and not os.path.isdir(data_dir):
        print(f"train_captioner.py: error: {data_dir}: no such folder (--data-dir or $SEQGEN_DATA)", file=sys.stderr)
        return 2
    extra = dataset_flags(data_dir, argv) if data_dir and "--resume" not in argv else []
    return seqgen_main(["train", "captioning", *extra, *argv])


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
    sys.exit(run(sys.argv[1:]))
