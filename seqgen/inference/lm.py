"""Generating text with a trained language model: continue a prompt by sampling, greedy or beam search.

    model = load_model("runs/shakespeare/best.pt", task="lm")
    generate_text(model, "ROMEO:", GenerationConfig(temperature=0.8, max_len=200))
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig

if TYPE_CHECKING:
    from seqgen.model import Seq2Seq

MAX_SAMPLES = 1_000     # continuations generated at once (one batch)


def generate_text(model: Seq2Seq, prompt: str, gen: GenerationConfig, *, num_samples: int = 1,
                  seed: int = 1, on_text: Callable[[str], None] | None = None) -> list[str]:
    """Continue `prompt` `num_samples` times; returns prompt + continuation for each sample
    (for beam search: the n-best continuations of one search).

    on_text: called with each new piece of the first sample's text as it settles (the prompt first), so that
    on_text's pieces joined equal the first returned text; for beam search, the piece every beam agrees on.
    """
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise SeqgenError(f"--num-samples must be between 1 and {MAX_SAMPLES:,}, got {num_samples}")
    unknown = model.tgt.unknown(prompt)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10])
        raise SeqgenError(f"--prompt contains symbols the model never saw in training: {shown}")
    ids = model.tgt.encode(prompt)
    prefix = torch.tensor(ids, dtype=torch.long, device=model.device) if ids else None
    generator = torch.Generator(device=model.device).manual_seed(seed)
    n = 1 if gen.beam > 1 else num_samples
    shown = [""]

    def stream(i: int, tokens: list[int]) -> None:
        if i == 0:
            _show(model.tgt.decode(ids + tokens), shown, on_text)
    results = model.generate(batch_size=n, gen=gen, prefix=prefix, generator=generator,
                             stream=stream if on_text is not None else None)
    texts = [model.tgt.decode(ids + h.tokens) for hyps in results for h in hyps]
    if on_text is not None:
        _show(texts[0], shown, on_text)
    return texts


def _show(text: str, shown: list[str], on_text: Callable[[str], None]) -> None:
    """Pass on what `text` adds to the text shown so far (shown[0]). Decoding a longer token sequence only
    appends to the text for char and word models; should a subword decoder rewrite the end of the text shown,
    nothing more is passed on (the returned texts stay exact)."""
    if len(text) > len(shown[0]) and text.startswith(shown[0]):
        on_text(text[len(shown[0]):])
        shown[0] = text


__all__ = ["generate_text"]
