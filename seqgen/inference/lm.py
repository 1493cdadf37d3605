"""Generating text with a trained language model: continue a prompt by sampling, greedy or beam search.

    model = load_model("runs/shakespeare/best.pt", task="lm")
    generate_text(model, "ROMEO:", GenerationConfig(temperature=0.8, max_len=200))
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig

if TYPE_CHECKING:
    from seqgen.model import Seq2Seq


def generate_text(model: Seq2Seq, prompt: str, gen: GenerationConfig, *, num_samples: int = 1,
                  seed: int = 1) -> list[str]:
    """Continue `prompt` `num_samples` times; returns prompt + continuation for each sample
    (for beam search: the n-best continuations of one search)."""
    unknown = model.tgt.unknown(prompt)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10])
        raise SeqgenError(f"--prompt contains symbols the model never saw in training: {shown}")
    ids = model.tgt.encode(prompt)
    prefix = torch.tensor(ids, dtype=torch.long, device=model.device) if ids else None
    generator = torch.Generator(device=model.device).manual_seed(seed)
    n = 1 if gen.beam > 1 else num_samples
    results = model.generate(batch_size=n, gen=gen, prefix=prefix, generator=generator)
    return [model.tgt.decode(ids + h.tokens) for hyps in results for h in hyps]


__all__ = ["generate_text"]
