"""Image captioning: a CNN image encoder -> the shared attentional decoder -> captions; folders at scale.

    run = CaptionRunConfig(data=CaptionDataConfig(images="flickr8k/images", captions="flickr8k/captions.tsv",
                                                  train_split="flickr8k/train.txt", valid_split="flickr8k/val.txt"))
    train_captioning(run, "runs/cap")
    model = load_model("runs/cap/best.pt", task="captioning")
    model.caption(["dog.jpg", PIL.Image.open("cat.png")], beam=5)
    caption_folder(model, ["photos/"], "captions.jsonl", GenerationConfig(beam=5))

Training. Every caption of every training image is one example (an image with 5 captions is seen 5 times an
epoch). With a frozen backbone the CNN runs once per image: features go to a `FeatureCache` (memory-mapped,
float16 by default) and training batches carry them as `Batch.source = EncoderOutput`, so epochs never touch
the CNN. With `freeze=false` (or `finetune_from`) the images themselves are decoded in DataLoader workers and
the CNN trains with the decoder. Validation decodes the validation images with the `eval` GenerationConfig
and scores caption BLEU-1..4 and CIDEr-D against all their references; CIDEr-D picks best.pt and drives
early stopping (`train.patience`).

Folders. `caption_folder` streams image paths (bounded memory whatever the folder size), decodes images in
DataLoader workers (a bad file becomes a "skipped" line with its reason, never a crash), runs the CNN and the
batched beam search one batch at a time, and appends one record per image to a JSONL or CSV file, flushed per
batch, so a killed run loses at most one batch and a rerun continues where it stopped. Under torchrun the
processes share the batches and write part files that process 0 merges into the one output, in listing order.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from seqgen.config import to_dict
from seqgen.data.batch import Batch
from seqgen.data.batching import BucketBatchSampler, pad_sequences
from seqgen.data.images import (ImageError, ImageFolderDataset, collate_images, default_num_workers,
                                iter_image_paths, load_image, read_captions, read_split, to_rgb)
from seqgen.decoders.rnn import DecoderConfig
from seqgen.distributed import Distributed, entry_point, setup
from seqgen.encoders.base import EncoderOutput
from seqgen.encoders.cnn import CNNEncoderConfig, build_transform
from seqgen.errors import SeqgenError, report_out_of_memory
from seqgen.model import GenerationConfig, ModelConfig, Seq2Seq
from seqgen.tokenizers import SPACE_MARK, TextCodec
from seqgen.train import Trainer, TrainConfig, TrainState, check_out_dir, load_resume_run, seed_everything


# -- configs ---------------------------------------------------------------------------------------

@dataclass
class CaptionDataConfig:
    images: str = ""               # folder the image names in the captions/split files are relative to
    captions: str = ""             # captions.tsv (image<TAB>caption), Karpathy/COCO json or the Flickr8k token file
    train_split: str = ""          # file of image names; "" = every captioned image outside the validation split
    valid_split: str = ""          # file of image names; "" = hold out valid_fraction of the images (seeded)
    valid_fraction: float = 0.05
    level: Literal["word", "subword"] = "word"
    lowercase: bool = True         # captions are lowercased before tokenization (CIDEr/BLEU ignore case anyway)
    min_freq: int = 5              # word level: rarer words become <unk>
    vocab_size: int = 4000         # subword level: sentencepiece pieces
    max_len: int = 40              # training captions longer than this (tokens) are dropped
    batch_size: int = 64           # captions per training batch
    valid_batch_size: int = 100    # images per batch when decoding the validation split
    valid_limit: int = 0           # validate on the first N validation images only; 0 = all
    feature_cache: str = ""        # frozen backbone: folder of the feature caches ("" = OUT/features)
    cache_dtype: Literal["float16", "float32"] = "float16"
    num_workers: int | None = None  # DataLoader workers decoding images (feature extraction, fine-tuning);
                                    # None = default_num_workers(device)


@dataclass
class CaptionRunConfig:
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    # weights "auto": ImageNet weights where seqgen can load them (imagenet for efficientnet_lite0, DEFAULT for
    # torchvision backbones, none for tiny); "none" = random init.
    encoder: CNNEncoderConfig = field(default_factory=lambda: CNNEncoderConfig(
        backbone="efficientnet_lite0", weights="auto", freeze=True, image_size=224))
    # Bahdanau attention with input feeding, untied output, validating a weight average: on Flickr8k
    # (scripts/bench_captioning.py, frozen lite0) test BLEU-4 20.88 / CIDEr-D 0.507 against 18.09 / 0.433 for
    # Luong general without input feeding, tied; 21.69 / 0.524 with the 4-epoch schedule below
    # (docs/performance.md). It overfits after ~1,500 steps of 64.
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        cell="lstm", emb=256, hidden=512, layers=1, attention="bahdanau", input_feeding=True,
        tie_embeddings=False, dropout=0.5))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-3, warmup_steps=200, schedule="cosine", label_smoothing=0.1, ema=0.999, max_steps=20000,
        # A short schedule: frozen-CNN features are memorised within a few epochs, and a cosine that has
        # decayed by then beats early stopping on a long one (Flickr8k test BLEU-4 21.4-21.8 against 20.9).
        max_epochs=4, eval_every=500, checkpoint_every=500, patience=5))
    eval: GenerationConfig = field(default_factory=lambda: GenerationConfig(beam=1, max_len=30))


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


def normalize_caption(text: str, lowercase: bool) -> str:
    """One caption as the model learns it: whitespace collapsed, optionally lowercased."""
    text = " ".join(text.split())
    return text.lower() if lowercase else text


# -- data ------------------------------------------------------------------------------------------

@dataclass
class CaptionSplits:
    """Image names of each split, their files and every caption (normalised) of each image."""

    train: list[str]
    valid: list[str]
    captions: dict[str, list[str]]
    images_dir: str

    def path(self, name: str) -> str:
        return os.path.join(self.images_dir, name)


def _split_names(path: str, captions: dict[str, list[str]], what: str) -> list[str]:
    names = list(dict.fromkeys(read_split(path)))  # duplicates dropped, order kept
    if not names:
        raise SeqgenError(f"{path}: the {what} split lists no images")
    missing = [n for n in names if n not in captions]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SeqgenError(f"{path}: {len(missing)} image(s) of the {what} split have no caption in the captions "
                          f"file ({shown}); fix the split or the captions file")
    return names


def load_splits(d: CaptionDataConfig, seed: int) -> CaptionSplits:
    """Read the captions and split files of `d` (clear errors for missing pieces and missing images)."""
    if not d.images:
        raise SeqgenError("--images is required: the folder holding the images")
    if not os.path.isdir(d.images):
        raise SeqgenError(f"{d.images}: no such folder (--images)")
    if not d.captions:
        raise SeqgenError("--captions is required: captions.tsv, a Karpathy dataset_*.json, a COCO captions "
                          "json or the Flickr8k token file")
    raw = read_captions(d.captions)
    captions = {name: [normalize_caption(c, d.lowercase) for c in caps] for name, caps in raw.items()}
    valid = _split_names(d.valid_split, captions, "validation") if d.valid_split else None
    train = _split_names(d.train_split, captions, "training") if d.train_split else None
    if train is None:
        held = set(valid or [])
        train = [n for n in captions if n not in held]
    if valid is None:
        if not 0.0 < d.valid_fraction < 1.0:
            raise SeqgenError(f"--valid-fraction must be in (0, 1) when there is no --valid-split, "
                              f"got {d.valid_fraction}")
        pool = [n for n in captions if n not in set(train)] if d.train_split else []
        if not pool:  # hold out part of the training images
            rng = random.Random(seed)
            k = max(1, round(len(train) * d.valid_fraction))
            chosen = set(rng.sample(train, k)) if len(train) > 1 else set()
            pool = [n for n in train if n in chosen]
            train = [n for n in train if n not in chosen]
        valid = pool
    if not train:
        raise SeqgenError(f"{d.captions}: no training images left (the validation split takes them all)")
    if not valid:
        raise SeqgenError(f"{d.captions}: no validation images; give --valid-split or more images")
    overlap = set(train) & set(valid)
    if overlap:
        raise SeqgenError(f"{d.train_split} and {d.valid_split} share {len(overlap)} image(s) (e.g. "
                          f"{sorted(overlap)[0]}); the splits must be disjoint")
    splits = CaptionSplits(train=train, valid=valid, captions=captions, images_dir=d.images)
    missing = [n for n in train + valid if not os.path.isfile(splits.path(n))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SeqgenError(f"{d.images}: {len(missing)} image file(s) of the splits are missing ({shown})")
    return splits


def _targets(codec: TextCodec, captions: Iterable[str], max_len: int) -> tuple[list[list[int]], list[int]]:
    """`bos ... eos` ids of each caption no longer than max_len tokens, and the positions kept."""
    out, kept = [], []
    for i, c in enumerate(captions):
        ids = codec.encode(c)
        if 0 < len(ids) <= max_len:
            out.append([codec.vocab.bos, *ids, codec.vocab.eos])
            kept.append(i)
    return out, kept


class CaptionExamples:
    """One example per (image, caption): `image_of[i]` is the image row of target `targets[i]`."""

    def __init__(self, names: Sequence[str], captions: dict[str, list[str]], codec: TextCodec, max_len: int):
        flat = [(row, c) for row, n in enumerate(names) for c in captions[n]]
        self.targets, kept = _targets(codec, (c for _, c in flat), max_len)
        self.image_of = [flat[i][0] for i in kept]
        self.dropped = len(flat) - len(kept)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.targets)


class CachedCaptionBatches:
    """Training batches over cached features (frozen backbone); a `BatchSource`.

    Batches are length-bucketed and deterministic for (seed, epoch), so a resumed run continues exactly.
    """

    def __init__(self, cache, rows: Sequence[int], examples: CaptionExamples, *, pad: int, batch_size: int,
                 seed: int):
        self.cache, self.rows, self.examples, self.pad = cache, list(rows), examples, pad
        self.sampler = BucketBatchSampler([len(t) for t in examples.targets], batch_size=batch_size,
                                          shuffle=True, seed=seed)

    def num_batches(self, epoch: int) -> int:
        return len(self.sampler.batches(epoch))

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[Batch]:
        """Batches [start:stop:step] of the epoch's list (a process's share under data parallelism)."""
        ex = self.examples
        for idx in self.sampler.batches(epoch)[start:stop:step]:
            target, _ = pad_sequences([ex.targets[i] for i in idx], self.pad)
            source = self.cache.get_rows([self.rows[ex.image_of[i]] for i in idx])
            yield Batch(target=target, source=source, index=torch.as_tensor(idx, dtype=torch.long))


class _CaptionImageDataset(torch.utils.data.Dataset):
    """example index -> (index, image tensor | None, reason | None, target ids): errors are data."""

    def __init__(self, paths: Sequence[str], examples: CaptionExamples, transform: Callable):
        self.images = ImageFolderDataset(paths, transform)
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        _, image, reason = self.images[self.examples.image_of[i]]
        return i, image, reason, self.examples.targets[i]


class _CaptionCollate:
    def __init__(self, pad: int, paths: Sequence[str], examples: CaptionExamples):
        self.pad, self.paths, self.examples = pad, paths, examples

    def __call__(self, items):
        failed = [(self.paths[self.examples.image_of[i]], r) for i, x, r, _ in items if x is None]
        if failed:
            return None, failed
        target, _ = pad_sequences([t for *_, t in items], self.pad)
        return Batch(target=target, source=torch.stack([x for _, x, _, _ in items]),
                     index=torch.as_tensor([i for i, *_ in items], dtype=torch.long)), []


def _loader_generator(seed: int = 0) -> torch.Generator:
    # DataLoaders draw their worker base seed from this generator instead of the global RNG, so creating one
    # (every epoch, every evaluation, after --resume) never shifts the dropout masks of training.
    return torch.Generator().manual_seed(seed)


class ImageCaptionBatches:
    """Training batches of decoded images (the backbone trains); a `BatchSource`.

    Images are decoded in `num_workers` DataLoader workers; an unreadable image stops training with an
    ImageError naming it (remove it from the split).
    """

    def __init__(self, paths: Sequence[str], examples: CaptionExamples, transform: Callable, *, pad: int,
                 batch_size: int, seed: int, num_workers: int = 2, pin_memory: bool = False):
        self.paths, self.examples, self.transform, self.pad = list(paths), examples, transform, pad
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.sampler = BucketBatchSampler([len(t) for t in examples.targets], batch_size=batch_size,
                                          shuffle=True, seed=seed)

    def num_batches(self, epoch: int) -> int:
        return len(self.sampler.batches(epoch))

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[Batch]:
        """Batches [start:stop:step] of the epoch's list: only these images are decoded."""
        batches = self.sampler.batches(epoch)[start:stop:step]
        if not batches:
            return
        loader = torch.utils.data.DataLoader(
            _CaptionImageDataset(self.paths, self.examples, self.transform), batch_sampler=batches,
            num_workers=self.num_workers, collate_fn=_CaptionCollate(self.pad, self.paths, self.examples),
            pin_memory=self.pin_memory, generator=_loader_generator())
        for batch, failed in loader:
            if failed:
                raise _images_error(failed, "remove them from the training split")
            yield batch


