"""Attention over encoder memory: additive (Bahdanau) and multiplicative (Luong dot / general).

All functions take a whole block of queries [B, T, Hq] at once, so training without input feeding
attends over every target position in one batched matmul; a single step is just T = 1.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

AttentionKind = Literal["bahdanau", "luong_dot", "luong_general"]


class Attention(nn.Module):
    """Scores queries against memory, masks padding, returns context vectors and weights.

    query_size: Hq (decoder RNN output); memory_size: Hm (encoder memory features).
    """

    def __init__(self, kind: AttentionKind, query_size: int, memory_size: int, attn_size: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "bahdanau":
            attn_size = attn_size or query_size
            self.key_proj = nn.Linear(memory_size, attn_size, bias=False)
            self.query_proj = nn.Linear(query_size, attn_size, bias=False)
            self.energy = nn.Linear(attn_size, 1, bias=False)
        elif kind == "luong_general":
            self.query_proj = nn.Linear(query_size, memory_size, bias=False)
        elif kind == "luong_dot":
            if query_size != memory_size:
                raise ValueError(f"luong_dot attention needs decoder hidden ({query_size}) == memory size "
                                 f"({memory_size}); use luong_general or bahdanau")
        else:
            raise ValueError(f"unknown attention {kind!r}: choose bahdanau, luong_dot or luong_general")

    def keys(self, memory: Tensor) -> Tensor | None:
        """Precompute what does not depend on the query: [B, S, A] for Bahdanau (twice the key projection,
        see `forward`), None otherwise."""
        return 2 * self.key_proj(memory) if self.kind == "bahdanau" else None

    def forward(self, query: Tensor, memory: Tensor, mask: Tensor | None,
                keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """query [B, T, Hq], memory [B, S, Hm], mask [B, S] (True = real).

        Returns context [B, T, Hm] and weights [B, T, S] (rows sum to 1 over real positions).
        """
        weights = self.weights(query, memory, mask, keys)
        return torch.bmm(weights, memory), weights

    def weights(self, query: Tensor, memory: Tensor, mask: Tensor | None, keys: Tensor | None = None) -> Tensor:
        """The attention weights alone, [B, T, S] float32 (what `forward` mixes the memory with)."""
        if self.kind == "bahdanau":
            if keys is None:
                keys = self.keys(memory)
            # Bahdanau's v . tanh(q + k), computed as 2 v . sigmoid(2q + 2k): tanh(x) = 2 sigmoid(2x) - 1, and the
            # constant -sum(v) it leaves does not change the softmax. Same function and gradients, but on CPU
            # sigmoid is several times faster than tanh, which was most of a captioning beam step ([B, T, S, A]
            # elements; docs/performance.md). [B, T, 1, A] + [B, 1, S, A] -> [B, T, S]. In place: the sum is a
            # fresh tensor its backward does not need, and not allocating a second [B, T, S, A] one is a
            # measurable part of this, the costliest op of a step.
            hidden = ((2 * self.query_proj(query)).unsqueeze(2) + keys.unsqueeze(1)).sigmoid_()
            scores = 2 * self.energy(hidden).squeeze(-1)
        elif self.kind == "luong_general":
            scores = torch.bmm(self.query_proj(query), memory.transpose(1, 2))
        else:
            scores = torch.bmm(query, memory.transpose(1, 2))
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        # float32 under autocast too: bf16 weights would not sum to 1 (off by ~1e-3) in attention maps
        return torch.softmax(scores.float(), dim=-1)
