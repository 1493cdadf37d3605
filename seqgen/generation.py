"""How to decode (`GenerationConfig`: greedy, beam search or sampling; lengths, n-best, precision) and the one
step every task takes from a finished hypothesis to what it shows: token strings and attention rows.

Below the model and the tasks: `Seq2Seq.generate` reads a GenerationConfig, and the task inference functions
(seqgen/inference/) turn its hypotheses into translations, captions and text with `hypothesis_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from torch import Tensor

from seqgen.config import MAX_TOKENS, MAX_VOCAB, Bounds, ConfigValueError, NonNegative, Tokens
from seqgen.config import validate as check_config
from seqgen.decoders.search import Hypothesis
from seqgen.errors import SeqgenError
from seqgen.tokenizers import TextCodec
from seqgen.vocab import EOS


MAX_BEAM = 1_000    # hypotheses per input (beam, n_best)


@dataclass
class GenerationConfig:
    """How to decode: greedy (default), beam search (beam > 1) or sampling (temperature > 0).

    beam:            hypotheses kept per input by beam search; 1 = greedy search (or sampling, with a temperature)
    temperature:     sample each token at this temperature; 0 = deterministic (greedy or beam search)
    top_k:           sampling: draw from the k most likely tokens only; 0 = from all
    top_p:           sampling: draw from the smallest set of most likely tokens whose probability reaches p
    max_len:         generate at most this many tokens (<eos> included; at most 10,000); a longer output is
                     cut there
    min_len:         <eos> is not allowed before this many tokens
    length_penalty:  beam search: GNMT length normalisation alpha; 0 = rank by raw log-probability
    n_best:          hypotheses returned per input, best first (at most beam)
    no_repeat_ngram: never generate a word n-gram of this length twice; 0 = no such rule
    amp:             decode under autocast, as in training: auto = bfloat16 where the hardware has it natively,
                     except CPU searches of at most 4 rows (bound by memory, where float32 is faster); under
                     bf16 a result can depend on what it is batched with, off decodes in float32
    """

    beam: Annotated[int, Bounds(1, MAX_BEAM)] = 1
    temperature: NonNegative = 0.0
    top_k: Annotated[int, Bounds(0, MAX_VOCAB)] = 0
    top_p: Annotated[float, Bounds(0.0, 1.0, low_open=True)] = 1.0
    max_len: Tokens = 100
    min_len: Annotated[int, Bounds(0, MAX_TOKENS)] = 0
    length_penalty: Annotated[float, Bounds(0.0, 10.0)] = 1.0
    n_best: Annotated[int, Bounds(1, MAX_BEAM)] = 1
    no_repeat_ngram: Annotated[int, Bounds(0, MAX_TOKENS)] = 0
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"

    def validate(self) -> None:
        """Every field within its bounds, and the rules between them (seqgen.config.validate)."""
        check_config(self)

    def cross_check(self) -> None:
        if self.temperature > 0 and self.beam > 1:
            raise SeqgenError("choose either --beam N (search) or --temperature T (sampling), not both")
        if self.n_best > self.beam:
            raise ConfigValueError(("n_best",), f"cannot exceed beam ({self.beam}), got {self.n_best}")
        if self.min_len > self.max_len:
            raise ConfigValueError(("min_len",), f"cannot exceed max_len ({self.max_len}), got {self.min_len}")


def decoding_config(given: dict, defaults: GenerationConfig, *, greedy: bool = False) -> GenerationConfig:
    """The GenerationConfig a command means, from the options a user gave (`given`: only those typed).

    defaults: what the command decodes with when no option is given (`default_decoding`). A searching
    command (defaults.temperature == 0) runs beam search with defaults.beam unless given greedy, a beam or a
    temperature; a sampling one (`generate`) samples at defaults.temperature unless given greedy or a beam.
    The other fields of `defaults` fill the options not given. One implementation for the CLI and the server.
    """
    options = {**{k: v for k, v in vars(defaults).items() if k not in ("beam", "temperature")}, **given}
    beam_given = "beam" in given and given["beam"] > 1
    temperature = given.get("temperature")
    if greedy:
        if beam_given or (temperature or 0) > 0:
            raise SeqgenError("--greedy cannot be combined with --beam N or --temperature T")
        options.update(beam=1, temperature=0.0)
    elif defaults.temperature > 0:
        if beam_given:
            if (temperature or 0) > 0:
                raise SeqgenError("--temperature samples; it cannot be combined with --beam or --greedy")
            options["temperature"] = 0.0
        elif temperature is None:
            options["temperature"] = defaults.temperature
        elif temperature <= 0:
            raise SeqgenError(f"--temperature must be > 0 when sampling (got {temperature}); "
                              f"use --greedy for deterministic output")
    elif not temperature and "beam" not in given:
        options["beam"] = defaults.beam
    gen = GenerationConfig(**options)
    gen.validate()
    return gen


def hypothesis_tokens(codec: TextCodec, hyp: Hypothesis) -> tuple[list[int], list[str], Tensor | None]:
    """A hypothesis as a reader sees it: (ids, tokens, attention).

    ids: the generated ids (no bos, no final eos); tokens: their vocabulary strings, with "<eos>" appended when
    the step that wrote eos attended too; attention: [len(tokens), S] float32 on the CPU, or None.
    """
    ids = [int(t) for t in hyp.tokens]
    tokens = codec.vocab.tokens(ids)
    attention = hyp.attention
    if attention is not None:
        if attention.size(0) > len(ids):             # the step that wrote <eos> has attention too
            tokens.append(EOS)
        attention = attention[:len(tokens)].detach().float().cpu()
    return ids, tokens, attention


__all__ = ["GenerationConfig", "hypothesis_tokens"]
