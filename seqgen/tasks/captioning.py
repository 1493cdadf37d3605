"""Image captioning, the task's wiring: a CNN image encoder -> the shared attentional decoder, trained on
an image folder and its captions.

    run = CaptionRunConfig(data=CaptionDataConfig(images="flickr8k/images", captions="flickr8k/captions.tsv",
                                                  train_split="flickr8k/train.txt", valid_split="flickr8k/val.txt"))
    train_captioning(run, "runs/cap")
    model = load_model("runs/cap/best.pt", task="captioning")
    model.caption(["dog.jpg", PIL.Image.open("cat.png")], beam=5)              # seqgen.inference.captioning
    caption_folder(model, ["photos/"], "captions.jsonl", GenerationConfig(beam=5))   # seqgen.tasks.caption_folder

Training. With a frozen backbone the CNN runs once per image: features go to a `FeatureCache` (memory-mapped,
float16 by default) and training batches carry them (seqgen.data.captions), so epochs never touch the CNN.
With `freeze=false` (or `finetune_from`) the images themselves are decoded in DataLoader workers and the CNN
trains with the decoder. Validation decodes the validation images with the `eval` GenerationConfig and scores
caption BLEU-1..4 and CIDEr-D against all their references; CIDEr-D picks best.pt and drives early stopping
(`train.patience`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from torch import Tensor

from seqgen.config import to_dict, validate
from seqgen.data.captions import (CachedCaptionBatches, CachedImageBatches, CaptionDataConfig, CaptionExamples,
                                  ImageCaptionBatches,
                                  cached_valid_batches, image_valid_batches, load_splits)
from seqgen.data.features import FeatureCache
from seqgen.data.images import default_num_workers
from seqgen.decoders.rnn import DecoderConfig
from seqgen.distributed import entry_point, setup
from seqgen.encoders.base import EncoderOutput
from seqgen.encoders.cnn import CNNEncoderConfig, build_transform
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.inference.captioning import caption_tensor
from seqgen.log import Log, main_process_log, warning
from seqgen.metrics import caption_scores
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.objectives.scst import SCSTConfig, SelfCritical
from seqgen.runs import check_out_dir, data_fingerprint, holds_run_folder, load_init_model, load_resume_run
from seqgen.tokenizers import TextCodec
from seqgen.train import Trainer, TrainConfig, TrainState, seed_everything


@dataclass
class CaptionRunConfig:
    """A captioning run: `seqgen train captioning`'s flags and YAML keys, section by section.

    The defaults, and why (docs/performance.md, "Captioning", has the Flickr8k figures): a frozen
    efficientnet_lite0 with weights "auto" (ImageNet weights where seqgen can load them: imagenet for
    efficientnet_lite0, DEFAULT for torchvision backbones, none for tiny); Bahdanau attention with input
    feeding and an untied output layer, validating a moving average of the weights, which scores well above
    Luong general without input feeding; and a short cosine schedule, because frozen-CNN features are
    memorised within a few epochs and a cosine that has decayed by then beats early stopping on a long one.
    """

    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    encoder: CNNEncoderConfig = field(default_factory=lambda: CNNEncoderConfig(
        backbone="efficientnet_lite0", weights="auto", freeze=True, image_size=224))
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        cell="lstm", emb=256, hidden=512, layers=1, attention="bahdanau", input_feeding=True,
        tie_embeddings=False, dropout=0.5))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-3, warmup_steps=200, schedule="cosine", label_smoothing=0.1, ema=0.999, max_steps=20000,
        max_epochs=4, eval_every=500, checkpoint_every=500, patience=5))
    eval: GenerationConfig = field(default_factory=lambda: GenerationConfig(beam=1, max_len=30))
    scst: SCSTConfig = field(default_factory=SCSTConfig)


def resolve_weights(cfg: CNNEncoderConfig) -> CNNEncoderConfig:
    """`weights` "auto" -> the backbone's pretrained weights seqgen can load; "none"/"" -> None (random)."""
    w = cfg.weights
    if isinstance(w, str) and w.lower() in ("none", "null", ""):
        w = None
    elif w == "auto":
        if cfg.weights_file is not None or cfg.backbone == "tiny":
            w = None
        else:
            w = "imagenet" if cfg.backbone == "efficientnet_lite0" else "DEFAULT"
    return dataclasses.replace(cfg, weights=w)


