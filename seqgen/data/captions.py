"""Caption data: the data section of a captioning run, its captions and splits, and the batch sources
training and validation read.

    splits = load_splits(CaptionDataConfig(images="flickr8k/images", captions="flickr8k/captions.tsv"), seed=1)
    examples = CaptionExamples(splits.train, splits.captions, codec, max_len=40)

Every caption of every training image is one example (an image with 5 captions is seen 5 times an epoch).
With a frozen backbone training batches carry cached features (`CachedCaptionBatches`, `Batch.source` an
`EncoderOutput`); otherwise images are decoded in DataLoader workers (`ImageCaptionBatches`). Both are
length-bucketed and deterministic for (seed, epoch), so a resumed run continues exactly.

The training captions' ids are one flat `TokenLists` (`bos ... eos` of every kept caption, uint16/uint32,
plus int64 offsets), not a Python list per caption: in a run, memory-mapped from the prepared-data cache
(seqgen.data.prepared_captions, PREPARED_DIR/captions-KEY), written by the first run on those captions.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from seqgen.config import MAX_VOCAB, Bounds, Count, File, Folder, Positive, Tokens
from seqgen.data.batch import Batch
from seqgen.data.batching import BucketBatchSampler
from seqgen.data.images import (ImageError, ImageFolderDataset, collate_images, loader_generator, read_captions,
                                read_split)
from seqgen.data.prepared_captions import prepare_captions, tokenize_captions
from seqgen.encoders.base import EncoderOutput
from seqgen.errors import SeqgenError
from seqgen.tokenizers import TextCodec

if TYPE_CHECKING:
    from seqgen.data.features import FeatureCache


@dataclass
class CaptionDataConfig:
    """The captioning data: images, captions and splits, the vocabulary, the batches and the feature cache.

    images:           the folder that the image names in the captions and split files are relative to
    captions:         captions.tsv (image<TAB>caption), a Karpathy or COCO captions JSON, or the Flickr8k token file
    train_split:      file of the image names to train on; without it, every captioned image outside the
                      validation split
    valid_split:      file of the image names to validate on; without it, valid_fraction of the images (seeded)
    valid_fraction:   without valid_split: the share of the images held out for validation
    level:            tokens: words or sentencepiece subwords
    lowercase:        lowercase the captions before tokenization (CIDEr and BLEU ignore case anyway)
    min_freq:         word level: rarer words become <unk>
    vocab_size:       subword level: sentencepiece pieces
    max_len:          training captions with more tokens than this are dropped (at most 10,000)
    batch_size:       captions per training batch
    valid_batch_size: images per batch when decoding the validation split
    valid_limit:      validate on the first N validation images only; 0 = all
    feature_cache:    frozen backbone: the folder of the feature caches; without it, OUT/features
    prepared_dir:     the folder of the prepared data (the training captions tokenized once, memory-mapped);
                      without it, OUT/prepared. Shared by runs on the same captions and vocabulary
    cache_dtype:      how cached features are stored (float16 halves the disk and page-cache footprint)
    num_workers:      DataLoader processes decoding images (feature extraction, fine-tuning); without it, 0 on
                      a CPU with up to 2 cores (the main process decodes), 1 with up to 4, 2 above; on a GPU
                      half the cores, up to 8
    allow_outside_images: use image names of the captions and split files that resolve outside --images
                      (../x.jpg, /abs/x.jpg, a symlink out of the folder); refused by default
    """

    images: Folder = ""
    captions: File = ""
    train_split: File = ""
    valid_split: File = ""
    valid_fraction: Annotated[float, Bounds(0.0, 1.0, low_open=True, high_open=True)] = 0.05
    level: Literal["word", "subword"] = "word"
    lowercase: bool = True
    min_freq: Positive = 5
    vocab_size: Annotated[int, Bounds(1, MAX_VOCAB)] = 4000
    max_len: Tokens = 40
    batch_size: Positive = 64
    valid_batch_size: Positive = 100
    valid_limit: Count = 0
    feature_cache: Folder = ""
    prepared_dir: Folder = ""
    cache_dtype: Literal["float16", "float32"] = "float16"
    num_workers: Annotated[int, Bounds(0, 256)] | None = None
    allow_outside_images: bool = False


def normalize_caption(text: str, lowercase: bool) -> str:
    """One caption as the model learns it: whitespace collapsed, optionally lowercased."""
    text = " ".join(text.split())
    return text.lower() if lowercase else text


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


def _refuse_names_outside(splits: CaptionSplits, names: list[str], captions_path: str) -> None:
    """Refuse image names that resolve outside the images folder (`../../etc/passwd`, `/etc/shadow`, a symlink
    out of it), before any of them is opened: the error says neither whether nor what such a file is."""
    root = os.path.realpath(splits.images_dir)
    inside = root.rstrip(os.sep) + os.sep
    outside = [n for n in names if not os.path.realpath(splits.path(n)).startswith(inside)]
    if outside:
        shown = ", ".join(repr(n[:100]) for n in outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3
                                                                 else "")
        raise SeqgenError(f"{captions_path}: {len(outside)} image name(s) lead outside --images {splits.images_dir} "
                          f"({shown}); names are relative to --images: fix them, or pass --allow-outside-images to "
                          f"use files elsewhere")


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
    if not d.allow_outside_images:
        _refuse_names_outside(splits, train + valid, d.captions)
    missing = [n for n in train + valid if not os.path.isfile(splits.path(n))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SeqgenError(f"{d.images}: {len(missing)} image file(s) of the splits are missing ({shown})")
    return splits


def load_test_split(images: str, captions_path: str, split: str = "", *, allow_outside_images: bool = False
                    ) -> tuple[list[str], dict[str, list[str]]]:
    """The images to evaluate on and all their references: the names of `split` (a file of image names), or
    every image of the captions file without one. One-line errors for a missing folder, a name without
    captions, a name leading outside `images` and an image file that is not there, before any is decoded."""
    if not os.path.isdir(images):
        raise SeqgenError(f"{images}: no such folder (--images)")
    raw = read_captions(captions_path)
    captions = {name: [normalize_caption(c, False) for c in caps] for name, caps in raw.items()}
    names = _split_names(split, captions, "evaluation") if split else list(captions)
    if not names:
        raise SeqgenError(f"{captions_path}: no captioned images")
    splits = CaptionSplits(train=[], valid=names, captions=captions, images_dir=images)
    if not allow_outside_images:
        _refuse_names_outside(splits, names, split or captions_path)
    missing = [n for n in names if not os.path.isfile(splits.path(n))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SeqgenError(f"{split or captions_path}: {len(missing)} image(s) to evaluate are not files in "
                          f"--images {images} ({shown})")
    return names, {n: captions[n] for n in names}


class CaptionExamples:
    """One example per (image, caption): `image_of[i]` is the image row of target `targets[i]`.

    targets: TokenLists of the kept captions' `bos ... eos` ids; image_of: [K] int64; names: the image rows.
    With `prepared_dir` they come from the prepared-data cache there (seqgen.data.prepared_captions: written by
    the first run, memory-mapped by the next); without it they are tokenized in memory.
    """

    def __init__(self, names: Sequence[str], captions: dict[str, list[str]], codec: TextCodec, max_len: int, *,
                 prepared_dir: str = "", log: Callable[[str], None] = lambda line: None):
        if prepared_dir:
            self.targets, self.image_of, self.dropped = prepare_captions(names, captions, codec, max_len,
                                                                         prepared_dir, log=log)
        else:
            self.targets, self.image_of, self.dropped = tokenize_captions(names, captions, codec, max_len)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.targets)


class CachedCaptionBatches:
    """Training batches over cached features (frozen backbone); a `BatchSource`.

    Batches are length-bucketed and deterministic for (seed, epoch), so a resumed run continues exactly.
    """

    def __init__(self, cache: FeatureCache, rows: Sequence[int], examples: CaptionExamples, *, pad: int,
                 batch_size: int, seed: int):
        self.cache, self.rows, self.examples, self.pad = cache, list(rows), examples, pad
        self.sampler = BucketBatchSampler(examples.targets.lengths(), batch_size=batch_size,
                                          shuffle=True, seed=seed)

    def num_batches(self, epoch: int) -> int:
        return self.sampler.num_batches(epoch)

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[Batch]:
        """Batches [start:stop:step] of the epoch's list (a process's share under data parallelism)."""
        ex = self.examples
        for idx in self.sampler.batches(epoch)[start:stop:step]:
            target, _ = ex.targets.padded(idx, self.pad)
            source = self.cache.get_rows([self.rows[r] for r in ex.image_of[idx].tolist()])
            yield Batch(target=target, source=source, index=torch.as_tensor(idx, dtype=torch.long))


class CachedImageBatches:
    """Training batches of whole images over cached features, for objectives that score an image's captions
    against all its references (self-critical training); a `BatchSource`, deterministic for (seed, epoch).

    Each batch: source = the features of `batch_size` images, index = their positions in `rows` (what the
    objective looks their references up by), target = [B, 2] `bos eos` rows, so that the Trainer counts one
    "token" per image.
    """

    def __init__(self, cache: FeatureCache, rows: Sequence[int], *, bos: int, eos: int, batch_size: int, seed: int):
        self.cache, self.rows, self.bos, self.eos = cache, list(rows), bos, eos
        self.sampler = BucketBatchSampler([1] * len(self.rows), batch_size=batch_size, shuffle=True, seed=seed)

    def num_batches(self, epoch: int) -> int:
        return self.sampler.num_batches(epoch)

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[Batch]:
        """Batches [start:stop:step] of the epoch's list (a process's share under data parallelism)."""
        for idx in self.sampler.batches(epoch)[start:stop:step]:
            target = torch.tensor([[self.bos, self.eos]] * len(idx), dtype=torch.long)
            yield Batch(target=target, source=self.cache.get_rows([self.rows[i] for i in idx]),
                        index=torch.as_tensor(idx, dtype=torch.long))


class _CaptionImageDataset(torch.utils.data.Dataset):
    """example index -> (index, image tensor | None, reason | None): errors are data (the collate function
    takes the targets from the examples)."""

    def __init__(self, paths: Sequence[str], examples: CaptionExamples, transform: Callable):
        self.images = ImageFolderDataset(paths, transform)
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        _, image, reason = self.images[int(self.examples.image_of[i])]
        return i, image, reason


class _CaptionCollate:
    def __init__(self, pad: int, paths: Sequence[str], examples: CaptionExamples):
        self.pad, self.paths, self.examples = pad, paths, examples

    def __call__(self, items):
        failed = [(self.paths[int(self.examples.image_of[i])], r) for i, x, r in items if x is None]
        if failed:
            return None, failed
        index = [i for i, _, _ in items]
        target, _ = self.examples.targets.padded(index, self.pad)
        return Batch(target=target, source=torch.stack([x for _, x, _ in items]),
                     index=torch.as_tensor(index, dtype=torch.long)), []


class ImageCaptionBatches:
    """Training batches of decoded images (the backbone trains); a `BatchSource`.

    Images are decoded in `num_workers` DataLoader workers; an unreadable image stops training with an
    ImageError naming it (remove it from the split).
    """

    def __init__(self, paths: Sequence[str], examples: CaptionExamples, transform: Callable, *, pad: int,
                 batch_size: int, seed: int, num_workers: int = 2, pin_memory: bool = False):
        self.paths, self.examples, self.transform, self.pad = list(paths), examples, transform, pad
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.sampler = BucketBatchSampler(examples.targets.lengths(), batch_size=batch_size,
                                          shuffle=True, seed=seed)

    def num_batches(self, epoch: int) -> int:
        return self.sampler.num_batches(epoch)

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[Batch]:
        """Batches [start:stop:step] of the epoch's list: only these images are decoded."""
        batches = self.sampler.batches(epoch)[start:stop:step]
        if not batches:
            return
        loader = torch.utils.data.DataLoader(
            _CaptionImageDataset(self.paths, self.examples, self.transform), batch_sampler=batches,
            num_workers=self.num_workers, collate_fn=_CaptionCollate(self.pad, self.paths, self.examples),
            pin_memory=self.pin_memory, generator=loader_generator())
        for batch, failed in loader:
            if failed:
                raise _images_error(failed, "remove them from the training split")
            yield batch


