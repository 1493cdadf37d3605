"""Model FLOPs: what one unit of work (a target token, a decoding step, an image) costs in matmul FLOPs.

The count follows the usual MFU convention: the matmuls of the useful work only (multiply-adds x 2); padding,
elementwise ops, softmax, embedding lookups and the per-sequence bridge are left out. The RNN parts are counted
analytically; a CNN by running it once under torch's FlopCounterMode. `seqgen bench` and the bench_*.py
scripts divide these by measured time and by the measured matmul rate (seqgen.bench).
"""
from __future__ import annotations

import torch
from torch import nn

from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.rnn import RNNEncoderConfig


def rnn_flops(cell: str, inp: int, hidden: int) -> int:
    """Multiply-add FLOPs of one RNN step: the input and recurrent matmuls of all gates."""
    gates = 4 if cell == "lstm" else 3
    return 2 * gates * hidden * (inp + hidden)


def text_encoder_flops(enc: RNNEncoderConfig) -> int:
    """FLOPs per source token of the (bi)RNN text encoder, all layers and directions."""
    dirs = 2 if enc.bidirectional else 1
    return dirs * (rnn_flops(enc.cell, enc.emb, enc.hidden)
                   + (enc.layers - 1) * rnn_flops(enc.cell, enc.hidden * dirs, enc.hidden))


def memory_key_flops(dec: DecoderConfig, memory_size: int) -> int:
    """FLOPs per memory position computed once per input before decoding: Bahdanau's key projection."""
    return 2 * memory_size * dec.hidden if dec.attention == "bahdanau" else 0


def decoder_flops(dec: DecoderConfig, vocab: int, memory_size: int = 0, attended: float = 0.0) -> dict[str, float]:
    """FLOPs of one decoder step for one sequence (one target token in training, one token per hypothesis in
    search): RNN, attention over `attended` memory positions of width `memory_size`, pre-output, output layer.
    """
    out = dec.emb if dec.tie_embeddings else dec.hidden
    has_attn = dec.attention != "none"
    feed = out if dec.input_feeding and has_attn else 0
    rnn = (rnn_flops(dec.cell, dec.emb + feed, dec.hidden)
           + (dec.layers - 1) * rnn_flops(dec.cell, dec.hidden, dec.hidden))
    mem = memory_size
    attn = 0.0
    if dec.attention == "bahdanau":
        a = dec.hidden
        attn = 2 * dec.hidden * a + 2 * a * attended + 2 * attended * mem   # query projection, energy, context
    elif dec.attention == "luong_general":
        attn = 2 * dec.hidden * mem + 2 * attended * mem * 2                # query projection, scores, context
    elif dec.attention == "luong_dot":
        attn = 2 * attended * mem * 2
    pre = 2 * (dec.hidden + (mem if has_attn else 0)) * out if (has_attn or dec.hidden != out) else 0
    logits = 2 * out * vocab
    return {"decoder_rnn": rnn, "attention": attn, "pre_output": pre, "output_layer": logits,
            "total": rnn + attn + pre + logits}


def forward_flops(enc: RNNEncoderConfig, dec: DecoderConfig, tgt_vocab: int, src_per_tgt: float,
                  attended: float) -> dict[str, float]:
    """Forward FLOPs per target token of a translation model (training; x3 with the backward pass).

    src_per_tgt: source tokens per target token in the data; attended: mean number of source positions each
    target token attends over (target-weighted mean source length).
    """
    mem = enc.hidden * (2 if enc.bidirectional else 1)
    step = decoder_flops(dec, tgt_vocab, mem, attended)
    encoder = src_per_tgt * (text_encoder_flops(enc) + memory_key_flops(dec, mem))
    return {"encoder": encoder, **{k: v for k, v in step.items() if k != "total"}, "total": encoder + step["total"]}


def cnn_flops(encoder: nn.Module, image_size: int) -> int:
    """FLOPs of one image through an image encoder: its convolutions' and linear layers' multiply-adds x 2,
    counted by torch's FlopCounterMode on one forward pass of a [1, 3, S, S] image."""
    from torch.utils.flop_counter import FlopCounterMode
    param = next(encoder.parameters())
    image = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=param.device)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            encoder(image)
    finally:
        encoder.train(was_training)
    return int(counter.get_total_flops())


__all__ = ["cnn_flops", "decoder_flops", "forward_flops", "memory_key_flops", "rnn_flops", "text_encoder_flops"]