def _images_error(failed: list[tuple[str, str]], advice: str) -> ImageError:
    failed = list(dict.fromkeys(failed))
    shown = "; ".join(f"{p} ({r})" for p, r in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    return ImageError(failed[0][0], failed[0][1], failed,
                      message=f"{len(failed)} image(s) cannot be read: {shown}; {advice}")


# -- inference -------------------------------------------------------------------------------------

@dataclass
class Caption:
    """The caption of one image.

    score: the search score (length-penalised for beam search); log_prob: its total log-probability.
    words: the generated tokens as display strings ("<eos>" last when the model wrote it).
    attention: [len(words), h * w] attention of each generated token over the image grid, or None.
    grid: (h, w) of that grid.
    """

    text: str
    score: float
    log_prob: float
    words: list[str] = field(default_factory=list)
    attention: Tensor | None = None
    grid: tuple[int, int] | None = None


def _require_captioning(model: Seq2Seq) -> None:
    if model.config.task != "captioning" or model.encoder is None:
        raise SeqgenError(f"this is a {model.config.task!r} model; captioning needs a model trained with "
                          f"`seqgen train captioning`")


def _display(token: str) -> str:
    return token[1:] if len(token) > 1 and token[0] == SPACE_MARK else token


def _to_caption(model: Seq2Seq, hyp) -> Caption:
    ids = [int(t) for t in hyp.tokens]
    words = [_display(t) for t in model.tgt.vocab.tokens(ids)]
    attn, grid = hyp.attention, None
    if attn is not None:
        if attn.size(0) > len(ids):  # the step that wrote <eos> attended too
            words.append("<eos>")
        attn = attn[:len(words)].detach().float().cpu()
        side = int(round(math.sqrt(attn.size(-1))))
        grid = (side, side) if side * side == attn.size(-1) else (1, attn.size(-1))
    return Caption(text=model.tgt.decode(ids).strip(), score=float(hyp.score), log_prob=float(hyp.log_prob),
                   words=words, attention=attn, grid=grid)


@torch.no_grad()
def caption_tensor(model: Seq2Seq, source: Tensor | EncoderOutput, gen: GenerationConfig,
                   generator: torch.Generator | None = None) -> list[Caption]:
    """Caption a batch: images [B, 3, S, S] (uint8 as `build_transform` makes them, or [0, 1] floats) or
    precomputed features."""
    first = source if isinstance(source, Tensor) else next(t for t in (source.memory, source.state) if t is not None)
    with report_out_of_memory(f"captioning a batch of {first.size(0)} images (beam {gen.beam})",
                              "lower the batch size (--batch-size) or the beam (--beam)"):
        if isinstance(source, Tensor):
            source = source.to(model.device, non_blocking=True)
        else:
            source = dataclasses.replace(source, **{f: getattr(source, f).to(model.device)
                                                    for f in ("state", "memory") if getattr(source, f) is not None})
        hyps = model.generate(source, gen=gen, generator=generator)
    return [_to_caption(model, h[0]) for h in hyps]


# Captions must not loop ("a black hat and a black hat and ..."): the default decoding never repeats a word
# trigram. docs/models.md reports what it costs in BLEU-4 / CIDEr-D on Flickr8k.
CAPTION_NO_REPEAT_NGRAM = 3


def default_caption_gen(**overrides) -> GenerationConfig:
    """The decoding `seqgen caption` and `Seq2Seq.caption` use unless told otherwise: beam 5, no repeated trigram."""
    return GenerationConfig(**{"beam": 5, "max_len": 30, "no_repeat_ngram": CAPTION_NO_REPEAT_NGRAM, **overrides})


def caption_images(model: Seq2Seq, images: Sequence, gen: GenerationConfig | None = None, *,
                   batch_size: int = 64) -> list[str]:
    """Caption image paths and/or PIL images, in order; returns one caption per image.

    A path that is not a usable image raises ImageError (a SeqgenError) naming it and the reason.
    """
    return [c.text for c in caption_images_full(model, images, gen, batch_size=batch_size)]


def caption_images_full(model: Seq2Seq, images: Sequence, gen: GenerationConfig | None = None, *,
                        batch_size: int = 64) -> list[Caption]:
    """As `caption_images`, with scores and attention (`Caption` objects)."""
    from PIL import Image

    _require_captioning(model)
    gen = gen or default_caption_gen()
    gen.validate()
    if batch_size < 1:
        raise SeqgenError(f"--batch-size must be >= 1, got {batch_size}")
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    transform = build_transform(model.config.image_encoder)
    out: list[Caption] = []
    for start in range(0, len(images), batch_size):
        tensors = []
        for item in images[start:start + batch_size]:
            if isinstance(item, Image.Image):
                tensors.append(transform(to_rgb(item)))
            elif isinstance(item, (str, os.PathLike)):
                tensors.append(transform(load_image(item, draft_size=transform.image_size)))
            else:
                raise SeqgenError(f"caption(): expected image paths or PIL images, got {type(item).__name__}")
        out.extend(caption_tensor(model, torch.stack(tensors), gen))
    return out


# -- training --------------------------------------------------------------------------------------

def make_evaluate(names: Sequence[str], references: Sequence[Sequence[str]],
                  batches: Callable[[], Iterator[tuple[list[int], Tensor | EncoderOutput]]],
                  gen: GenerationConfig) -> Callable[[Seq2Seq], dict[str, float]]:
    """Validation: caption every validation image with `gen`, then caption BLEU-1..4 and CIDEr-D (the
    "cider" key) against all references of each image.

    batches(): yields (positions in `names`, images [B, 3, S, S] or cached features) for all of them.
    """
    from seqgen.metrics import caption_bleu, cider_d

    def evaluate(model: Seq2Seq) -> dict[str, float]:
        hyps = [""] * len(names)
        for rows, source in batches():
            for r, c in zip(rows, caption_tensor(model, source, gen)):
                hyps[r] = c.text
        bleu = caption_bleu(hyps, references)
        metrics = {"cider": cider_d(hyps, references), **{f"bleu{n}": bleu[f"bleu{n}"] for n in range(1, 5)}}
        return metrics

    return evaluate


def _cached_batches(cache, rows: Sequence[int], batch_size: int):
    def batches():
        for start in range(0, len(rows), batch_size):
            chunk = list(range(start, min(start + batch_size, len(rows))))
            yield chunk, cache.get_rows([rows[i] for i in chunk])
    return batches


def _image_batches(paths: Sequence[str], transform: Callable, batch_size: int, num_workers: int,
                   what: str = "validation"):
    def batches():
        loader = torch.utils.data.DataLoader(
            ImageFolderDataset(list(paths), transform, draft_size=transform.image_size), batch_size=batch_size,
            shuffle=False, num_workers=num_workers, collate_fn=collate_images, generator=_loader_generator())
        for b in loader:
            if b.failed:
                raise _images_error([(paths[i], r) for i, r in b.failed], f"remove them from the {what} split")
            yield b.indices, b.images
    return batches


# Changing any of these on --resume would change what the checkpoint's vocabulary means.
_VOCAB_KEYS = ("level", "lowercase", "min_freq", "vocab_size")


def _check_data_config(d: CaptionDataConfig) -> None:
    for name in ("batch_size", "valid_batch_size", "max_len", "min_freq"):
        if getattr(d, name) < 1:
            raise SeqgenError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(d, name)}")
    if (d.num_workers is not None and d.num_workers < 0) or d.valid_limit < 0:
        raise SeqgenError("--num-workers and --valid-limit must be >= 0")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@entry_point
