#!/usr/bin/env python
"""Benchmark: Multi30k De->En translation on this machine (issue #3's figures).

    python scripts/bench_translation.py --data-dir ../shared/data/multi30k --minutes 60
    SEQGEN_DATA=../shared/data python scripts/bench_translation.py --minutes 20 --parts quality,decode
    python scripts/bench_translation.py --data-dir ../shared/data/multi30k --device cuda --minutes 8

Parts (--parts, comma separated; default all):
  quality  train the default config (or --config YAML) for --minutes of training time on train.{de,en},
           validating (greedy BLEU on val) every --eval-every steps; report BLEU and chrF with beam 5 on
           test_2016_flickr and the validation BLEU-versus-minutes curve.
  speed    target tokens/s in training, --speed-seconds each, for the JoeyNMT-like configuration (emb 256,
           hidden 512, 1-layer bi-GRU encoder, 1-layer GRU decoder, Bahdanau attention with input feeding,
           8k joint BPE, batch 64 sentences; the default configuration is this one), for the default when it
           differs, and for the fast no-input-feeding model (Luong attention; same BPE and batch).
  decode   sentences/s decoding test_2016_flickr at batch 64, greedy and beam 5 (the quality model, or --model),
           best of --repeats runs.
  mfu      model FLOPs per target token (seqgen.flops.forward_flops, matmul FLOPs only) x tokens/s, divided by
           the matmul FLOP/s measured in this run (float32, and bfloat16 when training runs under bf16 autocast;
           needs speed).
Every part runs on --device (default cpu; cuda or auto for a GPU).
BLEU is sacreBLEU's default: cased, 13a tokenization, on detokenized output. Prints one table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from seqgen.allocator import tune_cpu_allocator
from seqgen.bench import best_seconds, matmul_flops
from seqgen.config import from_dict, load_yaml, merge, to_dict
from seqgen.data.text import read_lines
from seqgen.decoders.rnn import DecoderConfig
from seqgen.distributed import resolve_device
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.errors import SeqgenError
from seqgen.flops import forward_flops
from seqgen.generation import GenerationConfig
from seqgen.inference.translation import translate
from seqgen.metrics import corpus_scores
from seqgen.model import ModelConfig, Seq2Seq, load_model
from seqgen.precision import AMP_CHOICES, autocast_dtype
from seqgen.tasks.translation import (TranslationDataConfig, TranslationRunConfig, build_codecs, read_corpus,
                                      train_translation, training_batches)
from seqgen.train import Trainer, TrainConfig

FILES = ("train.de", "train.en", "val.de", "val.en", "test_2016_flickr.de", "test_2016_flickr.en")


def default_data_dir() -> str | None:
    root = os.environ.get("SEQGEN_DATA")
    return os.path.join(root, "multi30k") if root else None


def joey_like() -> tuple[RNNEncoderConfig, DecoderConfig]:
    """JoeyNMT's RNN Multi30k/IWSLT recipe shape: the attentional vector is `hidden` wide (no tying)."""
    return (RNNEncoderConfig(cell="gru", emb=256, hidden=512, layers=1, bidirectional=True, dropout=0.2),
            DecoderConfig(cell="gru", emb=256, hidden=512, layers=1, attention="bahdanau", input_feeding=True,
                          tie_embeddings=False, dropout=0.2))


def no_input_feeding() -> tuple[RNNEncoderConfig, DecoderConfig]:
    """The fast model (the default until the 40.6 BLEU run): Luong attention after the decoder RNN, so training
    runs the whole target through the RNN in one call; bi-GRU 256 encoder, tied embeddings."""
    return (RNNEncoderConfig(cell="gru", emb=256, hidden=256, layers=1, bidirectional=True, dropout=0.3),
            DecoderConfig(cell="gru", emb=256, hidden=512, layers=1, attention="luong_general", input_feeding=False,
                          tie_embeddings=True, dropout=0.3))


# -- parts ---------------------------------------------------------------------------------------------
def data_config(d: str, **kw) -> TranslationDataConfig:
    return TranslationDataConfig(src_train=os.path.join(d, "train.de"), tgt_train=os.path.join(d, "train.en"),
                                 src_valid=os.path.join(d, "val.de"), tgt_valid=os.path.join(d, "val.en"), **kw)


