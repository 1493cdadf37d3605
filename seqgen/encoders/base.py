"""The contract between encoders and the decoder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass
class EncoderOutput:
    """What any encoder hands to the decoder. Every tensor is batch first.

    state:  [B, H_enc]    summary of the input; the decoder's bridge maps it to its initial hidden state.
    memory: [B, S, H_mem] per-position features for attention (source tokens or image regions).
    mask:   [B, S] bool   True where `memory` is real, False on padding.
    keys:   [B, S, A]     attention keys precomputed from `memory` by `RNNDecoder.prepare` (Bahdanau
                          attention), so that search does not recompute them every step; None otherwise.
    """

    state: Tensor | None = None
    memory: Tensor | None = None
    mask: Tensor | None = None
    keys: Tensor | None = None


class Encoder(Protocol):
    """Anything that maps a batch of inputs to an `EncoderOutput`."""

    def __call__(self, inputs: Tensor, lengths: Tensor | None = None) -> EncoderOutput: ...
