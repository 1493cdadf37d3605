"""RNNDecoder: the one decoder every task shares (language model, translation, captioning).

A whole target sequence goes through the RNN in one call (teacher forcing); a single step goes through
`FastStep` (seqgen/decoders/fast_step.py), which picks the fastest kernel for decoding and keeps its caches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqgen.config import MAX_WIDTH, Bounds, Layers, Rate, Width
from seqgen.decoders.attention import Attention
from seqgen.decoders.fast_step import FastStep
from seqgen.decoders.state import DecoderState
from seqgen.encoders.base import EncoderOutput
from seqgen.precision import active_autocast_dtype


@dataclass
class DecoderConfig:
    """The shared decoder: an RNN over the target tokens, attention over the encoder memory, an output layer.

    cell:           the recurrent cell
    emb:            target token embedding size
    hidden:         RNN hidden size
    layers:         stacked RNN layers
    attention:      attention over the encoder memory: additive (bahdanau), multiplicative (luong_dot,
                    luong_general) or none
    attention_size: bahdanau: the attention's hidden size A; 0 = hidden. Decoding costs grow with memory
                    positions x A per token: for image grids the largest part of a beam step
                    (docs/performance.md measures smaller A)
    input_feeding:  feed the previous attentional vector into the next RNN input (Luong); this forces a loop
                    over time steps in training, so it is slower per step (docs/performance.md)
    tie_embeddings: the output layer shares the embedding matrix (the pre-output is projected to emb)
    dropout:        dropout on the embeddings, the pre-output and between RNN layers, in training
    memory_dropout: dropout on the encoder memory the attention reads, in training: image features from a
                    frozen CNN are otherwise memorised within a few epochs; 0 leaves the memory untouched
    bridge:         initial hidden state = tanh(W x encoder state); false = zeros
    """

    cell: Literal["lstm", "gru"] = "lstm"
    emb: Width = 256
    hidden: Width = 512
    layers: Layers = 1
    attention: Literal["none", "bahdanau", "luong_dot", "luong_general"] = "none"
    attention_size: Annotated[int, Bounds(0, MAX_WIDTH)] = 0
    input_feeding: bool = False
    tie_embeddings: bool = True
    dropout: Rate = 0.3
    memory_dropout: Rate = 0.0
    bridge: bool = True


class RNNDecoder(nn.Module):
    """Embedding -> LSTM/GRU -> optional attention over encoder memory -> (tied) output layer.

    vocab_size: V.  enc_state_size: H_enc of `EncoderOutput.state` (None when there is no encoder or no bridge).
    memory_size: H_mem of `EncoderOutput.memory` (needed when attention is on).
    """

    def __init__(self, cfg: DecoderConfig, vocab_size: int, *, pad_id: int = 0,
                 enc_state_size: int | None = None, memory_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.has_attention = cfg.attention != "none"
        if self.has_attention and not memory_size:
            raise ValueError(f"attention={cfg.attention!r} needs an encoder with memory")
        self.out_size = cfg.emb if cfg.tie_embeddings else cfg.hidden
        feed_size = self.out_size if cfg.input_feeding and self.has_attention else 0

        self.embed = nn.Embedding(vocab_size, cfg.emb, padding_idx=pad_id)
        rnn_cls = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(cfg.emb + feed_size, cfg.hidden, cfg.layers, batch_first=True,
                           dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.bridge = (nn.Linear(enc_state_size, cfg.layers * cfg.hidden)
                       if cfg.bridge and enc_state_size else None)
        if cfg.attention_size < 0:
            raise ValueError(f"attention_size must be >= 0 (0 = hidden), got {cfg.attention_size}")
        self.attention = (Attention(cfg.attention, cfg.hidden, memory_size, cfg.attention_size or None)
                          if self.has_attention else None)
        pre_in = cfg.hidden + (memory_size if self.has_attention else 0)
        # Attention needs the combine layer (Luong's W_c); without it, project only when sizes differ.
        self.pre_output = (nn.Linear(pre_in, self.out_size)
                           if self.has_attention or pre_in != self.out_size else None)
        self.dropout = nn.Dropout(cfg.dropout)
        self.memory_dropout = nn.Dropout(cfg.memory_dropout) if cfg.memory_dropout > 0 else None
        self.output = nn.Linear(self.out_size, vocab_size)
        # single steps (search; training with input feeding) and their cached weight copies; no parameters
        self.fast_step = FastStep(cfg.cell, cfg.emb)
        if cfg.tie_embeddings:
            # N(0, 1) embeddings would make the tied output layer's first logits huge (loss far above ln V)
            nn.init.normal_(self.embed.weight, std=cfg.emb ** -0.5)
            with torch.no_grad():
                self.embed.weight[pad_id].zero_()
            self.output.weight = self.embed.weight

    # -- state ---------------------------------------------------------------------------------------
    def prepare(self, enc: EncoderOutput | None, *, decoding: bool = False) -> EncoderOutput | None:
        """Return `enc` with what every step would otherwise recompute from the memory: the attention keys and,
        with `decoding` (before a search steps through it), the memory through the combine layer
        (`EncoderOutput.values`).

        Under autocast the memory is cast to its dtype here, once: otherwise every step's matmuls would cast
        the whole [B, S, H_mem] memory again (for captioning beams, a quarter of the search's time).
        """
        if enc is None or self.attention is None:
            return enc
        need_keys = self.attention.kind == "bahdanau" and enc.keys is None
        # Only for a search: teacher forcing (training, validation loss) mixes the H_mem-wide memory once per target
        # position, cheaper than projecting every memory position when T < S (image grids).
        need_values = decoding and enc.values is None
        memory = enc.memory
        dtype = active_autocast_dtype(memory.device.type)
        need_cast = dtype is not None and memory.is_floating_point() and memory.dtype != dtype
        if not (need_keys or need_values or need_cast):
            return enc
        if need_cast:
            memory = memory.to(dtype)
        keys = self.attention.keys(memory) if need_keys else enc.keys
        values = (F.linear(memory, self.pre_output.weight[:, self.cfg.hidden:]) if need_values
                  else enc.values)
        return dataclasses.replace(enc, memory=memory, keys=keys, values=values)

    def init_state(self, enc: EncoderOutput | None, batch_size: int) -> DecoderState:
        """Initial state for `batch_size` sequences: bridged from `enc.state` [B, H_enc] (each row `enc.beams`
        times), else zeros."""
        p = self.embed.weight
        L, H = self.cfg.layers, self.cfg.hidden
        if self.bridge is not None and enc is not None and enc.state is not None:
            h = torch.tanh(self.bridge(enc.state)).view(-1, L, H)
            if enc.beams > 1:
                h = h.repeat_interleave(enc.beams, dim=0)
        else:
            h = p.new_zeros(batch_size, L, H)
        c = h if self.cfg.cell == "lstm" else None
        feed = (p.new_zeros(batch_size, self.out_size)
                if self.cfg.input_feeding and self.has_attention else None)
        return DecoderState(h=h, c=c, feed=feed)

    # -- running -------------------------------------------------------------------------------------
    def _rnn(self, x: Tensor, state: DecoderState,
             tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [B, T, I] -> outputs [B, T, H], h [B, L, H], c [B, L, H] | None. tokens: [B, T] ids that x embeds."""
        if x.size(1) == 1 and not (self.training and self.rnn.dropout > 0):
            return self.fast_step(self.rnn, self.embed.weight, x, state.h, state.c, tokens, self.training)
        h0 = state.h.transpose(0, 1).contiguous()
        if self.cfg.cell == "lstm":
            out, (h, c) = self.rnn(x, (h0, state.c.transpose(0, 1).contiguous()))
            return out, h.transpose(0, 1), c.transpose(0, 1)
        out, h = self.rnn(x, h0)
        return out, h.transpose(0, 1), None

    def _pre_output(self, out: Tensor, enc: EncoderOutput | None) -> tuple[Tensor, Tensor | None]:
        """RNN outputs [B, T, H] -> attentional vectors [B, T, O] and attention weights [B, T, S] | None.

        The attentional vector is tanh(W_c [out; ctx]) with ctx = weights @ memory. With `enc.values`
        (= memory @ W_c[:, H:]^T) the memory half is weights @ values instead: the same sum, O-wide not H_mem-wide.
        """
        if self.attention is None:
            return (out if self.pre_output is None else self.pre_output(out)), None
        g = enc.beams
        # The g rows of an input (its beams) become g * T queries over its one memory row: [B*g, T, H] ->
        # [B, g*T, H]. Each step then reads the memory once per input instead of once per beam.
        n, t = out.shape[:2]
        query = out if g == 1 else out.reshape(n // g, g * t, -1)
        if enc.values is None:
            ctx, weights = self.attention(query, enc.memory, enc.mask, enc.keys)
            ctx, weights = ctx.reshape(n, t, -1), weights.reshape(n, t, -1)
            return torch.tanh(self.pre_output(torch.cat([out, ctx], dim=-1))), weights
        weights = self.attention.weights(query, enc.memory, enc.mask, enc.keys)
        mixed = torch.bmm(weights.to(enc.values.dtype), enc.values).reshape(n, t, -1)
        H = self.cfg.hidden
        pre = torch.addmm(self.pre_output.bias, out.reshape(n * t, H), self.pre_output.weight[:, :H].t())
        return torch.tanh(pre.view(n, t, -1) + mixed), weights.reshape(n, t, -1)

    def features(self, tokens: Tensor, state: DecoderState,
                 enc: EncoderOutput | None = None) -> tuple[Tensor, DecoderState]:
        """`forward` without the output layer: its input [B, T, O] (after dropout, in training) and the state.

        Training losses take this and `self.output`'s weights to seqgen.decoders.output_loss, which never
        holds the whole [B, T, V] logits. It is a call of the module, so forward hooks see it.
        """
        return self(tokens, state, enc, output_layer=False)

    def forward(self, tokens: Tensor, state: DecoderState, enc: EncoderOutput | None = None, *,
                output_layer: bool = True) -> tuple[Tensor, DecoderState]:
        """Teacher forcing over a whole sequence.

        tokens: [B, T] input ids (bos first).  Returns logits [B, T, V] (without `output_layer`: the output
        layer's input [B, T, O], see `features`) and the state after the last token (its `attn` holds the last
        step's attention weights [B, S]).
        """
        x = self.embed(tokens)
        if self.training:
            x = self.dropout(x)
        if self.training and self.memory_dropout is not None and enc is not None and enc.memory is not None:
            enc = dataclasses.replace(enc, memory=self.memory_dropout(enc.memory), keys=None, values=None)
        enc = self.prepare(enc)   # a no-op when the caller (search) prepared it once for all steps
        if state.feed is None:
            # The whole target sequence goes through the RNN in one call: no Python loop per time step.
            out, h, c = self._rnn(x, state, tokens)
            o, weights = self._pre_output(out, enc)
            feed, last_attn = None, (weights[:, -1] if weights is not None else None)
        else:
            h, c, feed = state.h, state.c, state.feed
            outs, last_attn = [], None
            for t in range(x.size(1)):
                step_in = torch.cat([x[:, t:t + 1], feed.unsqueeze(1)], dim=-1)
                out, h, c = self._rnn(step_in, DecoderState(h=h, c=c), tokens[:, t:t + 1])
                o_t, w = self._pre_output(out, enc)
                feed, last_attn = o_t[:, 0], w[:, 0]
                outs.append(o_t)
            o = torch.cat(outs, dim=1)
        o = self.dropout(o) if self.training else o
        return (self.output(o) if output_layer else o), DecoderState(h=h, c=c, feed=feed, attn=last_attn)

    def step(self, tokens: Tensor, state: DecoderState,
             enc: EncoderOutput | None = None) -> tuple[Tensor, DecoderState]:
        """Advance every sequence in the batch by one token.

        tokens: [B] previous token ids.  Returns log-probabilities [B, V] and the new state.
        """
        logits, state = self.forward(tokens.unsqueeze(1), state, enc)
        return F.log_softmax(logits[:, 0].float(), dim=-1), state