def run_quality(args, run: TranslationRunConfig, out: str) -> dict:
    run = replace(run, train=replace(run.train, time_budget=args.minutes, max_steps=10 ** 9, amp=args.amp,
                                     eval_every=args.eval_every, checkpoint_every=args.eval_every,
                                     progress=False, device=args.device))
    t0 = time.perf_counter()
    state = train_translation(run, out, resume=args.resume)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        evals = [json.loads(line)["eval"] | {"step": json.loads(line)["step"]} for line in f if '"eval"' in line]
    model = load_model(os.path.join(out, "best.pt"), device=resolve_device(args.device), task="translation")
    src = read_lines(os.path.join(args.data_dir, "test_2016_flickr.de"))
    ref = read_lines(os.path.join(args.data_dir, "test_2016_flickr.en"))
    beam = corpus_scores(translate(model, src, GenerationConfig(beam=5, max_len=100), batch_size=64), ref)
    greedy = corpus_scores(translate(model, src, GenerationConfig(beam=1, max_len=100), batch_size=64), ref)
    try:
        from seqgen.plots import loss_curve
        loss_curve(os.path.join(out, "metrics.jsonl"), os.path.join(out, "bleu_vs_minutes.png"), x="train_minutes")
    except SeqgenError:
        pass
    return {"state": state, "wall": wall, "evals": evals, "beam": beam, "greedy": greedy, "model": model}


