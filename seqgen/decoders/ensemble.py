"""Several decoders decoded as one: `EnsembleDecoder.step` averages the members' probabilities.

Search drives it like any decoder (greedy, sampling and batched beam search, n-best, attention), with no
special case: the state is one `EnsembleState` holding each member's state, the encoder output one
`EnsembleEncoding` holding each member's, and both reorder with the search's `select_batch` / `repeat_batch`
like any batch-first state.

    p(y | ...) = mean_m p_m(y | ...),   returned as log p: logsumexp_m(log p_m) - log M

The members must share the target vocabulary (token ids mean the same to all); each has its own encoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from seqgen.decoders.state import repeat_batch, select_batch


@dataclass
class EnsembleState:
    """members: each member decoder's state (batch first). attn: [B, S] the members' mean attention of the
    last step when every member has attention over the same positions, else None."""

    members: tuple
    attn: Tensor | None = None


class EnsembleEncoding:
    """Each member's encoder output for the same inputs; reorders all of them together."""

    def __init__(self, members: Sequence):
        self.members = tuple(members)

    @property
    def state(self) -> Tensor | None:      # what search and Seq2Seq read to count the inputs
        return next((m.state for m in self.members if m is not None and m.state is not None), None)

    @property
    def memory(self) -> Tensor | None:
        return next((m.memory for m in self.members if m is not None and m.memory is not None), None)

    def select_batch(self, index: Tensor) -> "EnsembleEncoding":
        return EnsembleEncoding([select_batch(m, index) for m in self.members])

    def repeat_batch(self, times: int) -> "EnsembleEncoding":
        return EnsembleEncoding([repeat_batch(m, times) for m in self.members])


class EnsembleDecoder:
    """prepare / init_state / step over several decoders (see the module docstring)."""

    def __init__(self, decoders: Sequence):
        if not decoders:
            raise ValueError("an ensemble needs at least one decoder")
        self.decoders = list(decoders)
        self.attention = self.decoders[0].attention

    def _members(self, enc: EnsembleEncoding | None) -> list:
        return list(enc.members) if enc is not None else [None] * len(self.decoders)

    def prepare(self, enc: EnsembleEncoding | None, *, decoding: bool = False) -> EnsembleEncoding | None:
        if enc is None:
            return None
        return EnsembleEncoding([d.prepare(e, decoding=decoding) for d, e in zip(self.decoders, enc.members)])

    def init_state(self, enc: EnsembleEncoding | None, batch_size: int) -> EnsembleState:
        return EnsembleState(tuple(d.init_state(e, batch_size) for d, e in zip(self.decoders, self._members(enc))))

    def step(self, tokens: Tensor, state: EnsembleState,
             enc: EnsembleEncoding | None = None) -> tuple[Tensor, EnsembleState]:
        """tokens [B] -> log of the members' mean probabilities [B, V] and the new state."""
        log_probs, states = [], []
        for d, s, e in zip(self.decoders, state.members, self._members(enc)):
            lp, s = d.step(tokens, s, e)
            log_probs.append(lp.float())
            states.append(s)
        mixed = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
        attns = [getattr(s, "attn", None) for s in states]
        attn = None
        if all(isinstance(a, Tensor) for a in attns) and len({tuple(a.shape) for a in attns}) == 1:
            attn = torch.stack([a.float() for a in attns]).mean(dim=0)
        return mixed, EnsembleState(tuple(states), attn)