def _images_error(failed: list[tuple[str, str]], advice: str) -> ImageError:
    failed = list(dict.fromkeys(failed))
    shown = "; ".join(f"{p} ({r})" for p, r in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    return ImageError(failed[0][0], failed[0][1], failed,
                      message=f"{len(failed)} image(s) cannot be read: {shown}; {advice}")


def cached_valid_batches(cache: FeatureCache, rows: Sequence[int], batch_size: int
                         ) -> Callable[[], Iterator[tuple[list[int], EncoderOutput]]]:
    """Validation batches from a feature cache: a function yielding (positions in `rows`, features of those
    cache rows), `batch_size` at a time, in order (see `seqgen.tasks.captioning.make_evaluate`)."""
    def batches():
        for start in range(0, len(rows), batch_size):
            chunk = list(range(start, min(start + batch_size, len(rows))))
            yield chunk, cache.get_rows([rows[i] for i in chunk])
    return batches


def image_valid_batches(paths: Sequence[str], transform: Callable, batch_size: int, num_workers: int,
                        what: str = "validation") -> Callable[[], Iterator[tuple[list[int], Tensor]]]:
    """Validation batches decoded from image files: a function yielding (positions in `paths`, images
    [B, 3, S, S]) in order; an unreadable image raises ImageError naming every such image of its batch."""
    def batches():
        loader = torch.utils.data.DataLoader(
            ImageFolderDataset(list(paths), transform, draft_size=transform.image_size), batch_size=batch_size,
            shuffle=False, num_workers=num_workers, collate_fn=collate_images, generator=loader_generator())
        for b in loader:
            if b.failed:
                raise _images_error([(paths[i], r) for i, r in b.failed], f"remove them from the {what} split")
            yield b.indices, b.images
    return batches


__all__ = ["load_test_split", "CaptionDataConfig", "CaptionSplits", "CaptionExamples", "CachedCaptionBatches",
           "CachedImageBatches", "ImageCaptionBatches",
           "cached_valid_batches", "image_valid_batches", "load_splits", "normalize_caption"]