def run_speed(args, name: str, enc: RNNEncoderConfig, dec: DecoderConfig, codecs, corpus, data_cfg) -> dict:
    src_codec, tgt_codec = codecs
    data = training_batches(corpus, src_codec, tgt_codec, data_cfg, seed=1, warn=lambda m: None)
    torch.manual_seed(1)
    model = Seq2Seq(ModelConfig(task="translation", text_encoder=enc, decoder=dec), tgt=tgt_codec, src=src_codec)
    cfg = TrainConfig(lr=1e-3, warmup_steps=100, max_steps=10 ** 9, time_budget=args.speed_seconds / 60,
                      eval_every=10 ** 9, checkpoint_every=10 ** 9, log_every=5, progress=False, device=args.device,
                      amp=args.amp)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, data, lambda m: {"bleu": 0.0}, cfg, tmp, metric="bleu", mode="max",
                          log=lambda m: None)
        state = trainer.train()
        with open(os.path.join(tmp, "metrics.jsonl"), encoding="utf-8") as f:
            speeds = [json.loads(line)["tokens_per_s"] for line in f if "tokens_per_s" in line]
    speeds = speeds[1:] or speeds                         # the first window includes warm-up
    if not speeds:
        raise SeqgenError(f"{name}: fewer than 5 steps in {args.speed_seconds:g}s; raise --speed-seconds")
    src_len = data.src.lengths().astype(np.int64) + int(data.src_eos)    # tokens the encoder reads
    tgt_len = data.tgt.lengths().astype(np.int64) + 1                     # target positions: tokens and <eos>
    n_src, n_tgt = int(src_len.sum()), int(tgt_len.sum())
    attended = int((tgt_len * src_len).sum()) / n_tgt
    flops = forward_flops(enc, dec, len(tgt_codec.vocab), n_src / n_tgt, attended)
    return {"name": name, "tokens_per_s": sorted(speeds)[len(speeds) // 2], "steps": state.step,
            "params": sum(p.numel() for p in model.parameters()), "flops": flops,
            "train_flops_per_token": 3 * flops["total"]}


def run_decode(args, model: Seq2Seq) -> dict:
    """{(amp, "greedy" | "beam5"): (sentences/s, test BLEU)} for each precision in --decode-amp."""
    src = read_lines(os.path.join(args.data_dir, "test_2016_flickr.de"))
    ref = read_lines(os.path.join(args.data_dir, "test_2016_flickr.en"))
    out = {}
    for amp in args.decode_amp.split(","):
        for name, beam in (("greedy", 1), ("beam5", 5)):
            gen = GenerationConfig(beam=beam, max_len=100, amp=amp)
            translate(model, src[:64], gen, batch_size=64)    # warm-up
            seconds = best_seconds(lambda: translate(model, src, gen, batch_size=64), args.repeats, model.device)
            hyps = translate(model, src, gen, batch_size=64)   # deterministic: the timed runs' output
            out[amp, name] = (len(src) / seconds, corpus_scores(hyps, ref)["bleu"])
    return out


def main() -> int:
    tune_cpu_allocator()   # as the seqgen CLI does (seqgen/allocator.py); SEQGEN_MALLOC=system to compare
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--data-dir", default=default_data_dir(), help="Multi30k folder (default: $SEQGEN_DATA/multi30k)")
    p.add_argument("--parts", default="quality,speed,decode,mfu")
    p.add_argument("--minutes", type=float, default=60.0, help="quality: training budget (default: 60)")
    p.add_argument("--eval-every", type=int, default=1000, help="quality: steps between validations")
    p.add_argument("--config", help="quality: YAML with TranslationRunConfig keys over the default config")
    p.add_argument("--out", default="runs/bench_translation", help="quality run folder")
    p.add_argument("--resume", action="store_true", help="quality: continue the run in --out")
    p.add_argument("--model", help="decode: an existing checkpoint instead of the quality run's best.pt")
    p.add_argument("--decode-amp", default="auto,off",
                   help="decode: precisions to time, comma-separated (auto = bf16 where native, the default)")
    p.add_argument("--repeats", type=int, default=3,
                   help="decode: timed runs of each setting; each reports its best (single timings swing +-15%%)")
    p.add_argument("--speed-seconds", type=float, default=90.0, help="speed: training seconds per configuration")
    p.add_argument("--speed-sentences", type=int, default=0, help="speed: use the first N training pairs (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (a GPU when there is one)")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"],
                   help="mixed precision for quality and speed (auto: bf16 where the device has it natively)")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if unknown := parts - {"quality", "speed", "decode", "mfu"}:
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1 (got {args.repeats})")
    missing = [f for f in FILES if not args.data_dir or not os.path.isfile(os.path.join(args.data_dir, f))]
    if missing:
        print(f"bench_translation: error: pass --data-dir DIR or set SEQGEN_DATA; missing {', '.join(missing)} "
              f"in {args.data_dir}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except SeqgenError as e:
        p.error(str(e))
    if "decode" in parts and "quality" not in parts and not args.model:
        p.error("--parts decode without quality needs --model CKPT")
    if bad := [a for a in args.decode_amp.split(",") if a not in AMP_CHOICES]:
        p.error(f"--decode-amp: unknown precision(s) {', '.join(bad)}; choose from {', '.join(AMP_CHOICES)}")

    run = TranslationRunConfig(data=data_config(args.data_dir))
    if args.config:
        run = from_dict(TranslationRunConfig, merge(to_dict(run), load_yaml(args.config)), where=args.config)
    rows: list[tuple[str, str, str]] = [
        ("machine", f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                    f"torch {torch.__version__}"
                    + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""), "")]
    # MFU is measured against the matmul rate of the precision training runs in (bf16 under autocast)
    amp_dtype = autocast_dtype(args.amp, device)
    peak = peak_fp32 = None
    if {"speed", "mfu"} & parts:
        sizes = (2048, 4096, 8192) if device.type == "cuda" else (512, 1024, 2048)   # as seqgen bench
        peak = peak_fp32 = matmul_flops(sizes=sizes, device=device)
        rows.append(("float32 matmul peak (measured)", f"{peak_fp32 / 1e9:,.1f} GFLOP/s", ""))
        if amp_dtype is not None:
            peak = matmul_flops(sizes=sizes, dtype=amp_dtype, device=device)
            rows.append((f"{str(amp_dtype).removeprefix('torch.')} matmul peak (measured; training runs under "
                         f"--amp {args.amp})", f"{peak / 1e9:,.1f} GFLOP/s", ""))

    quality = None
    if "quality" in parts:
        quality = run_quality(args, run, args.out)
        st = quality["state"]
        rows += [
            ("quality: default config", f"{run.decoder.attention}, input_feeding={run.decoder.input_feeding}, "
                                        f"enc {run.encoder.cell} {run.encoder.hidden}x{2 if run.encoder.bidirectional else 1}, "
                                        f"dec {run.decoder.hidden}, {sum(p.numel() for p in quality['model'].parameters()) / 1e6:.1f}M params", ""),
            ("quality: training", f"{st.train_seconds / 60:.1f} min training, {quality['wall'] / 60:.1f} min wall, "
                                  f"{st.step} steps, {st.epoch} epochs", f"{args.minutes:g} min budget"),
            ("BLEU test_2016_flickr, beam 5", f"{quality['beam']['bleu']:.2f}", ">= 39 (60 min), >= 37 (20 min)"),
            ("chrF test_2016_flickr, beam 5", f"{quality['beam']['chrf']:.2f}", "JoeyNMT 56.2"),
            ("BLEU test_2016_flickr, greedy", f"{quality['greedy']['bleu']:.2f}", ""),
        ]
    speeds = {}
    if "speed" in parts:
        corpus, _ = read_corpus(run.data.src_train, run.data.tgt_train, "", what="training")
        if args.speed_sentences:
            corpus.src, corpus.tgt = corpus.src[:args.speed_sentences], corpus.tgt[:args.speed_sentences]
        bpe = data_config(args.data_dir, level="subword", joint_vocab=True, vocab_size=8000, model_type="bpe",
                          batch_size=64, max_tokens=0, max_len=run.data.max_len)
        codecs = build_codecs(bpe, corpus)
        configs = {"JoeyNMT-like": joey_like(), "default": (run.encoder, run.decoder),
                   "no input feeding": no_input_feeding()}
        if configs["default"] == configs["JoeyNMT-like"]:
            configs["JoeyNMT-like = default"] = configs.pop("JoeyNMT-like")
            del configs["default"]
        for name, (enc, dec) in configs.items():
            speeds[name] = run_speed(args, name, enc, dec, codecs, corpus, bpe)
            s = speeds[name]
            rows.append((f"train tokens/s, {name} (batch 64, 8k BPE)", f"{s['tokens_per_s']:,.0f}",
                         ">= 2,640 (3x JoeyNMT's 880)"))
    if "decode" in parts:
        model = load_model(args.model, device=device, task="translation") if args.model else quality["model"]
        dec = run_decode(args, model)
        for (amp, name), (rate, bleu) in dec.items():
            what = "greedy" if name == "greedy" else "beam 5"
            dtype = autocast_dtype(amp, device) or torch.float32
            rows.append((f"decode sentences/s, {what}, batch 64, --amp {amp} ({str(dtype)[6:]}; test BLEU {bleu:.2f})",
                         f"{rate:,.1f}", ">= 100 (JoeyNMT ~25)" if name == "beam5" else ""))
    if "mfu" in parts and speeds and peak:
        for name, s in speeds.items():
            achieved = s["train_flops_per_token"] * s["tokens_per_s"]
            rows.append((f"MFU training, {name}", f"{100 * achieved / peak:.1f}% ({s['train_flops_per_token'] / 1e6:.2f} "
                                                  f"MFLOP/token x {s['tokens_per_s']:,.0f} tok/s = "
                                                  f"{achieved / 1e9:.2f} GFLOP/s; "
                                                  f"{100 * achieved / peak_fp32:.1f}% of the fp32 rate)", ">= 40%"))

    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print("\n| " + "metric".ljust(width) + " | " + "value".ljust(vwidth) + " | target |")
    print("|" + "-" * (width + 2) + "|" + "-" * (vwidth + 2) + "|--------|")
    for k, v, t in rows:
        print(f"| {k.ljust(width)} | {v.ljust(vwidth)} | {t} |")
    if quality:
        curve = " / ".join(f"{e['bleu']:.1f}" for e in quality["evals"])
        minutes = " / ".join(f"{e.get('train_minutes', float('nan')):.1f}" for e in quality["evals"])
        wall = " / ".join(f"{e.get('wall_minutes', float('nan')):.1f}" for e in quality["evals"])
        print(f"\nvalidation BLEU (greedy, val): {curve}\n  after training minutes {minutes}\n  (wall minutes {wall})")
        print(f"sacreBLEU: {quality['beam']['bleu_line']}\n           {quality['beam']['chrf_line']}")
    for s in speeds.values():
        parts_ = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in s["flops"].items())
        print(f"\n{s['name']}: {s['params'] / 1e6:.1f}M params, {s['steps']} steps timed; forward MFLOP per target "
              f"token: {parts_} (training = 3x forward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
