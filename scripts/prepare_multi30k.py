#!/usr/bin/env python
"""Check a Multi30k folder and write a ready-to-train config for `seqgen train translation`.

    python scripts/prepare_multi30k.py                                  # ../shared/data/multi30k, De->En
    python scripts/prepare_multi30k.py --data-dir DIR --src en --tgt de --config-out runs/en_de.yaml

The folder needs train.{src,tgt}, val.{src,tgt} and test_2016_flickr.{src,tgt} (plain UTF-8, aligned line by
line). Every file is read and checked (UTF-8, equal line counts, empty lines); the config gets absolute paths
and the default model, and the commands to train, translate and score are printed.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from seqgen.config import to_dict
from seqgen.data.parallel import read_parallel
from seqgen.errors import SeqgenError
from seqgen.tasks.translation import TranslationDataConfig, TranslationRunConfig

SPLITS = ("train", "val", "test_2016_flickr")


def default_data_dir() -> str:
    root = os.environ.get("SEQGEN_DATA")
    return os.path.join(root, "multi30k") if root else os.path.join("..", "shared", "data", "multi30k")


def check_split(data_dir: str, split: str, src: str, tgt: str) -> tuple[str, str, str]:
    """Read one split; returns its two paths and a one-line summary. SeqgenError on a problem."""
    s, t = (os.path.abspath(os.path.join(data_dir, f"{split}.{lang}")) for lang in (src, tgt))
    corpus = read_parallel(s, t)
    n_src = sum(len(x.split()) for x in corpus.src)
    n_tgt = sum(len(x.split()) for x in corpus.tgt)
    note = f", {corpus.skipped_empty} pair(s) with an empty side (skipped in training)" if corpus.skipped_empty else ""
    summary = (f"{split:17s} {len(corpus):6,} pairs, {n_src / max(len(corpus), 1):4.1f} / "
               f"{n_tgt / max(len(corpus), 1):4.1f} words per sentence{note}")
    return s, t, summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="Multi30k folder (default: $SEQGEN_DATA/multi30k, else ../shared/data/multi30k)")
    p.add_argument("--src", default="de", help="source language suffix (default: de)")
    p.add_argument("--tgt", default="en", help="target language suffix (default: en)")
    p.add_argument("--config-out", default=None, help="YAML to write (default: runs/multi30k_SRC_TGT.yaml)")
    p.add_argument("--run-dir", default=None, help="--out of the printed train command (default: runs/multi30k_SRC_TGT)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --config-out")
    args = p.parse_args()
    name = f"multi30k_{args.src}_{args.tgt}"
    config_out = args.config_out or os.path.join("runs", f"{name}.yaml")
    run_dir = args.run_dir or os.path.join("runs", name)
    try:
        if not os.path.isdir(args.data_dir):
            raise SeqgenError(f"{args.data_dir}: no such folder; pass --data-dir or set SEQGEN_DATA")
        paths = {}
        for split in SPLITS:
            s, t, summary = check_split(args.data_dir, split, args.src, args.tgt)
            paths[split] = (s, t)
            print(summary)
        if os.path.exists(config_out) and not args.force:
            raise SeqgenError(f"{config_out} exists; pass --force to overwrite it or choose --config-out")
    except SeqgenError as e:
        print(f"prepare_multi30k: error: {e}", file=sys.stderr)
        return 2
    run = TranslationRunConfig(data=TranslationDataConfig(
        src_train=paths["train"][0], tgt_train=paths["train"][1],
        src_valid=paths["val"][0], tgt_valid=paths["val"][1]))
    os.makedirs(os.path.dirname(os.path.abspath(config_out)), exist_ok=True)
    with open(config_out, "w", encoding="utf-8") as f:
        f.write(f"# Multi30k {args.src}->{args.tgt}, written by scripts/prepare_multi30k.py; the same keys as the flags\n")
        yaml.safe_dump(to_dict(run), f, sort_keys=False, allow_unicode=True)
    test_src, test_ref = paths["test_2016_flickr"]
    print(f"\nwrote {config_out}\n\ntrain (add e.g. --time-budget 60 to stop after 60 minutes of training):\n"
          f"  seqgen train translation --config {config_out} --out {run_dir}\n"
          f"translate and score on test_2016_flickr:\n"
          f"  seqgen translate {run_dir}/best.pt {test_src} --beam 5 > {run_dir}/test.hyp\n"
          f"  seqgen evaluate {run_dir}/best.pt --src {test_src} --ref {test_ref} --beam 5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
