"""The fused output layer + cross-entropy (seqgen.decoders.output_loss) against the unfused expression."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqgen.data.batch import Batch
from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.decoders import output_loss
from seqgen.decoders.output_loss import linear_cross_entropy
from seqgen.tokenizers import TextCodec

PAD = 0


def _inputs(n=37, o=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, o, generator=g, requires_grad=True)
    weight = (torch.randn(v, o, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(v, generator=g) * 0.1).requires_grad_()
    gold = torch.randint(1, v, (n,), generator=g)
    gold[::5] = PAD
    return hidden, weight, bias, gold


def _reference(hidden, weight, bias, gold, smoothing, reduction="mean"):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, gold, ignore_index=PAD, label_smoothing=smoothing, reduction=reduction)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


@pytest.fixture(params=[(output_loss.CHUNK_ELEMENTS, 64), (7 * 50, 64), (10 * 50, 4)],
                ids=["one-chunk-padded", "chunks-of-7-rows", "chunks-of-8-rows-padded-to-4s"])
def chunking(request, monkeypatch):
    """(logit elements per chunk, row multiple): with vocabulary 50 and 37 rows, the last chunk is padded."""
    monkeypatch.setattr(output_loss, "CHUNK_ELEMENTS", request.param[0])
    monkeypatch.setattr(output_loss, "ROW_MULTIPLE", request.param[1])
    return request.param


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_gradients_equal_the_unfused_expression_in_float32(chunking, smoothing):
    hidden, weight, bias, gold = _inputs()
    ref = _reference(hidden, weight, bias, gold, smoothing)
    ref_grads = _grads(ref * 3.0, hidden, weight, bias)   # a multiple of the loss: backward scales
    loss, n = linear_cross_entropy(hidden, weight, bias, gold, ignore_index=PAD, label_smoothing=smoothing)
    grads = _grads(loss * 3.0, hidden, weight, bias)
    assert n == int((gold != PAD).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert grads[0][gold == PAD].abs().sum() == 0   # ignored rows get no gradient


def test_sum_reduction_and_the_no_gradient_path(chunking):
    hidden, weight, bias, gold = _inputs()
    ref = _reference(hidden, weight, bias, gold, 0.0, reduction="sum")
    with torch.no_grad():
        total, n = linear_cross_entropy(hidden, weight, bias, gold, ignore_index=PAD, reduction="sum")
    assert not total.requires_grad
    torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-5)
    assert n == int((gold != PAD).sum())


def test_without_bias_and_with_batch_and_time_dimensions():
    hidden, weight, _, gold = _inputs(n=24)
    h3, g2 = hidden.view(4, 6, -1), gold.view(4, 6)
    ref = F.cross_entropy(F.linear(h3, weight).reshape(-1, weight.size(0)), g2.reshape(-1), ignore_index=PAD)
    loss, _ = linear_cross_entropy(h3, weight, None, g2, ignore_index=PAD)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(_grads(loss, hidden, weight), _grads(ref, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_under_bf16_autocast_it_matches_the_autocast_expression(monkeypatch):
    monkeypatch.setattr(output_loss, "CHUNK_ELEMENTS", 9 * 50)
    hidden, weight, bias, gold = _inputs(n=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.tanh(hidden).to(torch.bfloat16)   # a bf16 activation, as the decoder's pre-output is
        ref = F.cross_entropy(F.linear(h, weight, bias).float(), gold, ignore_index=PAD, label_smoothing=0.1)
        loss, _ = linear_cross_entropy(h, weight, bias, gold, ignore_index=PAD, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    got, want = _grads(loss, hidden, weight, bias), _grads(ref, hidden, weight, bias)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0.05, atol=2e-3)


def test_no_counted_rows_give_zero_and_bad_smoothing_is_refused():
    hidden, weight, bias, _ = _inputs(n=4)
    loss, n = linear_cross_entropy(hidden, weight, bias, torch.zeros(4, dtype=torch.long), ignore_index=PAD)
    assert n == 0 and loss.item() == 0.0
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, bias, torch.ones(4, dtype=torch.long), label_smoothing=1.0)


@pytest.mark.parametrize("decoder", [
    dict(cell="lstm", attention="luong_general", tie_embeddings=True),
    dict(cell="gru", attention="bahdanau", input_feeding=True, tie_embeddings=False),
], ids=["lstm-luong-tied", "gru-bahdanau-feeding-untied"])
def test_model_loss_equals_the_logits_expression_with_every_parameters_gradient(decoder, monkeypatch):
    """Seq2Seq.loss (fused) against F.cross_entropy over `model(batch)`, the expression it replaced."""
    monkeypatch.setattr(output_loss, "CHUNK_ELEMENTS", 5 * 30)   # several chunks
    torch.manual_seed(0)
    codec = TextCodec.build("word", [" ".join(f"w{i}" for i in range(26))])
    enc = RNNEncoderConfig(cell="gru", emb=8, hidden=6, layers=1, bidirectional=True)
    dec = DecoderConfig(emb=8, hidden=12, dropout=0.0, **decoder)
    model = Seq2Seq(ModelConfig(task="translation", text_encoder=enc, decoder=dec), tgt=codec, src=codec)
    model.eval()   # no dropout anywhere: both passes see the same network (gradients flow in eval mode too)
    pad = model.tgt.vocab.pad
    target = torch.randint(4, len(codec.vocab), (3, 7))
    target[1, 5:] = pad
    target[2, 3:] = pad
    batch = Batch(target=target, source=torch.randint(4, len(codec.vocab), (3, 6)),
                  source_lengths=torch.tensor([6, 6, 6]))
    logits = model(batch)
    ref = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target[:, 1:].reshape(-1),
                          ignore_index=pad, label_smoothing=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    loss, n = model.loss(batch, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert n == int((target[:, 1:] != pad).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
