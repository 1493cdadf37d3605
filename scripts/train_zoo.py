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
from seqgen.bench import best_seconds, generation_rate, print_rows
from seqgen.checkpoint import load_checkpoint, save_checkpoint
from seqgen.cli import main as seqgen_main
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.model import load_model
from seqgen.zoo import get, sha256_file
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


# -- figures --------------------------------------------------------------------------------------------

def translation_figures(path: str, data_dir: str) -> dict:
    from seqgen.data.text import read_lines
    from seqgen.inference.translation import translate
    from seqgen.metrics import corpus_scores
    src = read_lines(os.path.join(data_dir, "multi30k", "test_2016_flickr.de"))
    ref = read_lines(os.path.join(data_dir, "multi30k", "test_2016_flickr.en"))
    model = load_model(path, task="translation")
    gen = GenerationConfig(beam=5)
    hyps = translate(model, src, gen, batch_size=64)
    scores = corpus_scores(hyps, ref)
    seconds = best_seconds(lambda: translate(model, src, gen, batch_size=64), 2, model.device)
    return {"BLEU test_2016_flickr (beam 5)": round(scores["bleu"], 2),
            "chrF test_2016_flickr (beam 5)": round(scores["chrf"], 2),
            "sentences/s (beam 5, batch 64)": round(len(src) / seconds, 1),
            "_signature": scores["bleu_signature"]}


def captioning_figures(path: str, data_dir: str) -> dict:
    from seqgen.data.captions import CaptionDataConfig, load_splits
    from seqgen.data.images import read_split
    from seqgen.inference.captioning import caption_images, default_caption_gen
    from seqgen.metrics import caption_bleu, cider_d, max_ngram_repeats
    d = os.path.join(data_dir, "flickr8k")
    splits = load_splits(CaptionDataConfig(images=os.path.join(d, "images"), captions=os.path.join(d, "captions.tsv"),
                                           train_split=os.path.join(d, "train.txt"),
                                           valid_split=os.path.join(d, "val.txt")), seed=1)
    names = read_split(os.path.join(d, "test.txt"))
    files = [splits.path(n) for n in names]
    refs = [splits.captions[n] for n in names]
    model = load_model(path, task="captioning")
    figures = {}
    for label, gen in (("", default_caption_gen()),
                       (" without n-gram blocking", GenerationConfig(beam=5, max_len=default_caption_gen().max_len))):
        hyps = caption_images(model, files, gen, batch_size=64)
        bleu = caption_bleu(hyps, refs)
        for n in range(1, 5):
            figures[f"BLEU-{n} Flickr8k test{label}"] = round(bleu[f"bleu{n}"], 2)
        figures[f"CIDEr-D Flickr8k test{label}"] = round(cider_d(hyps, refs), 3)
        repeats = [max_ngram_repeats(h, 3) for h in hyps]
        figures[f"captions repeating a word trigram{label}"] = f"{sum(r >= 2 for r in repeats)} / {len(hyps)}"
        figures[f"captions with a trigram 3 times{label}"] = sum(r >= 3 for r in repeats)
        if not label:
            seconds = best_seconds(lambda: caption_images(model, files, gen, batch_size=64), 2, model.device)
            figures["images/s (JPEG files, beam 5, batch 64)"] = round(len(files) / seconds, 1)
            figures["_examples"] = [f"{n}: {h}" for n, h in zip(names[:5], hyps[:5])]
    return figures


def lm_figures(path: str, data_dir: str) -> dict:
    from seqgen.data.text import read_text
    from seqgen.inference.lm import generate_text
    from seqgen.tasks.lm import make_evaluate, split_text
    model = load_model(path, task="lm")
    _, valid_text = split_text(read_text(os.path.join(data_dir, "tinyshakespeare", "input.txt")), 0.1)
    valid_ids = torch.tensor(model.tgt.encode(valid_text), dtype=torch.long)
    with torch.inference_mode():
        loss = make_evaluate(valid_ids, 128, 8, model.tgt.vocab.bos, model.tgt.vocab.pad)(model)["loss"]
    sample = GenerationConfig(temperature=0.8, max_len=2000)
    rates = [generation_rate(model, sample, prompt="ROMEO:", seconds=3.0) for _ in range(2)]
    return {"validation nats/char (last 10%)": round(loss, 4),
            "chars/s (batch 1, sampling T=0.8)": round(max(rates)),
            "_examples": [generate_text(model, "ROMEO:", GenerationConfig(temperature=0.8, max_len=200))[0]]}


FIGURES = {"translation": translation_figures, "captioning": captioning_figures, "lm": lm_figures}


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
        full = measure(best, data_dir)
        small = measure(compact_file, data_dir)
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