def train_captioning(run: CaptionRunConfig, out_dir: str, *, resume: bool = False, overrides: dict | None = None,
                     log: Callable[[str], None] | None = None) -> TrainState:
    """Train (or resume) a captioning model; checkpoints and metrics.jsonl go to `out_dir`.

    Frozen backbone: the features of the training and validation images are computed once into
    `data.feature_cache` (default OUT/features; reused when nothing changed) and training reads them there.
    Otherwise the images are decoded for every batch and the backbone trains (from `finetune_from` on).
    Validation CIDEr-D (decoding with `run.eval`) every `run.train.eval_every` steps picks best.pt and drives
    early stopping (`run.train.patience`). Under torchrun every process calls this (data parallelism, see
    seqgen/distributed.py): process 0 computes the feature cache, the others then read it.
    """
    resume_path = check_out_dir(out_dir, resume)
    model: Seq2Seq | None = None
    if resume_path:
        run, model = load_resume_run(resume_path, "captioning", CaptionRunConfig, overrides, vocab_keys=_VOCAB_KEYS)
    d = run.data
    _check_data_config(d)
    run.eval.validate()
    dist = setup(run.train.device)
    say = (log or _stderr) if dist.is_main else (lambda _message: None)
    splits = load_splits(d, run.train.seed)

    if model is None:
        encoder_cfg = resolve_weights(run.encoder)
        run = dataclasses.replace(run, encoder=encoder_cfg)
        if encoder_cfg.freeze and encoder_cfg.weights is None and encoder_cfg.weights_file is None:
            say("seqgen: warning: the backbone is frozen with random weights; pass --weights or --backbone-weights, "
                "or --freeze false to train it")
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
    examples = CaptionExamples(splits.train, splits.captions, codec, d.max_len)
    if not len(examples):
        raise SeqgenError(f"{d.captions}: every training caption is longer than --max-len {d.max_len} tokens")
    if examples.dropped:
        say(f"seqgen: warning: dropped {examples.dropped} training caption(s) longer than --max-len {d.max_len} tokens")
    valid_names = splits.valid[:d.valid_limit] if d.valid_limit else splits.valid
    references = [splits.captions[n] for n in valid_names]

    device = dist.device
    workers = d.num_workers if d.num_workers is not None else default_num_workers(device)
    transform = build_transform(model.config.image_encoder)
    pad = codec.vocab.pad
    if model.encoder.frozen:
        from seqgen.data.features import FeatureCache
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
        data = CachedCaptionBatches(caches["train"], caches["train"].rows(splits.train), examples, pad=pad,
                                    batch_size=d.batch_size, seed=run.train.seed)
        valid_batches = _cached_batches(caches["valid"], caches["valid"].rows(valid_names), d.valid_batch_size)
    else:
        data = ImageCaptionBatches([splits.path(n) for n in splits.train], examples, transform, pad=pad,
                                   batch_size=d.batch_size, seed=run.train.seed, num_workers=workers,
                                   pin_memory=device.type == "cuda")
        valid_batches = _image_batches([splits.path(n) for n in valid_names], transform, d.valid_batch_size,
                                       workers)

    evaluate = make_evaluate(valid_names, references, valid_batches, run.eval)
    trainer = Trainer(model, data, evaluate, run.train, out_dir, metric="cider", mode="max",
                      run_config=to_dict(run), log=log, dist=dist)
    if resume_path:
        trainer.resume(resume_path)
    else:
        trainer.log(f"{d.captions}: {len(splits.train):,} training images ({len(examples):,} captions, "
                     f"{data.num_batches(0):,} batches per epoch), {len(valid_names):,} validation images; "
                     f"vocabulary {len(codec.vocab)} ({d.level}); backbone {model.config.image_encoder.backbone} "
                     f"({'frozen, cached features' if model.encoder.frozen else 'training'}); "
                     f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained parameters")
    return trainer.train()


# -- captioning folders ----------------------------------------------------------------------------

@dataclass
class FolderSummary:
    """What `caption_folder` did. skipped: (path, reason) of every image that could not be captioned."""

    out_path: str
    captioned: int = 0             # captions written by this run
    already_done: int = 0          # images found in the output from an earlier run (resume)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    attention_maps: int = 0

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """False when nothing could be captioned (the CLI then exits non-zero)."""
        return self.captioned + self.already_done > 0


_CSV_HEADER = ["image", "caption", "score"]


def output_format(path: str) -> str:
    """"jsonl" or "csv" from the extension of `path`."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if ext == ".csv":
        return "csv"
    raise SeqgenError(f"--out {path}: unknown output format {ext or '(no extension)'}; use .jsonl or .csv")


def image_key(path: str) -> str:
    """How an image is named in the output (and recognised again on resume)."""
    return os.path.normpath(path)


def _read_records(path: str, fmt: str, *, repair: bool) -> list[tuple[str, str]]:
    """(image key, record text) of every complete record of the captions file `path`; [] when it is missing.

    A last record cut off by a kill (the bytes after the last newline) is left out and, with `repair`, cut
    from the file (only the one process that appends to it may do that; its image is captioned again).
    Anything that is not a seqgen captions file raises SeqgenError rather than being overwritten.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SeqgenError(f"{path}: cannot read the earlier output ({e.strerror or e})") from None
    end = data.rfind(b"\n") + 1          # everything after the last newline is an interrupted write
    # surrogateescape: file names that are not valid UTF-8 are written and read back byte for byte
    text = data[:end].decode("utf-8", errors="surrogateescape")
    records: list[tuple[str, str]] = []
    if fmt == "jsonl":
        lines = text.split("\n")[:-1]
        for lineno, line in enumerate(lines, 1):
            try:
                records.append((json.loads(line)["image"], line + "\n"))
            except (ValueError, KeyError, TypeError):
                raise SeqgenError(f"{path}:{lineno}: not a captions record ({{\"image\", \"caption\", "
                                  f"\"score\"}}); choose another --out or --overwrite") from None
    else:
        rows = list(csv.reader(io.StringIO(text)))
        if rows and rows[0] != _CSV_HEADER:
            raise SeqgenError(f"{path}: not a captions CSV (header {','.join(_CSV_HEADER)}); choose another "
                              f"--out or --overwrite")
        for lineno, row in enumerate(rows[1:], 2):
            if len(row) != 3:
                raise SeqgenError(f"{path}:{lineno}: expected 3 columns (image,caption,score), found {len(row)}")
            records.append((row[0], _csv_rows([row])))
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return records


def read_done(out_path: str) -> set[str]:
    """Images already captioned in `out_path` (a JSONL or CSV file from an earlier run).

    A last record cut off by a kill is removed from the file (its image is captioned again); anything else
    that is not a seqgen captions file raises SeqgenError rather than being overwritten.
    """
    return {key for key, _ in _read_records(out_path, output_format(out_path), repair=True)}


# Sharded runs (torchrun): process r of W appends to OUT's part file r-of-W; process 0 merges them at the end.
_PART_NAME = re.compile(r"\.part-(\d+)-of-(\d+)$")


def part_path(out_path: str, rank: int, world: int) -> str:
    """The file process `rank` of `world` writes while a folder is captioned under torchrun, next to the
    output and in its format: captions.jsonl -> captions.part-0-of-2.jsonl."""
    stem, ext = os.path.splitext(out_path)
    return f"{stem}.part-{rank}-of-{world}{ext}"


def find_parts(out_path: str) -> list[str]:
    """The part files of `out_path` that sharded runs left (any rank, any number of processes), in
    (processes, rank) order."""
    import glob
    stem, ext = os.path.splitext(out_path)
    found = []
    for path in glob.glob(glob.escape(stem) + ".part-*-of-*" + glob.escape(ext)):
        match = _PART_NAME.search(path[:len(path) - len(ext)] if ext else path)
        if match and os.path.isfile(path):
            found.append(((int(match[2]), int(match[1])), path))
    return [path for _, path in sorted(found)]


def merge_parts(out_path: str, parts: Sequence[str], position: Callable[[str], int | None]) -> int:
    """Fold the part files into `out_path` and delete them; returns the number of records added.

    The merged file holds the records `out_path` had, then those of the parts whose image is not among them,
    ordered by `position(image key)` (the image's place in the listing; images it does not know come last,
    as found): the file one process appending in listing order writes. It is written to a temp file renamed
    over `out_path`, so a kill leaves the old file and the parts, and the next run merges them again.
    """
    import tempfile

    from seqgen.checkpoint import remove_partial_writes
    fmt = output_format(out_path)
    remove_partial_writes(out_path)      # the temp file of a merge that was killed
    old = _read_records(out_path, fmt, repair=False)
    have = {key for key, _ in old}
    new: dict[str, tuple[tuple[int, int, int], str]] = {}
    for p, part in enumerate(parts):
        for r, (key, text) in enumerate(_read_records(part, fmt, repair=False)):
            if key not in have and key not in new:
                pos = position(key)
                new[key] = ((0, pos, 0) if pos is not None else (1, p, r), text)
    folder = os.path.dirname(os.path.abspath(out_path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(out_path)}-", dir=folder)
    except OSError as e:
        raise SeqgenError(f"{out_path}: cannot write the merged captions ({e.strerror or e}); the part files "
                          f"are kept: run the same command again to merge them") from None
    try:
        with open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            if fmt == "csv":
                f.write(",".join(_CSV_HEADER) + "\n")
            f.writelines(text for _, text in old)
            f.writelines(text for _, text in sorted(new.values(), key=lambda item: item[0]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise SeqgenError(f"{out_path}: cannot write the merged captions ({e.strerror or e}); the part files "
                              f"are kept: run the same command again to merge them") from None
        raise
    for part in parts:       # after the rename: a kill in between leaves parts whose records are all in out_path
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
    return len(new)


class _Identity:
    """ImageFolderDataset looks paths up by index; here the "index" is the (root, path) pair itself."""

    def __getitem__(self, key: tuple[str, str]) -> str:
        return key[1]

    def __len__(self) -> int:  # never iterated: batches come from a streaming batch sampler
        return 0


class _PathBatches:
    """A streaming batch sampler: lists of (root, path), `batch_size` at a time, as they are listed.

    With `world` > 1 only the batches rank, rank + world, rank + 2 * world, ... are kept: every process lists
    the same images, cuts the same batches and captions its share (batches, not single images, so that each
    image is decoded in the same batch as in a single-process run: the same floating-point sums).
    """

    def __init__(self, source: Iterator[tuple[str, str]], batch_size: int, rank: int = 0, world: int = 1):
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world

    def _all(self) -> Iterator[list[tuple[str, str]]]:
        batch: list[tuple[str, str]] = []
        for item in self.source:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self) -> Iterator[list[tuple[str, str]]]:
        for i, batch in enumerate(self._all()):
            if i % self.world == self.rank:
                yield batch


def _attention_png_name(path: str, root: str) -> str:
    """photos/sub/x.jpg listed from photos/ -> sub__x.png (a file given by itself -> x.png)."""
    rel = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
    stem = os.path.splitext(os.path.normpath(rel))[0]
    return re.sub(r"[^\w.-]+", "_", stem.replace(os.sep, "__")) + ".png"


def caption_folder(model: Seq2Seq, inputs: Sequence[str], out_path: str, gen: GenerationConfig | None = None, *,
                   batch_size: int = 64, num_workers: int | None = None, recursive: bool = False,
                   follow_symlinks: bool = False, resume: bool = True, attention_png_dir: str | None = None,
                   skipped_path: str | None = None, progress: bool = True,
                   log: Callable[[str], None] | None = None, dist: Distributed | None = None) -> FolderSummary:
    """Caption every image in `inputs` (folders and/or files) into `out_path` (.jsonl or .csv).

    Records {"image", "caption", "score"} follow the listing order (sorted within each folder). The output is
    flushed after every batch; with `resume` (default) images already in it are skipped, so a killed run is
    continued by running it again; `resume=False` starts the file over. Unreadable images are listed in the
    summary with their reason (and in `skipped_path` as path<TAB>reason lines). Memory stays bounded: paths
    are listed lazily and only a few batches are in flight.

    Sharded (`dist` from `seqgen.distributed.setup` under torchrun, more than one process): every process
    lists the same images and cuts the same batches; process r captions batches r, r + W, ... into its part
    file (`part_path`) with the same flushing and resume rules (a rerun skips what is in the output and in
    every part). At the end process 0 merges the parts into `out_path` in listing order, atomically, and
    deletes them: the file one process writes. Every process returns the summary of the whole run; process 0
    reports it. Part files found without torchrun (a killed sharded run) are finished and merged the same way.
    """
    _require_captioning(model)
    say = log or _stderr
    dist = dist or Distributed()
    gen = gen or default_caption_gen()
    gen.validate()
    if batch_size < 1:
        raise SeqgenError(f"--batch-size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = default_num_workers(model.device)
    if num_workers < 0:
        raise SeqgenError(f"--num-workers must be >= 0, got {num_workers}")
    if not inputs:
        raise SeqgenError("no input folder or image given")
    fmt = output_format(out_path)
    for root in inputs:
        if not os.path.exists(root):
            raise SeqgenError(f"{root}: no such file or folder")
    if attention_png_dir:
        from seqgen.plots import require_matplotlib
        require_matplotlib()
        if model.decoder.attention is None:
            raise SeqgenError("this model has no attention (--attention none); there are no attention maps to draw")
    out_abs = os.path.abspath(out_path)
    parts = find_parts(out_path)
    if not resume and parts:       # starting over: an earlier sharded run's parts go too
        if dist.is_main:
            for part in parts:
                _remove(part, out_path)
        parts = []
    sharded = dist.world > 1 or bool(parts)
    target = part_path(out_path, dist.rank, dist.world) if sharded else out_path   # where this process appends
    if sharded and not resume and dist.is_main:
        _remove(out_path, out_path)
    dist.barrier()                 # nothing is removed once any process reads or writes
    done: set[str] = set()
    if resume:
        done = {key for key, _ in _read_records(out_path, fmt, repair=not sharded)}
        for part in parts:
            done.update(key for key, _ in _read_records(part, fmt, repair=part == target))
    dist.barrier()                 # every process has read the same records before any appends new ones
    summary = FolderSummary(out_path=out_path)
    listing_skips: list[tuple[str, str]] = []        # (path, reason): what the listing passed over
    failures: list[tuple[int, str, str]] = []        # (batch number, path, reason): images that failed to decode
    # the merge's order: every listed image's position (process 0 of a sharded run only)
    order: dict[str, int] | None = {} if sharded and dist.is_main else None

    def listing(on_skip: Callable[[str, str], None] | None) -> Iterator[tuple[str, str]]:
        for root in inputs:
            for path in iter_image_paths(root, recursive=recursive, follow_symlinks=follow_symlinks, on_skip=on_skip):
                yield root, path

    show = progress and dist.is_main
    total = sum(1 for _ in listing(None)) if show and dist.world == 1 else None
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="img", desc="caption" if dist.world == 1 else f"caption (process 0 of {dist.world})",
               disable=not show, dynamic_ncols=True, file=sys.stderr)
    seen: set[str] = set()

    def todo() -> Iterator[tuple[str, str]]:
        for root, path in listing((lambda p, r: listing_skips.append((p, r))) if dist.is_main else None):
            key = image_key(path)
            if key in seen or os.path.abspath(path) == out_abs:
                continue
            seen.add(key)
            if order is not None:
                order[key] = len(order)
            if key in done:
                summary.already_done += 1
                bar.update(1)
                continue
            yield root, path

    transform = build_transform(model.config.image_encoder)
    dataset = ImageFolderDataset(_Identity(), transform, draft_size=transform.image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_PathBatches(todo(), batch_size, dist.rank, dist.world), num_workers=num_workers,
        collate_fn=collate_images, pin_memory=model.device.type == "cuda", generator=_loader_generator())
    new_file = not resume or not os.path.exists(target) or os.path.getsize(target) == 0
    t0 = time.perf_counter()
    try:
        os.makedirs(os.path.dirname(out_abs), exist_ok=True)
        f = open(target, "w" if new_file else "a", encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as e:
        raise SeqgenError(f"{target}: cannot write the captions ({e.strerror or e})") from None
    with f:
        if new_file and fmt == "csv":
            _append(f, ",".join(_CSV_HEADER) + "\n", out_path)
        for k, batch in enumerate(loader):
            number = k * dist.world + dist.rank          # the batch's place among all processes' batches
            failures.extend((number, path, reason) for (_, path), reason in batch.failed)
            if batch.images is not None:
                paths = [path for _, path in batch.indices]
                with report_out_of_memory(f"captioning a batch of {len(paths)} images (beam {gen.beam})",
                                          f"lower --batch-size (now {batch_size}) or --beam; the finished batches "
                                          f"are kept in {out_path}: run again to continue"):
                    captions = caption_tensor(model, batch.images, gen)
                _append(f, _records(fmt, paths, captions), out_path)   # a kill loses at most one batch
                summary.captioned += len(captions)
                if attention_png_dir:
                    summary.attention_maps += _draw_attention(batch.images, batch.indices, captions,
                                                              attention_png_dir)
            bar.update(len(batch.indices) + len(batch.failed))
        try:
            os.fsync(f.fileno())
        except OSError:
            pass
    bar.close()
    if sharded:
        # every process learns the whole run's numbers (so that all exit alike); process 0 merges the parts
        shares = dist.all_gather((summary.captioned, summary.attention_maps, listing_skips, failures))
        summary.captioned = sum(s[0] for s in shares)
        summary.attention_maps = sum(s[1] for s in shares)
        listing_skips = [skip for s in shares for skip in s[2]]
        failures = sorted((failure for s in shares for failure in s[3]), key=lambda failure: failure[0])
    summary.skipped = listing_skips + [(path, reason) for _, path, reason in failures]
    summary.seconds = time.perf_counter() - t0
    if sharded:
        if dist.is_main:
            merge_parts(out_path, find_parts(out_path), order.get)
        dist.barrier()             # the merged file is complete before any process returns
    if dist.is_main:
        _report(summary, skipped_path, say)
    return summary


def _remove(path: str, out_path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SeqgenError(f"{path}: cannot remove it to start {out_path} over ({e.strerror or e})") from None


def _csv_rows(rows: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _records(fmt: str, paths: Sequence[str], captions: Sequence[Caption]) -> str:
    """The output lines of one batch: JSONL {"image", "caption", "score"} or CSV rows."""
    if fmt == "csv":
        return _csv_rows([image_key(p), c.text, f"{c.score:.6f}"] for p, c in zip(paths, captions))
    return "".join(json.dumps({"image": image_key(p), "caption": c.text, "score": round(c.score, 6)},
                              ensure_ascii=False) + "\n" for p, c in zip(paths, captions))


def _append(f, text: str, out_path: str) -> None:
    """Write and flush (so a killed run keeps every finished batch); a failed write is one clear error."""
    try:
        f.write(text)
        f.flush()
    except OSError as e:
        raise SeqgenError(f"{out_path}: cannot write the captions ({e.strerror or e}); the finished batches are "
                          f"kept, run the same command again to continue") from None


def _draw_attention(images: Tensor, items: Sequence[tuple[str, str]], captions: Sequence[Caption],
                    folder: str) -> int:
    """One PNG per (root, path) in `items` whose caption has attention; returns how many were drawn."""
    from seqgen.plots import image_attention_map
    drawn = 0
    for image, (root, path), c in zip(images, items, captions):
        if c.attention is None or not c.words:
            continue
        image_attention_map(image.permute(1, 2, 0).numpy(), c.attention, c.words, c.grid,
                            os.path.join(folder, _attention_png_name(path, root)), title=c.text)
        drawn += 1
    return drawn


def _report(summary: FolderSummary, skipped_path: str | None, say: Callable[[str], None]) -> None:
    s = summary
    parts = [f"captioned {s.captioned:,} image(s) in {s.seconds:.1f}s ({s.images_per_second:.1f} img/s) "
             f"into {s.out_path}"]
    if s.already_done:
        parts.append(f"{s.already_done:,} already there from an earlier run")
    if s.skipped:
        parts.append(f"{len(s.skipped):,} skipped")
    say("seqgen: " + "; ".join(parts))
    for path, reason in s.skipped[:50]:
        say(f"  skipped {path}: {reason}")
    if len(s.skipped) > 50:
        say(f"  ... and {len(s.skipped) - 50} more" + (f" (all in {skipped_path})" if skipped_path else ""))
    if skipped_path:
        try:
            with open(skipped_path, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.writelines(f"{p}\t{r}\n" for p, r in s.skipped)
        except OSError as e:
            raise SeqgenError(f"{skipped_path}: cannot write the list of skipped images ({e.strerror or e})") from None
    if s.attention_maps:
        say(f"seqgen: {s.attention_maps:,} attention map(s) written")


__all__ = ["CaptionDataConfig", "CaptionRunConfig", "Caption", "CaptionSplits", "CaptionExamples",
           "CachedCaptionBatches", "ImageCaptionBatches", "FolderSummary", "caption_images", "caption_images_full",
           "caption_tensor", "caption_folder", "find_parts", "load_splits", "make_evaluate", "merge_parts",
           "normalize_caption", "part_path", "read_done", "resolve_weights", "train_captioning"]
