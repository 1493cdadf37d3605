"""Translating with a trained model: `translate` (text) and `translate_nbest` (scores, tokens, attention).

    model = load_model("runs/de-en/best.pt", task="translation")
    translate(model, ["Ein Hund läuft im Schnee."], GenerationConfig(beam=5))

Every source sentence is encoded as its tokens followed by <eos>, as in training (seqgen.tasks.translation).
`Seq2Seq.translate` is this module's `translate`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from seqgen.data.batching import pad_sequences
from seqgen.decoders.search import Hypothesis
from seqgen.errors import LINE_BREAKS, SeqgenError, report_out_of_memory
from seqgen.generation import GenerationConfig, hypothesis_tokens
from seqgen.log import Log, to_stderr, warning

if TYPE_CHECKING:
    from seqgen.model import Seq2Seq

DEFAULT_MAX_SRC_LEN = 256   # translate(): longer sources (in tokens) are truncated with a warning


@dataclass
class Translation:
    """One hypothesis for one source sentence.

    score: the search score (length-penalised for beam search); log_prob: its total log-probability.
    source_tokens / target_tokens: token strings as the model saw and produced them (with "<eos>" where the
    model read or wrote one).  attention: [len(target_tokens), len(source_tokens)] weights, or None.
    """

    text: str
    score: float
    log_prob: float
    source_tokens: list[str] = field(default_factory=list)
    target_tokens: list[str] = field(default_factory=list)
    attention: Tensor | None = None


def _require_translation(model: Seq2Seq) -> None:
    if model.config.task != "translation" or model.src is None:
        raise SeqgenError(f"this is a {model.config.task!r} model; translation needs a model trained with "
                          f"`seqgen train translation`")


# A subword vocabulary can hold line breaks (learned from a lone CR in the training text), and one inside a
# translation would break one-line-per-sentence output.
_LINE_BREAK = re.compile(f"[{LINE_BREAKS}]")


def _to_translation(model: Seq2Seq, hyp: Hypothesis, src_tokens: list[str]) -> Translation:
    ids, tgt_tokens, attn = hypothesis_tokens(model.tgt, hyp)
    if attn is not None:
        attn = attn[:, :len(src_tokens)]
    return Translation(text=_LINE_BREAK.sub(" ", model.tgt.decode(ids)), score=float(hyp.score),
                       log_prob=float(hyp.log_prob), source_tokens=src_tokens, target_tokens=tgt_tokens, attention=attn)


def translate_nbest(model: Seq2Seq, sentences: Sequence[str], gen: GenerationConfig | None = None, *,
                    batch_size: int = 64, max_src_len: int = DEFAULT_MAX_SRC_LEN, seed: int = 1,
                    warn: Log | None = None) -> list[list[Translation]]:
    """Translate `sentences`; returns, per sentence and in input order, gen.n_best hypotheses best first
    (one for greedy and sampling).

    Sentences are sorted by length and decoded `batch_size` at a time. A source longer than `max_src_len`
    tokens is truncated, and an empty one gives an empty translation; both are counted in one warning line each,
    given to `warn` (default: stderr; see seqgen.log).
    """
    _require_translation(model)
    gen = gen or GenerationConfig(beam=5)
    gen.validate()
    if batch_size < 1:
        raise SeqgenError(f"--batch-size must be >= 1, got {batch_size}")
    if max_src_len < 1:
        raise SeqgenError(f"--max-src-len must be >= 1, got {max_src_len}")
    warn = warn or to_stderr
    src = model.src
    results: list[list[Translation]] = [[] for _ in sentences]
    ids: dict[int, list[int]] = {}
    truncated, empty = [], 0
    for i, text in enumerate(sentences):
        text = text.strip()
        if not text:
            empty += 1
            results[i] = [Translation(text="", score=0.0, log_prob=0.0)]
            continue
        x = src.encode(text)
        if len(x) > max_src_len:
            truncated.append(i + 1)
            x = x[:max_src_len]
        ids[i] = x + [src.vocab.eos]
    if truncated:
        shown = ", ".join(map(str, truncated[:10])) + (", ..." if len(truncated) > 10 else "")
        warn(warning(f"{len(truncated)} sentence(s) longer than {max_src_len} tokens were truncated (lines {shown}); "
                     f"raise --max-src-len to translate them whole"))
    if empty:
        warn(warning(f"{empty} empty line(s) left empty in the output"))
    order = sorted(ids, key=lambda i: len(ids[i]), reverse=True)
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed) if gen.temperature > 0 else None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        tokens, lengths = pad_sequences([ids[i] for i in chunk], src.vocab.pad)
        with report_out_of_memory(f"translating a batch of {len(chunk)} sentences x {tokens.size(1)} tokens "
                                  f"(beam {gen.beam})", f"lower --batch-size (now {batch_size}) or --beam"):
            hyps = model.generate(tokens.to(device), lengths, gen=gen, generator=generator)
        for i, hs in zip(chunk, hyps):
            src_tokens = src.vocab.tokens(ids[i])
            results[i] = [_to_translation(model, h, src_tokens) for h in hs]
    return results


def translate(model: Seq2Seq, sentences: Sequence[str], gen: GenerationConfig | None = None, *,
              batch_size: int = 64, max_src_len: int = DEFAULT_MAX_SRC_LEN, seed: int = 1,
              warn: Log | None = None) -> list[str]:
    """Translate `sentences` (batched, sorted by length inside); returns the best translation of each, in order."""
    return [hs[0].text for hs in translate_nbest(model, sentences, gen, batch_size=batch_size,
                                                 max_src_len=max_src_len, seed=seed, warn=warn)]


__all__ = ["DEFAULT_MAX_SRC_LEN", "Translation", "translate", "translate_nbest"]
