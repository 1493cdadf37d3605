"""One time step through the decoder's RNN layers, by the fastest kernel for the case, and the weight copies
those kernels cache (`FastStep`).

`RNNDecoder` runs a whole target sequence through `nn.LSTM`/`nn.GRU` in one call; a single step (search, and
training with input feeding) comes here instead, because at T = 1 the multi-layer sequence kernel costs
several times the arithmetic:

- training: the fused cell kernels (`torch.lstm_cell` / `torch.gru_cell`), one per layer;
- decoding at most SMALL_BATCH rows on a CPU: the matrix-vector products are bound by one core's memory
  bandwidth; as batched matmuls over row blocks of the weights they are spread over the threads
  (`small_batch_matmul`, float32 even under autocast);
- larger decoding batches: the first layer's input gates of every vocabulary entry are looked up instead of
  multiplying the embeddings, with the rest of that layer's weights pre-transposed in the autocast dtype
  (`gate_table`).

The cached copies are valid for the weights' storage and in-place version counter (`_weights_key`): an
optimiser step or a loaded state dict makes the next step rebuild them. Every path gives the autograd
kernels' results to float rounding (tests/test_decoder.py compares them).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from seqgen.precision import active_autocast_dtype

# At most this many rows per step, CPU inference steps are bound by memory bandwidth, not arithmetic: float32
# weights split across threads beat any lower-precision kernel there (model.py decodes them in float32 too).
SMALL_BATCH = 4

# The first layer's per-token input gates are cached only up to this size ([V, 4H] for a captioning
# vocabulary of a few thousand words and H = 512 is about ten megabytes in bfloat16); larger vocabularies
# use the fused cell.
GATE_TABLE_MAX_BYTES = 64 << 20


def _weights_key(tensors: tuple[Tensor, ...]) -> list[tuple[int, int]]:
    """What a cached copy of these weights is valid for: their storage and in-place version (an optimiser step
    or a loaded state dict changes one of them)."""
    return [(t.data_ptr(), t._version) for t in tensors]


def _lstm_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM cell from its pre-activations: gates [B, 4H] (order i, f, g, o), c [B, H] -> (h, c) [B, H]."""
    H = c.size(1)
    act = torch.sigmoid(gates)   # one sigmoid over all four gates is cheaper than three calls
    c = torch.addcmul(act[:, H:2 * H] * c, act[:, :H], torch.tanh(gates[:, 2 * H:3 * H]))
    return act[:, 3 * H:] * torch.tanh(c), c


