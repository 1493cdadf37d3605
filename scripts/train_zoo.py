#!/usr/bin/env python
"""Reproduce a model that ships with seqgen: train it with its recipe, compact it, evaluate it, print its card.

    python scripts/train_zoo.py multi30k-de-en --data-dir ../shared/data
    python scripts/train_zoo.py flickr8k-captioner --data-dir ../shared/data --skip-train   # score runs/zoo/NAME
    python scripts/train_zoo.py shakespeare-char --data-dir ../shared/data --install        # and ship the result

Steps: (1) `seqgen <recipe> --out runs/zoo/NAME` (the recipe is in seqgen/zoo/registry.py; an existing
run folder is continued with --resume); (2) best.pt -> runs/zoo/NAME/NAME.pt in the compact format
(seqgen/zoo/compact.py); (3) the card's figures, measured on the float32 best.pt and on the compact file
(translation: BLEU/chrF on test_2016_flickr, beam 5, and sentences/s; captioning: BLEU-1..4 / CIDEr-D on the
Flickr8k test split, beam 5, repeated trigrams, images/s end to end from JPEG files; character LM: validation
nats/char and chars/s at batch 1). --install copies the compact file into seqgen/zoo/files/ and records its
checksum and figures in seqgen/zoo/models.json (then commit both, once per recipe change).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import torch

from seqgen.allocator import tune_cpu_allocator
from seqgen.atomic import atomic_write
from seqgen.bench import print_rows
from seqgen.checkpoint import load_checkpoint, save_checkpoint
from seqgen.cli import main as seqgen_main
from seqgen.errors import SeqgenError
from seqgen.model import load_model
from seqgen.zoo import get, sha256_file
from seqgen.cards import FIGURES
from seqgen.zoo.compact import compact_payload

ZOO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "seqgen", "zoo")


def recipe_argv(name: str, data_dir: str) -> list[str]:
    return [a.replace("{data}", data_dir) for a in get(name).entry.recipe]


def train(name: str, data_dir: str, out: str) -> None:
    argv = recipe_argv(name, data_dir) + ["--out", out]
    if os.path.exists(os.path.join(out, "last.pt")):
        argv.append("--resume")     # a killed run continues; a finished one stops at once
    print("train: seqgen " + " ".join(argv), file=sys.stderr)
    rc = seqgen_main(argv)
    if rc:
        raise SeqgenError(f"training {name} failed (exit {rc})")


def compact(name: str, best: str, out_file: str) -> None:
    payload = load_checkpoint(best)
    external, source = None, None
    if payload.get("task") == "captioning":
        # the frozen backbone's ImageNet weights come from the efficientnet-lite0 package, bit for bit
        from seqgen.encoders.cnn import CNNImageEncoder
        model = load_model(best)
        source = "imagenet"
        enc_cfg = model.config.image_encoder.__class__(**{**model.config.image_encoder.__dict__, "weights": source})
        fresh = CNNImageEncoder(enc_cfg)
        external = {f"encoder.{k}": v for k, v in fresh.state_dict().items()}
    save_checkpoint(out_file, compact_payload(payload, get(name).entry.precision, external, source))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(ZOO_DIR), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def install(name: str, compact_file: str, figures: dict, command: str, run_dir: str) -> None:
    files_dir = os.path.join(ZOO_DIR, "files")
    os.makedirs(files_dir, exist_ok=True)
    target = os.path.join(files_dir, f"{name}.pt")
    shutil.copyfile(compact_file, target)
    facts_path = os.path.join(ZOO_DIR, "models.json")
    facts = json.load(open(facts_path, encoding="utf-8")) if os.path.exists(facts_path) else {}
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    last = metrics[-1] if metrics else {}
    quality = {k: v for k, v in figures.items() if not k.startswith("_") and "/s" not in k}
    speed = {k: v for k, v in figures.items() if "/s" in k}
    facts[name] = {"file": f"{name}.pt", "sha256": sha256_file(target), "bytes": os.path.getsize(target),
                   "precision": get(name).entry.precision, "quality": quality, "speed": speed,
                   "command": command, "steps": last.get("step"), "commit": git_commit(),
                   "date": datetime.date.today().isoformat()}
    atomic_write(facts_path, lambda f: f.write(json.dumps(facts, indent=2, ensure_ascii=False) + "\n"),
                 mode="w", encoding="utf-8")
    print(f"installed {target} ({os.path.getsize(target) / 1e6:.1f} MB) and its entry in {facts_path}",
          file=sys.stderr)


def main() -> int:
    tune_cpu_allocator()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("name", help="a shipped model's name (see `seqgen models`)")
    p.add_argument("--data-dir", default=os.environ.get("SEQGEN_DATA", os.path.join("..", "shared", "data")),
                   help="folder holding multi30k/, flickr8k/, tinyshakespeare/ (default: $SEQGEN_DATA or ../shared/data)")
    p.add_argument("--out", default=None, help="run folder (default: runs/zoo/NAME)")
    p.add_argument("--skip-train", action="store_true", help="score the existing run folder's best.pt")
    p.add_argument("--install", action="store_true", help="copy the compact file into seqgen/zoo/files and "
                                                          "record it in seqgen/zoo/models.json")
    p.add_argument("--seed", type=int, default=1, help="torch seed for the measurements (the recipe has its own)")
    p.add_argument("--no-timing", action="store_true", help="quality only (speed needs the machine to itself)")
    args = p.parse_args()
    try:
        entry = get(args.name).entry
        if not os.path.isdir(args.data_dir):
            raise SeqgenError(f"--data-dir {args.data_dir}: no such folder")
        data_dir = os.path.abspath(args.data_dir)
        out = args.out or os.path.join("runs", "zoo", args.name)
        if not args.skip_train:
            train(args.name, data_dir, out)
        best = os.path.join(out, "best.pt")
        compact_file = os.path.join(out, f"{args.name}.pt")
        t0 = time.perf_counter()
        compact(args.name, best, compact_file)
        print(f"compact: {best} ({os.path.getsize(best) / 1e6:.1f} MB) -> {compact_file} "
              f"({os.path.getsize(compact_file) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        torch.manual_seed(args.seed)
        measure = FIGURES[entry.task]
        full = measure(best, data_dir, timing=not args.no_timing)
        small = measure(compact_file, data_dir, timing=not args.no_timing)
    except SeqgenError as e:
        print(f"train_zoo.py: error: {e}", file=sys.stderr)
        return 2
    rows = [("model", f"{args.name} ({entry.task})"),
            ("files", f"float32 best.pt {os.path.getsize(best) / 1e6:.1f} MB, compact ({entry.precision}) "
                      f"{os.path.getsize(compact_file) / 1e6:.1f} MB")]
    rows += [(k, f"{full[k]} | {small[k]}") for k in full if not k.startswith("_")]
    print(f"\n{args.name}: figure | float32 best.pt | compact file")
    print_rows(rows)
    for k in ("_signature", "_examples"):
        if k in small:
            print(f"\n{k[1:]}:\n" + ("\n".join(small[k]) if isinstance(small[k], list) else small[k]))
    command = "seqgen " + " ".join(entry.recipe) + f" --out runs/zoo/{args.name}"
    print(f"\ntrained by: {command}   ({{data}} = {data_dir})")
    if args.install:
        install(args.name, compact_file, small, command, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
