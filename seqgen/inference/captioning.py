"""Captioning with a trained model: image files, PIL images or a batch of image tensors -> captions.

    model = load_model("runs/cap/best.pt", task="captioning")
    caption_images(model, ["dog.jpg", PIL.Image.open("cat.png")])        # beam 5, no repeated trigram
    caption_images_full(model, ["dog.jpg"], GenerationConfig(beam=3))    # with scores and attention

`Seq2Seq.caption` is `caption_images` with `default_caption_gen`. Whole folders (streamed, resumable, sharded
under torchrun) are `seqgen.tasks.caption_folder`; training is `seqgen.tasks.captioning`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image
from torch import Tensor

from seqgen.data.images import load_image, to_rgb
from seqgen.decoders.search import Hypothesis
from seqgen.encoders.base import EncoderOutput
from seqgen.encoders.cnn import build_transform
from seqgen.errors import SeqgenError, report_out_of_memory
from seqgen.generation import GenerationConfig, hypothesis_tokens
from seqgen.tokenizers import SPACE_MARK

if TYPE_CHECKING:
    from seqgen.model import Seq2Seq


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


def require_captioning(model: Seq2Seq) -> None:
    """SeqgenError unless `model` is a captioning model."""
    if model.config.task != "captioning" or model.encoder is None:
        raise SeqgenError(f"this is a {model.config.task!r} model; captioning needs a model trained with "
                          f"`seqgen train captioning`")


def _display(token: str) -> str:
    return token[1:] if len(token) > 1 and token[0] == SPACE_MARK else token


def _to_caption(model: Seq2Seq, hyp: Hypothesis) -> Caption:
    ids, tokens, attn = hypothesis_tokens(model.tgt, hyp)
    grid = None
    if attn is not None:
        side = int(round(math.sqrt(attn.size(-1))))
        grid = (side, side) if side * side == attn.size(-1) else (1, attn.size(-1))
    return Caption(text=model.tgt.decode(ids).strip(), score=float(hyp.score), log_prob=float(hyp.log_prob),
                   words=[_display(t) for t in tokens], attention=attn, grid=grid)


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
    require_captioning(model)
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


__all__ = ["CAPTION_NO_REPEAT_NGRAM", "Caption", "caption_images", "caption_images_full", "caption_tensor",
           "default_caption_gen", "require_captioning"]