def _gru_update(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """GRU cell from its input and hidden pre-activations gi, gh [B, 3H] (order r, z, n) and h [B, H]."""
    H = h.size(1)
    rz = torch.sigmoid(gi[:, :2 * H] + gh[:, :2 * H])
    n = torch.tanh(torch.addcmul(gi[:, 2 * H:], rz[:, :H], gh[:, 2 * H:]))
    z = rz[:, H:]
    return n + z * (h - n)


class FastStep:
    """One step through an RNNDecoder's layers (see the module docstring), owning the cached weight copies.

    cell: "lstm" | "gru"; emb: E, the embedding width (the first layer's input is [embedding; input feed]).
    It holds no parameters: the decoder passes its `rnn` and embedding matrix on every call.
    """

    def __init__(self, cell: str, emb: int):
        self.lstm, self.emb = cell == "lstm", emb
        self._gates: tuple[list, tuple[Tensor | None, ...]] | None = None   # (weights key, gate_table's result)
        self._blocked: dict[tuple[int, int], tuple] = {}   # (weight storage, parts) -> (key, blocked w, bias)

    @property
    def has_gate_table(self) -> bool:
        """Whether a per-token gate table is cached (it is built by the first large decoding batch)."""
        return self._gates is not None

    def __call__(self, rnn: nn.LSTM | nn.GRU, embed: Tensor, x: Tensor, h: Tensor, c: Tensor | None,
                 tokens: Tensor | None, training: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [B, 1, I] (I = E + the input feed), h and c [B, L, H] (c None for a GRU), tokens [B, 1] the ids x
        embeds (or None) -> outputs [B, 1, H], h [B, L, H], c [B, L, H] | None."""
        inp, hs, cs = x[:, 0], [], []
        decoding = not torch.is_grad_enabled() and not training
        small = decoding and inp.size(0) <= SMALL_BATCH and inp.device.type == "cpu"
        amp = active_autocast_dtype(inp.device.type)
        use_table = decoding and not small and tokens is not None
        table = self.gate_table(rnn, embed, amp or inp.dtype) if use_table else None
        flat = rnn._flat_weights  # [w_ih, w_hh, b_ih, b_hh] per layer; cheaper than 4 getattr per layer
        for k in range(rnn.num_layers):
            w_ih, w_hh, b_ih, b_hh = flat[4 * k:4 * k + 4]
            h_k = h[:, k]
            if k == 0 and table is not None:
                gates_x, w_rest, w_hh_t = table
                rest = inp[:, self.emb:]                           # the input-feeding part, or nothing
                gx = gates_x.index_select(0, tokens[:, 0])
                if self.lstm:
                    gates = torch.addmm(gx, torch.cat([rest, h_k], dim=1).to(gx.dtype), w_rest)
                else:
                    gi = gx if w_rest is None else torch.addmm(gx, rest.to(gx.dtype), w_rest)
                    gh = torch.addmm(b_hh.to(gx.dtype), h_k.to(gx.dtype), w_hh_t)
            elif small:
                if self.lstm:
                    gates = self.small_batch_matmul(torch.cat([inp, h_k], dim=1), (w_ih, w_hh), (b_ih, b_hh))
                else:
                    gi = self.small_batch_matmul(inp, (w_ih,), (b_ih,))
                    gh = self.small_batch_matmul(h_k, (w_hh,), (b_hh,))
            elif self.lstm:
                inp, c_k = torch.lstm_cell(inp, (h_k, c[:, k]), w_ih, w_hh, b_ih, b_hh)
                hs.append(inp)
                cs.append(c_k)
                continue
            else:
                inp = torch.gru_cell(inp, h_k, w_ih, w_hh, b_ih, b_hh)
                hs.append(inp)
                continue
            if self.lstm:
                inp, c_k = _lstm_update(gates, c[:, k])
                cs.append(c_k)
            else:
                inp = _gru_update(gi, gh, h_k)
            hs.append(inp)
        return inp.unsqueeze(1), torch.stack(hs, 1), (torch.stack(cs, 1) if cs else None)

    def gate_table(self, rnn: nn.LSTM | nn.GRU, embed: Tensor,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """For decoding: the first layer's input gates of every vocabulary entry, and that layer's other weights.

        Returns (gates_x [V, G] = embed @ W_ih[:, :E]^T + biases, w_rest, w_hh_t) in `dtype`, with w_rest the
        transposed weights the rest of the step multiplies ([feed; h] for an LSTM, the feed for a GRU, None
        without input feeding) and w_hh_t W_hh^T for a GRU. A step then looks its tokens' rows up instead of
        multiplying the embeddings, and runs one matmul (LSTM) on weights already in `dtype`, where autocast
        would cast W_ih and W_hh again each step. Cached until a weight changes; None when the table would
        exceed GATE_TABLE_MAX_BYTES (a large vocabulary): the fused cell then runs as in training.
        """
        w_ih, w_hh, b_ih, b_hh = rnn._flat_weights[:4]
        if embed.size(0) * w_ih.size(0) * torch.finfo(dtype).bits // 8 > GATE_TABLE_MAX_BYTES:
            return None
        key = [dtype] + _weights_key((embed, w_ih, w_hh, b_ih, b_hh))
        hit = self._gates
        if hit is None or hit[0] != key:
            E = self.emb
            with torch.autocast(w_ih.device.type, enabled=False):
                w_ih32 = w_ih.detach().float()
                bias = b_ih.detach().float() + (b_hh.detach().float() if self.lstm else 0)
                gates_x = torch.addmm(bias, embed.detach().float(), w_ih32[:, :E].t())
                rest = w_ih32[:, E:]
                if self.lstm:
                    w_rest, w_hh_t = torch.cat([rest, w_hh.detach().float()], dim=1).t(), None
                else:
                    w_rest, w_hh_t = (rest.t() if rest.size(1) else None), w_hh.detach().float().t()
            hit = (key, tuple(None if t is None else t.to(dtype).contiguous() for t in (gates_x, w_rest, w_hh_t)))
            self._gates = hit
        return hit[1]

    def small_batch_matmul(self, x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor, ...]) -> Tensor:
        """x [B, I] @ cat(weights, dim=1)^T + sum(biases) -> [B, G] for tiny B.

        A matrix-vector product runs on one core and is bound by that core's memory bandwidth; as a batched
        matmul over row blocks of the weight it is spread over the threads (docs/performance.md measures the
        gain). The blocked weight copy is cached and rebuilt whenever a weight changes (version counter).
        """
        parts = max(1, min(torch.get_num_threads(), 8))
        rows = weights[0].size(0)
        key = (weights[0].data_ptr(), parts)
        versions = _weights_key(weights + biases)
        hit = self._blocked.get(key)
        if hit is None or hit[0] != versions:
            w = torch.cat([w.detach() for w in weights], dim=1)                  # [G, I]
            bias = sum(b.detach() for b in biases)
            if parts > 1 and rows % parts == 0:
                w = w.reshape(parts, rows // parts, -1).transpose(1, 2).contiguous()  # [parts, I, G/parts]
                bias = bias.reshape(parts, 1, rows // parts)
            else:
                w, bias = w.t().contiguous(), bias
            self._blocked[key] = hit = (versions, w, bias)
        _, w, bias = hit
        # float32 even under autocast: at this size the product is bound by memory, not arithmetic, and a
        # bf16 copy of the blocked weight (not a parameter, so autocast would not cache it) every call costs more
        x = x.float()
        with torch.autocast(x.device.type, enabled=False):
            if w.dim() == 2:
                return torch.addmm(bias, x, w)
            out = torch.baddbmm(bias, x.unsqueeze(0).expand(w.size(0), -1, -1), w)   # [parts, B, G/parts]
        return out.transpose(0, 1).reshape(x.size(0), -1)


__all__ = ["FastStep", "GATE_TABLE_MAX_BYTES", "SMALL_BATCH"]
