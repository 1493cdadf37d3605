"""The contract between encoders and the decoder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from seqgen.tensors import map_tensors


@dataclass
class EncoderOutput:
    """What any encoder hands to the decoder. Every tensor is batch first.

    state:  [B, H_enc]    summary of the input; the decoder's bridge maps it to its initial hidden state.
    memory: [B, S, H_mem] per-position features for attention (source tokens or image regions).
    mask:   [B, S] bool   True where `memory` is real, False on padding.
    keys:   [B, S, A]     attention keys precomputed from `memory` by `RNNDecoder.prepare` (Bahdanau
                          attention), so that search does not recompute them every step; None otherwise.
    values: [B, S, O]     `memory` through the decoder's combine layer, precomputed by `RNNDecoder.prepare` for
                          decoding: a step then mixes these O-wide rows instead of H_mem-wide ones; None otherwise.
    beams:  how many consecutive decoder rows read each input: the decoder batch is [B * beams]. Beam search
            repeats an input per beam this way instead of copying its memory (`repeat_batch`), so each step
            reads [B, S, H_mem] once for all beams.
    """

    state: Tensor | None = None
    memory: Tensor | None = None
    mask: Tensor | None = None
    keys: Tensor | None = None
    values: Tensor | None = None
    beams: int = 1

    def repeat_batch(self, times: int) -> "EncoderOutput":
        """Each input read by `times` times as many consecutive decoder rows (one per beam); copies nothing."""
        return dataclasses.replace(self, beams=self.beams * times)

    def select_batch(self, index: Tensor) -> "EncoderOutput":
        """Keep / reorder decoder rows: `index` [R] holds row numbers of the [B * beams] decoder batch.

        Whole groups in order (what beam search selects when inputs finish) select inputs and stay grouped;
        any other selection gets one memory row per decoder row (beams = 1).
        """
        g = self.beams
        if g == 1:
            return map_tensors(self, lambda t: t.index_select(0, index))
        if index.numel() % g == 0:
            groups = index.reshape(-1, g)
            first = groups[:, :1]
            if bool(((first % g == 0) & (groups == first + torch.arange(g, device=index.device))).all()):
                inputs = first.squeeze(1) // g
                return map_tensors(self, lambda t: t.index_select(0, inputs))
        return dataclasses.replace(map_tensors(self, lambda t: t.index_select(0, index // g)), beams=1)


class Encoder(Protocol):
    """Anything that maps a batch of inputs to an `EncoderOutput`."""

    def __call__(self, inputs: Tensor, lengths: Tensor | None = None) -> EncoderOutput: ...
