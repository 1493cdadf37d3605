"""Ensemble: several trained models of one task decoded as one model (seqgen.decoders.ensemble averages their
probabilities at each step). `load_model("a.pt,b.pt")` or `load_model(["a.pt", "b.pt"])` returns one.

It is a `Seq2Seq` for everything that decodes (generate, translate, caption, the task functions and the CLI):
the same target vocabulary for all members; translation members also share the source vocabulary, captioning
members the input image size. Each member runs its own encoder on the same inputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from seqgen.decoders.ensemble import EnsembleDecoder, EnsembleEncoding
from seqgen.errors import SeqgenError
from seqgen.model import Seq2Seq


class _EnsembleEncoder(nn.Module):
    def __init__(self, members: Sequence[Seq2Seq]):
        super().__init__()
        self.members = list(members)       # registered by the Ensemble's ModuleList, not twice here

    def forward(self, source: Tensor, lengths: Tensor | None = None) -> EnsembleEncoding:
        return EnsembleEncoding([m.encode(source, lengths) for m in self.members])


def check_compatible(members: Sequence[Seq2Seq], names: Sequence[str]) -> None:
    """SeqgenError naming the first member that cannot join the first one, and why."""
    first, name0 = members[0], names[0]
    for m, name in zip(members[1:], names[1:]):
        if m.config.task != first.config.task:
            raise SeqgenError(f"cannot ensemble {name0} ({first.config.task}) with {name} ({m.config.task}): "
                              f"the models must do the same task")
        if m.tgt != first.tgt:
            raise SeqgenError(f"cannot ensemble {name0} with {name}: their target vocabularies differ "
                              f"({len(first.tgt.vocab)} vs {len(m.tgt.vocab)} tokens); members must share it")
        if first.config.task == "translation" and m.src != first.src:
            raise SeqgenError(f"cannot ensemble {name0} with {name}: their source vocabularies differ")
        if first.config.task == "captioning":
            a, b = first.config.image_encoder.image_size, m.config.image_encoder.image_size
            if a != b:
                raise SeqgenError(f"cannot ensemble {name0} with {name}: image sizes differ ({a} vs {b})")


class Ensemble(Seq2Seq):
    """Several Seq2Seq models of one task as one (see the module docstring)."""

    def __init__(self, members: Sequence[Seq2Seq], names: Sequence[str] | None = None):
        nn.Module.__init__(self)
        if not members:
            raise SeqgenError("an ensemble needs at least one model")
        names = list(names or [f"model {i + 1}" for i in range(len(members))])
        check_compatible(members, names)
        first = members[0]
        self.config, self.tgt, self.src = first.config, first.tgt, first.src
        self.members = nn.ModuleList(members)
        self.encoder = _EnsembleEncoder(members) if first.encoder is not None else None
        self.decoder = EnsembleDecoder([m.decoder for m in members])

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def forward(self, batch):
        raise SeqgenError("an ensemble decodes; train its members one by one")

    def to_payload(self) -> dict:
        raise SeqgenError("an ensemble is not saved as one checkpoint: average compatible checkpoints with "
                          "`seqgen average`, or pass the members again")
