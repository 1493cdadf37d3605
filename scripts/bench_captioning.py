#!/usr/bin/env python
"""Benchmark: image captioning on Flickr8k (issue #4's targets) — quality and folder throughput.

    python scripts/bench_captioning.py --data-dir ../shared/data/flickr8k --minutes 60
    SEQGEN_DATA=../shared/data python scripts/bench_captioning.py --minutes 60
    python scripts/bench_captioning.py --data-dir ../shared/data/flickr8k --minutes 2 --max-images 200   # smoke
    python scripts/bench_captioning.py --data-dir ../shared/data/flickr8k --device cuda --minutes 20

1. Quality: a frozen ImageNet efficientnet_lite0 + attention decoder trained on `train.txt` (validation CIDEr-D
   on `val.txt` picks the checkpoint), scored on `test.txt` with beam 5: caption BLEU-1..4 and CIDEr-D against
   all references. The --minutes budget covers everything up to the test scores: feature extraction for all
   three splits, training, validation and the test decoding (training gets what the rest leaves).
2. Throughput: `caption_folder` on --throughput-images Flickr8k JPEGs (decode in workers + CNN + beam 5 +
   writing JSONL) at --throughput-batch 64, next to the CNN forward alone on the same, already decoded images
   (the bound) and the beam search alone on their features.

Everything runs on --device (default cpu; cuda or auto for a GPU). Prints one table and writes OUT/bench.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

from seqgen.allocator import tune_cpu_allocator
from seqgen.bench import best_seconds, print_rows


def default_data_dir() -> str | None:
    root = os.environ.get("SEQGEN_DATA")
    return os.path.join(root, "flickr8k") if root else None


def limited_split(path: str, out_dir: str, n: int) -> str:
    """The first n names of a split file (a smoke run), written under out_dir; the file itself when n == 0."""
    if not n:
        return path
    from seqgen.data.images import read_split
    os.makedirs(out_dir, exist_ok=True)
    dest = os.path.join(out_dir, os.path.basename(path))
    with open(dest, "w", encoding="utf-8") as f:
        f.writelines(name + "\n" for name in read_split(path)[:n])
    return dest


def main() -> int:
    tune_cpu_allocator()   # as the seqgen CLI does (seqgen/allocator.py); SEQGEN_MALLOC=system to compare
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--data-dir", default=default_data_dir(), help="Flickr8k folder (default: $SEQGEN_DATA/flickr8k)")
    p.add_argument("--minutes", type=float, default=60.0, help="budget for part 1, feature extraction included")
    p.add_argument("--out", default="runs/bench_captioning")
    p.add_argument("--feature-cache", default="", help="feature cache folder (default: OUT/features)")
    p.add_argument("--max-images", type=int, default=0, help="use only the first N images of each split (smoke)")
    p.add_argument("--reserve-minutes", type=float, default=0.0,
                   help="budget kept for what the trainer's clock does not count: reading batches, validation, "
                        "checkpoints, test features and decoding (default: 12%% of --minutes, at least 1)")
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru"])
    p.add_argument("--emb", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--attention", default="bahdanau", choices=["bahdanau", "luong_general"])
    p.add_argument("--attention-size", type=int, default=0, help="Bahdanau's hidden size (0 = --hidden)")
    p.add_argument("--input-feeding", action=argparse.BooleanOptionalAction, default=True,
                   help="feed the previous attentional vector into the LSTM, so every step sees the image "
                        "(Show-Attend-Tell style; slower per step). Measured: input feeding at lr 1e-3 17.7 "
                        "test BLEU-4, no input feeding at lr 2e-3 17.0")
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="output layer shares the word embeddings")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--memory-dropout", type=float, default=0.0, help="dropout on the image grid features")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999, help="validate a moving average of the weights (0 = off)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--min-freq", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--valid-limit", type=int, default=500, help="validation images decoded per evaluation")
    p.add_argument("--beam", type=int, default=5, help="beam for the test scores and the throughput run")
    p.add_argument("--length-penalty", type=float, default=0.0, help="GNMT alpha for the beam (0 = raw log-prob)")
    p.add_argument("--max-len", type=int, default=30)
    p.add_argument("--throughput-images", type=int, default=1000, help="0 skips part 2")
    p.add_argument("--throughput-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3,
                   help="throughput: runs of the folder, the CNN alone and the beam alone; each reports its best")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default: seqgen's choice)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (a GPU when there is one)")
    p.add_argument("--skip-train", action="store_true", help="reuse OUT/best.pt from an earlier run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs (the cosine decays over them); default: seqgen's captioning default")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="decoding precision of the test and throughput parts (the CNN bound runs under the same)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if not args.data_dir or not os.path.isdir(args.data_dir):
        print(f"bench_captioning.py: Flickr8k not found at {args.data_dir!r}; pass --data-dir or set SEQGEN_DATA",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from seqgen.data.captions import CaptionDataConfig, load_splits
    from seqgen.data.features import FeatureCache
    from seqgen.data.images import read_split
    from seqgen.decoders.rnn import DecoderConfig
    from seqgen.distributed import resolve_device
    from seqgen.encoders.cnn import CNNEncoderConfig, CNNImageEncoder, build_transform
    from seqgen.errors import SeqgenError
    from seqgen.generation import GenerationConfig
    from seqgen.inference.captioning import caption_tensor
    from seqgen.metrics import caption_bleu, cider_d
    from seqgen.model import load_model
    from seqgen.precision import autocast, autocast_dtype
    from seqgen.tasks.caption_folder import caption_folder
    from seqgen.tasks.captioning import CaptionRunConfig, resolve_weights, train_captioning
    from seqgen.train import TrainConfig

    try:
        device = resolve_device(args.device)
    except SeqgenError as e:
        p.error(str(e))
    t_start = time.perf_counter()
    d = args.data_dir
    splits_dir = os.path.join(args.out, "splits")
    train_split = limited_split(os.path.join(d, "train.txt"), splits_dir, args.max_images)
    valid_split = limited_split(os.path.join(d, "val.txt"), splits_dir, args.max_images)
    test_split = limited_split(os.path.join(d, "test.txt"), splits_dir, args.max_images)
    cache_dir = args.feature_cache or os.path.join(args.out, "features")
    run = CaptionRunConfig(
        data=CaptionDataConfig(images=os.path.join(d, "images"), captions=os.path.join(d, "captions.tsv"),
                               train_split=train_split, valid_split=valid_split, min_freq=args.min_freq,
                               batch_size=args.batch_size, valid_limit=args.valid_limit, feature_cache=cache_dir,
                               num_workers=args.num_workers),
        encoder=resolve_weights(CNNEncoderConfig(backbone="efficientnet_lite0", weights="imagenet", freeze=True)),
        decoder=DecoderConfig(cell=args.cell, emb=args.emb, hidden=args.hidden, attention=args.attention,
                              attention_size=args.attention_size, input_feeding=args.input_feeding,
                              tie_embeddings=args.tie_embeddings, dropout=args.dropout,
                              memory_dropout=args.memory_dropout),
        train=TrainConfig(lr=args.lr, warmup_steps=200, schedule="cosine", label_smoothing=args.label_smoothing,
                          ema=args.ema, max_steps=10 ** 7, eval_every=args.eval_every, checkpoint_every=args.eval_every,
                          log_every=200, patience=0, seed=args.seed, progress=False, device=args.device,
                          max_epochs=args.max_epochs or CaptionRunConfig().train.max_epochs),
        eval=GenerationConfig(beam=1, max_len=args.max_len))
    test_gen = GenerationConfig(beam=args.beam, max_len=args.max_len, length_penalty=args.length_penalty,
                                amp=args.amp)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                f"{torch.get_num_threads()} torch threads"
                                + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
                     "beam": args.beam, "decode_amp": args.amp}

    # -- 1. quality ---------------------------------------------------------------------------------
    try:
        splits = load_splits(run.data, args.seed)
        test_names = read_split(test_split)
        best = os.path.join(args.out, "best.pt")
        if not args.skip_train and os.path.exists(os.path.join(args.out, "last.pt")):
            raise SeqgenError(f"{args.out} already holds a run: pass --skip-train to score its best.pt, or "
                              f"choose another --out")
        if not args.skip_train:
            # Features first (the same caches train_captioning reuses), so that training gets the rest of the budget.
            torch.manual_seed(args.seed)
            encoder = CNNImageEncoder(run.encoder)
            transform = build_transform(run.encoder)
            t0 = time.perf_counter()
            valid_names = splits.valid[:args.valid_limit] if args.valid_limit else splits.valid
            # (the test features are computed after training, from best.pt, inside the reserve)
            for what, names in (("train", splits.train), ("valid", valid_names)):
                FeatureCache.build(os.path.join(cache_dir, what), names, [splits.path(n) for n in names], encoder,
                                   transform, batch_size=64, num_workers=args.num_workers, device=device,
                                   progress=True)
            results["feature_seconds"] = time.perf_counter() - t0
            del encoder
            reserve = args.reserve_minutes or max(1.0, 0.12 * args.minutes)
            left = args.minutes - (time.perf_counter() - t_start) / 60 - reserve
            if left <= 0:
                raise SeqgenError(f"--minutes {args.minutes} is used up by feature extraction and the reserve")
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, time_budget=left))
            print(f"features: {results['feature_seconds']:.0f}s; training for {left:.1f} min", file=sys.stderr)
            state = train_captioning(run, args.out, log=lambda m: print(m, file=sys.stderr))
            results.update(train_steps=state.step, train_minutes=state.train_seconds / 60,
                           best_valid_cider=state.best)
        model = load_model(best, device=device, task="captioning")
        test_cache = FeatureCache.build(os.path.join(cache_dir, "test"), test_names,
                                        [splits.path(n) for n in test_names],
                                        model.encoder, build_transform(model.config.image_encoder), batch_size=64,
                                        num_workers=args.num_workers, device=device, progress=False)
        t0 = time.perf_counter()
        hyps = []
        rows = test_cache.rows(test_names)
        for i in range(0, len(rows), 100):
            hyps += [c.text for c in caption_tensor(model, test_cache.get_rows(rows[i:i + 100]), test_gen)]
        refs = [splits.captions[n] for n in test_names]
        bleu = caption_bleu(hyps, refs)
        results.update({f"test_bleu{n}": bleu[f"bleu{n}"] for n in range(1, 5)})
        results["test_cider"] = cider_d(hyps, refs)
        results["test_decode_seconds"] = time.perf_counter() - t0
        results["part1_wall_minutes"] = (time.perf_counter() - t_start) / 60
        results["bleu_signature"] = bleu["signature"]
        with open(os.path.join(args.out, "test_captions.jsonl"), "w", encoding="utf-8") as f:
            for n, h in zip(test_names, hyps):
                f.write(json.dumps({"image": n, "caption": h}) + "\n")
    except SeqgenError as e:
        print(f"bench_captioning.py: error: {e}", file=sys.stderr)
        return 2

    # -- 2. throughput ------------------------------------------------------------------------------
    if args.throughput_images:
        from seqgen.data.images import load_image
        names = (test_names + splits.valid + splits.train)[:args.throughput_images]
        files = [splits.path(n) for n in names]
        out_jsonl = os.path.join(args.out, "throughput_captions.jsonl")
        warm = build_transform(model.config.image_encoder)
        caption_tensor(model, torch.stack([warm(load_image(f)) for f in files[:8]]), test_gen)   # warm-up
        # best of --repeats, like the bound and the beam below: on a shared machine single timings swing
        # widely (docs/performance.md), and a ratio of a best to a single run would measure the noise
        rates = []
        for _ in range(args.repeats):
            summary = caption_folder(model, files, out_jsonl, test_gen, batch_size=args.throughput_batch,
                                     num_workers=args.num_workers, resume=False, progress=False,
                                     log=lambda m: print(m, file=sys.stderr))
            rates.append(summary.images_per_second)
        results["folder_images"] = summary.captioned
        results["folder_images_per_s_runs"] = rates
        results["folder_images_per_s"] = max(rates)

        # the bound: the CNN forward alone on the same images, decoded beforehand
        transform = build_transform(model.config.image_encoder)
        n_bound = min(len(files), 4 * args.throughput_batch)
        images = torch.stack([transform(load_image(f, draft_size=transform.image_size)) for f in files[:n_bound]])
        images = images.to(device)                                      # decoded and on the device beforehand
        encoder = model.encoder.eval()
        batches = range(0, n_bound, args.throughput_batch)
        with torch.inference_mode(), autocast(args.amp, device):   # the precision caption_folder decodes in
            encoder(images[:args.throughput_batch])                     # warm-up
            feats = [encoder(images[i:i + args.throughput_batch]) for i in batches]
            cnn = best_seconds(lambda: [encoder(images[i:i + args.throughput_batch]) for i in batches],
                               args.repeats, device)
        beam = best_seconds(lambda: [caption_tensor(model, f, test_gen) for f in feats], args.repeats, device)
        results["cnn_images_per_s"] = n_bound / cnn
        results["beam_images_per_s"] = n_bound / beam
        results["ratio_to_bound"] = results["folder_images_per_s"] / results["cnn_images_per_s"]

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    rows = [("machine", results["machine"])]
    if "feature_seconds" in results:
        dec = run.decoder
        rows += [("decoder", f"{dec.cell} {dec.hidden}, {dec.attention} {dec.attention_size or dec.hidden}, "
                             f"input feeding {dec.input_feeding}, tied {dec.tie_embeddings}, dropout {dec.dropout}, "
                             f"lr {run.train.lr:g}, ema {run.train.ema:g}"),
                 ("feature extraction (train + val)", f"{results['feature_seconds']:.0f} s"),
                 ("training", f"{results['train_steps']} steps in {results['train_minutes']:.1f} min"),
                 ("best validation CIDEr-D (greedy)", f"{results['best_valid_cider']:.3f}")]
    rows += [(f"part 1 wall time (budget {args.minutes:g} min)", f"{results['part1_wall_minutes']:.1f} min")]
    rows += [("decoding precision (--amp)", f"{args.amp}: {autocast_dtype(args.amp, device) or torch.float32}")]
    rows += [(f"test BLEU-{n} (beam {args.beam}, {len(test_names)} images)", f"{results[f'test_bleu{n}']:.2f}")
             for n in range(1, 5)]
    rows += [(f"test CIDEr-D (beam {args.beam})", f"{results['test_cider']:.3f}")]
    if args.throughput_images:
        runs = " / ".join(f"{r:.1f}" for r in results["folder_images_per_s_runs"])
        rows += [(f"folder captioning, images/s (batch {args.throughput_batch}, beam {args.beam}, "
                  f"{results['folder_images']} JPEGs; best of {args.repeats}: {runs})",
                  f"{results['folder_images_per_s']:.1f}"),
                 (f"CNN forward alone, images/s (the bound; best of {args.repeats})",
                  f"{results['cnn_images_per_s']:.1f}"),
                 (f"beam search alone, images/s (best of {args.repeats})", f"{results['beam_images_per_s']:.1f}"),
                 ("folder / bound", f"{100 * results['ratio_to_bound']:.0f}%")]
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
