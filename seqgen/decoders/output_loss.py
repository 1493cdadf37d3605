"""Cross-entropy of an output layer, fused: the [N, V] logits exist one chunk of rows at a time.

`F.cross_entropy(F.linear(h, W, b).float(), gold)` keeps, for the backward pass, the logits in the autocast dtype,
their float32 copy and the float32 log-probabilities: about 10 bytes per target token per vocabulary entry, so the
longest batches of an 8k-vocabulary translation model held hundreds of MiB at once, and a process whose allocator
keeps its freed memory (seqgen.allocator) stayed that large for the rest of the run (docs/performance.md,
"Meeting the memory target"). Here the gradients are computed in the forward pass, chunk by chunk, as the loss
is the last operation before `backward()` (the technique of Liger-Kernel's fused linear cross-entropy): what is
kept is the [N, O] gradient of the input and the [V, O] gradient of the weight, and a chunk's logits are freed
before the next chunk's are made. Without gradients (validation) the same loop only sums the loss.

The numbers are those of the unfused expression (tests/test_output_loss.py compares loss and gradients, with
and without label smoothing, in float32 and under bf16 autocast): each chunk's matmuls run in the autocast dtype
like `F.linear` under autocast, the log-softmax in float32 like `.float()` then `F.cross_entropy`.
"""
from __future__ import annotations

from typing import Iterator, Literal

import torch
from torch import Tensor

from seqgen.precision import active_autocast_dtype

# Logit elements per chunk (float32: 16 MiB). Large enough that each chunk's matmul runs at full speed.
CHUNK_ELEMENTS = 1 << 22
# Chunks are padded to a multiple of this many rows: the matmuls then see a few shapes, not one per batch.
# oneDNN (bf16 and fp16 on CPU) caches a primitive, with memory of the output's size, per shape it meets.
ROW_MULTIPLE = 64


def _chunk_rows(vocab: int) -> tuple[int, int]:
    """(rows per chunk, the multiple a chunk's rows are padded to) for a vocabulary of `vocab`."""
    rows = max(1, CHUNK_ELEMENTS // max(1, vocab))
    multiple = min(ROW_MULTIPLE, rows)
    return rows // multiple * multiple, multiple


def _chunks(n: int, vocab: int) -> Iterator[tuple[int, int, int]]:
    """(start, rows, padded rows) of each chunk of `n` rows for a vocabulary of `vocab`."""
    step, multiple = _chunk_rows(vocab)
    for start in range(0, n, step):
        rows = min(step, n - start)
        yield start, rows, -(-rows // multiple) * multiple


def _padded(x: Tensor, rows: int) -> Tensor:
    """x [n, ...] with zero rows appended up to `rows`."""
    return x if x.size(0) == rows else torch.cat([x, x.new_zeros(rows - x.size(0), *x.shape[1:])])


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """[n, O] x [V, O] (+ [V]) -> float32 logits [n, V]; h, w and b in the matmul's dtype."""
    return (torch.addmm(b, h, w.t()) if b is not None else h @ w.t()).float()


def _row_losses(logits: Tensor, gold: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(loss per row [n], logsumexp per row [n]) of float32 logits [n, V]."""
    lse = torch.logsumexp(logits, dim=1)
    loss = lse - logits.gather(1, gold[:, None]).squeeze(1)
    if label_smoothing > 0:
        # F.cross_entropy's smoothing: (1 - e) * nll + e * mean over the vocabulary of -log p
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - logits.mean(dim=1))
    return loss, lse


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of the rows' losses; the gradients are computed here and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, gold: Tensor,  # type: ignore[override]
                label_smoothing: float, dtype: torch.dtype) -> Tensor:
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        vocab = w.size(0)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s, n, rows in _chunks(hidden.size(0), vocab):
            h, g = _padded(hidden[s:s + n].to(dtype), rows), _padded(gold[s:s + n], rows)
            logits = _chunk_logits(h, w, b)
            loss, lse = _row_losses(logits, g, label_smoothing)
            total += loss[:n].sum()
            # d(sum of losses)/d logits = softmax - ((1 - e) one-hot(gold) + e / V), made in the logits' memory
            grad = logits.sub_(lse[:, None]).exp_()
            if label_smoothing > 0:
                grad.sub_(label_smoothing / vocab)
            grad[torch.arange(rows, device=grad.device), g] -= 1 - label_smoothing
            grad[n:] = 0                   # the padding rows
            if bias is not None:
                grad_b += grad.sum(dim=0)
            grad = grad.to(dtype)
            grad_h[s:s + n] = (grad @ w)[:n]
            grad_w += (grad.t() @ h).float()
            del logits, grad
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else grad_w.new_empty(0))
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()
        return ((grad_h * scale.to(grad_h.dtype)), (grad_w * scale).to(ctx.weight_dtype),
                (grad_b * scale) if ctx.has_bias else None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, gold: Tensor, *,
                         ignore_index: int | None = None, label_smoothing: float = 0.0,
                         reduction: Literal["mean", "sum"] = "mean") -> tuple[Tensor, int]:
    """Cross-entropy of `F.linear(hidden, weight, bias)` against `gold`, without the whole logits tensor.

    hidden: [..., O] the output layer's input; weight: [V, O]; bias: [V] | None; gold: [...] target ids.
    Rows whose gold is `ignore_index` count for nothing. Returns (the mean, or sum, over the counted rows; their
    number). The mean of no rows is 0 (F.cross_entropy gives nan). Call `backward()` on the result (or on a
    multiple of it) once: its gradients were computed in this call.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    hidden, gold = hidden.reshape(-1, hidden.size(-1)), gold.reshape(-1)
    if ignore_index is not None:
        keep = gold != ignore_index
        hidden, gold = hidden[keep], gold[keep]
    n = gold.numel()
    dtype = active_autocast_dtype(hidden.device.type) or hidden.dtype
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if needs_grad:
        with torch.autocast(hidden.device.type, enabled=False):
            total = _FusedLinearCrossEntropy.apply(hidden, weight, bias, gold, label_smoothing, dtype)
    else:
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s, m, rows in _chunks(n, w.size(0)):
            logits = _chunk_logits(_padded(hidden[s:s + m].to(dtype), rows), w, b)
            total += _row_losses(logits, _padded(gold[s:s + m], rows), label_smoothing)[0][:m].sum()
    if reduction == "sum":
        return total, n
    return total / max(n, 1), n


__all__ = ["CHUNK_ELEMENTS", "ROW_MULTIPLE", "linear_cross_entropy"]
