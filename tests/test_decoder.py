"""RNNDecoder: shapes, masks, and forward over a sequence == repeated step."""
import pytest
import torch

from seqgen.decoders import DecoderConfig, RNNDecoder
from seqgen.encoders import EncoderOutput

V, B, T, S, HE = 23, 3, 7, 5, 12


def make_enc(batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, S, HE, generator=g)
    mask = torch.ones(batch, S, dtype=torch.bool)
    mask[0, 3:] = False
    return EncoderOutput(state=torch.randn(batch, HE, generator=g), memory=memory, mask=mask)


CONFIGS = [
    dict(cell="lstm", attention="none"),
    dict(cell="gru", attention="none", layers=2),
    dict(cell="lstm", attention="bahdanau"),
    dict(cell="gru", attention="luong_general", layers=2),
    dict(cell="lstm", attention="luong_general", input_feeding=True),
    dict(cell="gru", attention="bahdanau", input_feeding=True, tie_embeddings=False),
    dict(cell="lstm", attention="luong_dot", hidden=HE, emb=8),
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("mode", ["grad", "no_grad", "no_grad_2_threads", "no_grad_batch_7"])
def test_forward_equals_repeated_step(kw, mode):
    """Teacher forcing == stepping, including both inference paths: small batches (B <= 4) with weights split
    across threads, and larger ones that look up each token's first-layer input gates (B = 7)."""
    B = 7 if mode == "no_grad_batch_7" else 3
    torch.manual_seed(0)
    cfg = DecoderConfig(**{"emb": 16, "hidden": 20, "dropout": 0.1, **kw})
    dec = RNNDecoder(cfg, V, enc_state_size=HE, memory_size=HE).eval()
    enc = make_enc(B) if cfg.attention != "none" else EncoderOutput(state=torch.randn(B, HE))
    tokens = torch.randint(0, V, (B, T))
    logits, final = dec(tokens, dec.init_state(enc, B), enc)
    assert logits.shape == (B, T, V)
    state = dec.init_state(enc, B)
    threads = torch.get_num_threads()
    if mode == "no_grad_2_threads":
        torch.set_num_threads(2)
    try:
        with torch.set_grad_enabled(mode == "grad"):
            # a search mixes the memory already projected by the combine layer; training does not
            enc_p = dec.prepare(enc, decoding=mode != "grad")
            assert (enc_p.values is not None) == (cfg.attention != "none" and mode != "grad")
            assert dec.prepare(enc).values is None
            steps = [None] * T
            for t in range(T):
                steps[t], state = dec.step(tokens[:, t], state, enc_p)
    finally:
        torch.set_num_threads(threads)
    assert dec.fast_step.has_gate_table == (mode == "no_grad_batch_7")
    state_h = state.h
    state = dec.init_state(enc, B)
    for t in range(T):
        lp = steps[t]
        assert lp.shape == (B, V)
        torch.testing.assert_close(lp, torch.log_softmax(logits[:, t], -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_h, final.h, atol=1e-5, rtol=1e-5)
    state = dec.init_state(enc, B)
    with torch.no_grad():
        for t in range(T):
            _, state = dec.step(tokens[:, t], state, enc_p)
    if cfg.attention != "none":
        assert state.attn.shape == (B, S)
        # padding positions get no attention, and weights sum to one
        assert torch.all(state.attn[0, 3:] == 0)
        torch.testing.assert_close(state.attn.sum(-1), torch.ones(B))


@pytest.mark.parametrize("kind", ["bahdanau", "luong_general"])
def test_padding_content_never_changes_outputs(kind):
    torch.manual_seed(0)
    dec = RNNDecoder(DecoderConfig(emb=16, hidden=20, attention=kind), V,
                     enc_state_size=HE, memory_size=HE).eval()
    enc = make_enc()
    tokens = torch.randint(0, V, (B, T))
    ref, _ = dec(tokens, dec.init_state(enc, B), enc)
    noisy = EncoderOutput(state=enc.state, memory=enc.memory.clone(), mask=enc.mask)
    noisy.memory[0, 3:] = 1e3 * torch.randn(S - 3, HE)
    out, _ = dec(tokens, dec.init_state(noisy, B), noisy)
    torch.testing.assert_close(out, ref)


def test_language_model_without_encoder_and_tied_weights():
    dec = RNNDecoder(DecoderConfig(emb=16, hidden=32, layers=2), V)
    assert dec.output.weight is dec.embed.weight
    state = dec.init_state(None, 4)
    assert state.h.shape == (4, 2, 32) and state.c.shape == (4, 2, 32)
    logits, state = dec(torch.randint(0, V, (4, 6)), state)
    assert logits.shape == (4, 6, V) and state.attn is None


def test_bridge_uses_encoder_state():
    dec = RNNDecoder(DecoderConfig(emb=8, hidden=10, cell="gru"), V, enc_state_size=HE)
    a = dec.init_state(EncoderOutput(state=torch.randn(2, HE)), 2).h
    b = dec.init_state(EncoderOutput(state=torch.randn(2, HE)), 2).h
    assert a.shape == (2, 1, 10) and not torch.allclose(a, b)


def test_luong_dot_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="luong_dot"):
        RNNDecoder(DecoderConfig(hidden=20, attention="luong_dot"), V, memory_size=HE)


def test_attention_size_sets_bahdanau_width_and_round_trips():
    """attention_size is Bahdanau's hidden width A (0 = the decoder's hidden size), kept in the config dict."""
    from seqgen.config import from_dict, to_dict
    cfg = DecoderConfig(hidden=20, attention="bahdanau", attention_size=7)
    dec = RNNDecoder(cfg, V, memory_size=HE)
    assert dec.attention.key_proj.out_features == 7 and dec.attention.query_proj.out_features == 7
    default = RNNDecoder(DecoderConfig(hidden=20, attention="bahdanau"), V, memory_size=HE)
    assert default.attention.key_proj.out_features == 20
    assert from_dict(DecoderConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="attention_size"):
        RNNDecoder(DecoderConfig(attention="bahdanau", attention_size=-1), V, memory_size=HE)


@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_decoding_weight_caches_follow_weight_updates(batch, cell):
    """The weight copies decoding caches (blocked weights at batch <= 4, the per-token gate table above) must
    never serve stale weights after training."""
    torch.manual_seed(0)
    dec = RNNDecoder(DecoderConfig(emb=8, hidden=12, cell=cell, layers=2, dropout=0.0), V).eval()
    tok = torch.tensor([3, 5, 7, 1, 2, 3][:batch])
    with torch.no_grad():
        dec.step(tok, dec.init_state(None, batch))           # fills the caches
        dec.rnn.weight_hh_l0.add_(0.5)                       # in place, as an optimiser step does
        dec.rnn.weight_ih_l0.add_(0.1)
        dec.embed.weight.mul_(1.5)
        after, _ = dec.step(tok, dec.init_state(None, batch))
    ref, _ = dec(tok.unsqueeze(1), dec.init_state(None, batch))  # with autograd: the plain cell kernels
    torch.testing.assert_close(after, torch.log_softmax(ref[:, 0], -1).detach(), atol=1e-5, rtol=1e-5)


def test_memory_dropout_only_in_training():
    """memory_dropout drops encoder memory cells the attention reads, in training only; 0 = no module."""
    torch.manual_seed(0)
    assert RNNDecoder(DecoderConfig(attention="luong_general"), V, enc_state_size=HE,
                      memory_size=HE).memory_dropout is None
    cfg = DecoderConfig(emb=16, hidden=20, dropout=0.0, attention="luong_general", memory_dropout=0.5)
    dec = RNNDecoder(cfg, V, enc_state_size=HE, memory_size=HE)
    enc, tokens = make_enc(), torch.randint(0, V, (B, T))
    run = lambda: dec(tokens, dec.init_state(enc, B), enc)[0]  # noqa: E731
    dec.eval()
    assert torch.equal(run(), run())
    dec.train()
    torch.manual_seed(1)
    a = run()
    torch.manual_seed(2)
    assert not torch.allclose(a, run())
    dec.memory_dropout.p = 0.0            # with nothing dropped, training and evaluation agree
    dec.eval()
    b = run()
    dec.train()
    assert torch.allclose(run(), b, atol=1e-6)


@pytest.mark.parametrize("attention", ["bahdanau", "luong_general"])
def test_prepare_casts_memory_once_under_autocast(attention):
    """Under autocast the memory is cast in prepare(), so steps do not re-cast [B, S, H] every token; the
    attention weights stay float32 and the outputs match float32 to bf16 precision."""
    torch.manual_seed(0)
    dec = RNNDecoder(DecoderConfig(emb=16, hidden=20, dropout=0.0, attention=attention), V, enc_state_size=HE,
                     memory_size=HE).eval()
    enc = make_enc()
    assert dec.prepare(enc).memory.dtype == torch.float32          # no autocast: untouched
    tokens = torch.randint(0, V, (B,))
    with torch.no_grad():
        ref, ref_state = dec.step(tokens, dec.init_state(enc, B), dec.prepare(enc))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prepared = dec.prepare(enc)
            assert prepared.memory.dtype == torch.bfloat16
            assert prepared.keys is None or prepared.keys.dtype == torch.bfloat16
            out, state = dec.step(tokens, dec.init_state(enc, B), prepared)
    assert out.dtype == torch.float32 and state.attn.dtype == torch.float32
    assert torch.allclose(state.attn.sum(-1), torch.ones(B), atol=1e-5)
    assert torch.allclose(out, ref, atol=0.1) and torch.allclose(state.attn, ref_state.attn, atol=0.05)


def test_bahdanau_scores_are_v_tanh_of_query_plus_key():
    """The sigmoid form (2 v . sigmoid(2q + 2k), faster on CPU) gives Bahdanau's softmax(v . tanh(q + k))."""
    from seqgen.decoders.attention import Attention
    torch.manual_seed(0)
    att = Attention("bahdanau", 20, HE)
    enc = make_enc()
    query = torch.randn(B, 4, 20)
    ctx, weights = att(query, enc.memory, enc.mask)
    scores = att.energy(torch.tanh(att.query_proj(query).unsqueeze(2) + att.key_proj(enc.memory).unsqueeze(1)))
    expected = scores.squeeze(-1).masked_fill(~enc.mask.unsqueeze(1), float("-inf")).softmax(-1)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(ctx, torch.bmm(expected, enc.memory), atol=1e-5)
    assert torch.equal(att(query, enc.memory, enc.mask, att.keys(enc.memory))[1], weights)


@pytest.mark.parametrize("kw", [c for c in CONFIGS if c["attention"] != "none"])
def test_beams_share_the_encoder_memory(kw):
    """EncoderOutput.repeat_batch copies nothing: the beams of an input read its one memory row, with the same
    results as a memory copied per beam; selecting whole inputs keeps the sharing, any other rows copy."""
    from seqgen.decoders.state import repeat_batch, select_batch
    from seqgen.tensors import map_tensors
    torch.manual_seed(0)
    dec = RNNDecoder(DecoderConfig(**{"emb": 16, "hidden": 20, "dropout": 0.0, **kw}), V, enc_state_size=HE,
                     memory_size=HE).eval()
    enc = dec.prepare(make_enc(), decoding=True)
    assert enc.values is not None
    k = 3
    shared = repeat_batch(enc, k)
    copied = map_tensors(enc, lambda t: t.repeat_interleave(k, dim=0))
    assert shared.beams == k and shared.memory.data_ptr() == enc.memory.data_ptr() and copied.beams == 1
    tokens = torch.randint(0, V, (B * k,))
    with torch.no_grad():
        state = dec.init_state(shared, B * k)
        assert torch.allclose(state.h, dec.init_state(copied, B * k).h, atol=1e-6)
        out_s, st_s = dec.step(tokens, state, shared)
        out_c, st_c = dec.step(tokens, state, copied)
        assert torch.allclose(out_s, out_c, atol=1e-5) and torch.allclose(st_s.attn, st_c.attn, atol=1e-6)
        inputs_kept = torch.tensor([0, 1, 2, 6, 7, 8])            # inputs 0 and 2, all their beams
        kept = select_batch(shared, inputs_kept)
        assert kept.beams == k and kept.memory.size(0) == 2
        odd = torch.tensor([1, 4, 8])                              # single beams of inputs 0, 1 and 2
        picked = select_batch(shared, odd)
        assert picked.beams == 1 and torch.equal(picked.memory, enc.memory[[0, 1, 2]])
        assert torch.equal(picked.values, enc.values[[0, 1, 2]]) and kept.values.size(0) == 2
        for sel in (inputs_kept, odd):
            a, _ = dec.step(tokens[sel], select_batch(state, sel), select_batch(shared, sel))
            b, _ = dec.step(tokens[sel], select_batch(state, sel), select_batch(copied, sel))
            assert torch.allclose(a, b, atol=1e-5)
