"""RNNTextEncoder: embedding + (bi)LSTM/GRU over packed padded sequences."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqgen.config import Layers, Rate, Width
from seqgen.encoders.base import EncoderOutput


@dataclass
class RNNEncoderConfig:
    """The text encoder: source token embeddings and an LSTM/GRU over them.

    cell:          the recurrent cell
    emb:           source token embedding size
    hidden:        RNN hidden size per direction: memory and state are 2 x hidden wide when bidirectional
    layers:        stacked RNN layers
    bidirectional: read the source in both directions
    dropout:       dropout on the embeddings, and between layers when layers > 1, in training
    """

    cell: Literal["lstm", "gru"] = "gru"
    emb: Width = 256
    hidden: Width = 512
    layers: Layers = 1
    bidirectional: bool = True
    dropout: Rate = 0.3


class RNNTextEncoder(nn.Module):
    """Embedding -> dropout -> (bi)LSTM/GRU over the real tokens only (packed), padding never read.

    vocab_size: V.  state_size == memory_size == H_enc = hidden * (2 if bidirectional else 1).
    """

    def __init__(self, cfg: RNNEncoderConfig, vocab_size: int, pad_id: int = 0):
        super().__init__()
        if cfg.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cfg.cell!r}")
        self.cfg = cfg
        self.pad_id = pad_id
        self.directions = 2 if cfg.bidirectional else 1
        self.state_size = cfg.hidden * self.directions
        self.memory_size = self.state_size
        self.embed = nn.Embedding(vocab_size, cfg.emb, padding_idx=pad_id)
        self.dropout = nn.Dropout(cfg.dropout)
        rnn_cls = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(cfg.emb, cfg.hidden, cfg.layers, batch_first=True,
                           bidirectional=cfg.bidirectional,
                           dropout=cfg.dropout if cfg.layers > 1 else 0.0)

    def forward(self, tokens: Tensor, lengths: Tensor) -> EncoderOutput:
        """Encode a padded batch.

        tokens: [B, S] ids, padded after each sequence's end.  lengths: [B] real lengths, 1 <= length <= S,
        on the CPU or on tokens' device.  Returns EncoderOutput with
        memory [B, S, H_enc] (exactly 0 at padding), mask [B, S] bool (True = real token) and
        state [B, H_enc]: the last layer's final hidden state, forward then backward direction.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, S], got shape {tuple(tokens.shape)}")
        B, S = tokens.shape
        if lengths.shape != (B,):
            raise ValueError(f"lengths must be [B={B}], got shape {tuple(lengths.shape)}")
        # pack_padded_sequence wants int64 lengths on the CPU whatever the device of the data.
        cpu_lengths = lengths.detach().to("cpu", torch.long)
        if B and (int(cpu_lengths.min()) < 1 or int(cpu_lengths.max()) > S):
            raise ValueError(f"lengths must be in [1, S={S}], got min {int(cpu_lengths.min())} "
                             f"max {int(cpu_lengths.max())}")

        x = self.dropout(self.embed(tokens))
        if bool((cpu_lengths == S).all()):
            # No padding anywhere: packing would give the same result, only slower.
            memory, hidden = self.rnn(x)
        else:
            packed = pack_padded_sequence(x, cpu_lengths, batch_first=True, enforce_sorted=False)
            out, hidden = self.rnn(packed)
            # padding_value 0 and total_length S keep memory aligned with tokens and the mask.
            memory, _ = pad_packed_sequence(out, batch_first=True, total_length=S)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden        # LSTM: (h, c); c stays inside
        # h_n: [layers * directions, B, H] in original batch order (the pack's unsorting is undone by torch).
        last = h_n.view(self.cfg.layers, self.directions, B, self.cfg.hidden)[-1]
        state = last.transpose(0, 1).reshape(B, self.state_size)
        mask = torch.arange(S, device=tokens.device) < lengths.to(tokens.device).unsqueeze(1)
        return EncoderOutput(state=state, memory=memory, mask=mask)