def make_evaluate(names: Sequence[str], references: Sequence[Sequence[str]],
                  batches: Callable[[], Iterator[tuple[list[int], Tensor | EncoderOutput]]],
                  gen: GenerationConfig) -> Callable[[Seq2Seq], dict[str, float]]:
    """Validation: caption every validation image with `gen`, then BLEU-1..4, ROUGE-L and CIDEr-D (the "cider"
    key) against all references of each image (seqgen.metrics.caption_scores).

    batches(): yields (positions in `names`, images [B, 3, S, S] or cached features) for all of them.
    """
    def evaluate(model: Seq2Seq) -> dict[str, float]:
        return caption_scores(caption_all(model, batches, len(names), gen), references)

    return evaluate


def caption_all(model: Seq2Seq, batches: Callable[[], Iterator[tuple[list[int], Tensor | EncoderOutput]]], n: int,
                gen: GenerationConfig) -> list[str]:
    """The caption of each of the `n` images that `batches()` yields (positions, images or features), in order."""
    hyps = [""] * n
    for rows, source in batches():
        for r, c in zip(rows, caption_tensor(model, source, gen)):
            hyps[r] = c.text
    return hyps


# Changing any of these on --resume would change what the checkpoint's vocabulary means.
_VOCAB_KEYS = ("level", "lowercase", "min_freq", "vocab_size")


