"""The one batch type every task's data loader produces and the model/trainer consume."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from seqgen.encoders.base import EncoderOutput
from seqgen.tensors import map_tensors


@dataclass
class Batch:
    """target: [B, T+1] ids `bos ... eos` padded with pad (the decoder reads target[:, :-1] and predicts
    target[:, 1:]).  source: [B, S] token ids (text), [B, 3, H, W] images, an `EncoderOutput` of
    precomputed features (cached image features), or None (language model).  source_lengths: [B] or None.
    index: [B] position of each example in its dataset (to put outputs back in order), or None."""

    target: Tensor
    source: Tensor | EncoderOutput | None = None
    source_lengths: Tensor | None = None
    index: Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        """The batch with every tensor moved to `device` (lengths stay where they are: packing wants CPU)."""
        lengths = self.source_lengths
        moved = map_tensors(dataclasses.replace(self, source_lengths=None),
                            lambda t: t.to(device, non_blocking=True))
        return dataclasses.replace(moved, source_lengths=lengths)

    def num_target_tokens(self, pad: int) -> int:
        """How many target positions are predicted (non-pad in target[:, 1:])."""
        return int((self.target[:, 1:] != pad).sum())