@entry_point
@holds_run_folder
def train_captioning(run: CaptionRunConfig, out_dir: str, *, resume: bool = False, overrides: dict | None = None,
                     log: Log | None = None, allow_data_change: bool = False) -> TrainState:
    """Train (or resume) a captioning model; checkpoints and metrics.jsonl go to `out_dir`.

    Frozen backbone: the features of the training and validation images are computed once into
    `data.feature_cache` (default OUT/features; reused when nothing changed) and training reads them there.
    Otherwise the images are decoded for every batch and the backbone trains (from `finetune_from` on).
    Validation CIDEr-D (decoding with `run.eval`) every `run.train.eval_every` steps picks best.pt and drives
    early stopping (`run.train.patience`). Under torchrun every process calls this (data parallelism, see
    seqgen/distributed.py): process 0 computes the feature cache, the others then read it. allow_data_change:
    resume although the captions or split files are not the ones the checkpoint was trained on (the images
    themselves are not fingerprinted).
    """
    validate(run)
    resume_path = check_out_dir(out_dir, resume)
    if run.scst.scst and not resume_path and not run.train.init_from:
        raise SeqgenError("--scst fine-tunes a trained captioner: give the model to start from with --init-from "
                          "MODEL (a checkpoint or a shipped name)")
    model: Seq2Seq | None = None
    if resume_path:
        run, model = load_resume_run(resume_path, "captioning", CaptionRunConfig, overrides, vocab_keys=_VOCAB_KEYS,
                                     allow_data_change=allow_data_change)
    elif run.train.init_from:
        run, model = load_init_model(run, overrides, "captioning", vocab_keys=_VOCAB_KEYS,
                                     sections={"encoder": "image_encoder", "decoder": "decoder"})
        seed_everything(run.train.seed)
    d = run.data
    if run.scst.scst and not run.encoder.freeze:
        raise SeqgenError("--scst trains on cached image features: it needs a frozen backbone (drop --freeze false "
                          "and --finetune-from)")
    dist = setup(run.train.device)
    say = main_process_log(log, dist.is_main)
    splits = load_splits(d, run.train.seed)

    if model is None:
        encoder_cfg = resolve_weights(run.encoder)
        run = dataclasses.replace(run, encoder=encoder_cfg)
        if encoder_cfg.freeze and encoder_cfg.weights is None and encoder_cfg.weights_file is None:
            say(warning("the backbone is frozen with random weights; pass --weights or --backbone-weights, "
                        "or --freeze false to train it"))
        texts = [c for n in splits.train for c in splits.captions[n]]
        t0 = time.perf_counter()
        codec = TextCodec.build(d.level, texts, min_freq=d.min_freq, vocab_size=d.vocab_size)
        if d.level == "subword":
            say(f"trained sentencepiece in {time.perf_counter() - t0:.1f}s")
        seed_everything(run.train.seed)
        try:
            model = Seq2Seq(ModelConfig(task="captioning", decoder=run.decoder, image_encoder=encoder_cfg), tgt=codec)
        except ValueError as e:
            raise SeqgenError(f"model config: {e}") from None
    codec = model.tgt
    with dist.main_first():   # process 0 writes the captions' prepared data; the others open it
        examples = CaptionExamples(splits.train, splits.captions, codec, d.max_len,
                                   prepared_dir=d.prepared_dir or os.path.join(out_dir, "prepared"), log=say)
    if not len(examples):
        raise SeqgenError(f"{d.captions}: every training caption is longer than --max-len {d.max_len} tokens")
    if examples.dropped:
        say(warning(f"dropped {examples.dropped} training caption(s) longer than --max-len {d.max_len} tokens"))
    valid_names = splits.valid[:d.valid_limit] if d.valid_limit else splits.valid
    references = [splits.captions[n] for n in valid_names]

    device = dist.device
    workers = d.num_workers if d.num_workers is not None else default_num_workers(device)
    transform = build_transform(model.config.image_encoder)
    pad = codec.vocab.pad
    if model.encoder.frozen:
        cache_dir = d.feature_cache or os.path.join(out_dir, "features")
        caches = {}
        for what, names in (("train", splits.train), ("valid", valid_names)):
            t0 = time.perf_counter()
            with dist.main_first():   # the others find the finished cache and reuse it
                caches[what] = FeatureCache.build(
                    os.path.join(cache_dir, what), names, [splits.path(n) for n in names], model.encoder, transform,
                    batch_size=64, num_workers=workers, device=device,
                    progress=run.train.progress and dist.is_main, dtype=d.cache_dtype)
            say(f"{what} features: {len(names):,} images in {cache_dir}/{what} ({time.perf_counter() - t0:.1f}s)")
        if run.scst.scst:   # whole images, each scored against all its references
            data = CachedImageBatches(caches["train"], caches["train"].rows(splits.train), bos=codec.vocab.bos,
                                      eos=codec.vocab.eos, batch_size=d.batch_size, seed=run.train.seed)
        else:
            data = CachedCaptionBatches(caches["train"], caches["train"].rows(splits.train), examples, pad=pad,
                                        batch_size=d.batch_size, seed=run.train.seed)
        valid_batches = cached_valid_batches(caches["valid"], caches["valid"].rows(valid_names), d.valid_batch_size)
    else:
        data = ImageCaptionBatches([splits.path(n) for n in splits.train], examples, transform, pad=pad,
                                   batch_size=d.batch_size, seed=run.train.seed, num_workers=workers,
                                   pin_memory=device.type == "cuda")
        valid_batches = image_valid_batches([splits.path(n) for n in valid_names], transform, d.valid_batch_size,
                                            workers)

    evaluate = make_evaluate(valid_names, references, valid_batches, run.eval)
    objective = (SelfCritical(model, [splits.captions[n] for n in splits.train], run.scst, amp=run.train.amp)
                 if run.scst.scst else None)
    trainer = Trainer(model, data, evaluate, run.train, out_dir, metric="cider", mode="max",
                      run_config=to_dict(run), log=log, dist=dist, data_fingerprint=data_fingerprint(d),
                      objective=objective)
    if resume_path:
        trainer.resume(resume_path)
    else:
        trainer.log(f"{d.captions}: {len(splits.train):,} training images ({len(examples):,} captions, "
                     f"{data.num_batches(0):,} batches per epoch"
                     f"{'; self-critical: whole images, ' + str(run.scst.scst_samples) + ' samples each' if objective else ''}"
                     f"), {len(valid_names):,} validation images; "
                     f"vocabulary {len(codec.vocab)} ({d.level}); backbone {model.config.image_encoder.backbone} "
                     f"({'frozen, cached features' if model.encoder.frozen else 'training'}); "
                     f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained parameters"
                     + (f"; weights from {run.train.init_from}" if run.train.init_from else ""))
    return trainer.train()


__all__ = ["CaptionRunConfig", "caption_all", "make_evaluate", "resolve_weights", "train_captioning"]
