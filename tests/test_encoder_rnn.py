"""RNNTextEncoder: shapes, packed == each sequence alone, padding never read, masks."""
import pytest
import torch

from seqgen.encoders.rnn import RNNEncoderConfig, RNNTextEncoder

V, PAD = 17, 0
LENGTHS = [5, 1, 7, 3]          # S = 7; includes a length-1 sequence and a full-length one


def make(cell="gru", bidirectional=True, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = RNNEncoderConfig(cell=cell, emb=6, hidden=5, layers=layers, bidirectional=bidirectional, dropout=0.2)
    return RNNTextEncoder(cfg, V, pad_id=PAD).eval()


def batch(lengths=LENGTHS, seed=1, pad_fill=None):
    """tokens [B, S] with real ids 1..V-1; padding holds PAD, or random ids when pad_fill is a seed."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    tokens = torch.randint(1, V, (len(lengths), S), generator=g)
    lens = torch.tensor(lengths)
    pad = torch.arange(S) >= lens[:, None]
    filler = (torch.randint(0, V, tokens.shape, generator=torch.Generator().manual_seed(pad_fill))
              if pad_fill is not None else torch.full_like(tokens, PAD))
    return torch.where(pad, filler, tokens), lens


KINDS = [("gru", True), ("gru", False), ("lstm", True), ("lstm", False)]


@pytest.mark.parametrize("cell,bi", KINDS)
def test_shapes_and_mask(cell, bi):
    enc = make(cell, bi)
    tokens, lens = batch()
    out = enc(tokens, lens)
    H = 5 * (2 if bi else 1)
    assert enc.state_size == enc.memory_size == H
    assert out.memory.shape == (4, 7, H) and out.state.shape == (4, H)
    assert out.mask.dtype == torch.bool
    assert out.mask.tolist() == [[t < n for t in range(7)] for n in LENGTHS]
    assert torch.all(out.memory[~out.mask] == 0)        # exactly zero on padding


@pytest.mark.parametrize("cell,bi", KINDS)
def test_packed_equals_each_sequence_alone(cell, bi):
    enc = make(cell, bi)
    tokens, lens = batch()
    out = enc(tokens, lens)
    for i, n in enumerate(LENGTHS):
        alone = enc(tokens[i:i + 1, :n], torch.tensor([n]))
        torch.testing.assert_close(out.memory[i, :n], alone.memory[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.state[i], alone.state[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell,bi", KINDS)
def test_state_is_last_layer_final_states(cell, bi):
    """Forward half = memory at the last real token; backward half = memory at the first token."""
    enc = make(cell, bi)
    tokens, lens = batch()
    out = enc(tokens, lens)
    H = 5
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(out.state[i, :H], out.memory[i, n - 1, :H])
        if bi:
            torch.testing.assert_close(out.state[i, H:], out.memory[i, 0, H:])


@pytest.mark.parametrize("cell,bi", KINDS)
def test_padding_content_never_changes_outputs(cell, bi):
    enc = make(cell, bi)
    clean = enc(*batch())
    for fill_seed in (3, 4):
        noisy = enc(*batch(pad_fill=fill_seed))
        assert torch.equal(clean.memory, noisy.memory)
        assert torch.equal(clean.state, noisy.state)
        assert torch.equal(clean.mask, noisy.mask)


def test_all_lengths_one_and_no_padding():
    enc = make("lstm", True)
    tokens, lens = batch([1, 1, 1])
    out = enc(tokens, lens)
    assert out.memory.shape == (3, 1, 10) and out.mask.all()
    tokens, lens = batch([4, 4])                 # no padding: the unpacked fast path
    full = enc(tokens, lens)
    for i in range(2):
        alone = enc(tokens[i:i + 1], lens[i:i + 1])
        torch.testing.assert_close(full.memory[i], alone.memory[0], atol=1e-5, rtol=1e-5)


def test_eval_deterministic_and_train_dropout():
    enc = make("gru", True)
    tokens, lens = batch()
    a, b = enc(tokens, lens), enc(tokens, lens)
    assert torch.equal(a.memory, b.memory) and torch.equal(a.state, b.state)
    enc.train()
    torch.manual_seed(5)
    c = enc(tokens, lens)
    assert not torch.equal(a.memory, c.memory)   # dropout is active in training
    assert torch.all(c.memory[~c.mask] == 0)


def test_gradients_flow_and_lengths_dtype():
    enc = make("gru", True).train()
    tokens, lens = batch()
    out = enc(tokens, lens.to(torch.int32))
    (out.memory.sum() + out.state.sum()).backward()
    assert enc.embed.weight.grad is not None
    assert torch.all(enc.embed.weight.grad[PAD] == 0)   # padding_idx


def test_bad_lengths_rejected():
    enc = make()
    tokens, _ = batch()
    with pytest.raises(ValueError, match="lengths"):
        enc(tokens, torch.tensor([5, 0, 7, 3]))
    with pytest.raises(ValueError, match="lengths"):
        enc(tokens, torch.tensor([5, 1, 8, 3]))
    with pytest.raises(ValueError, match="lengths"):
        enc(tokens, torch.tensor([5, 1, 7]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lengths_on_device", [False, True])
def test_cuda_lengths_on_either_device(lengths_on_device):
    enc = make("lstm", True)
    tokens, lens = batch()
    ref = enc(tokens, lens)
    enc = enc.cuda()
    out = enc(tokens.cuda(), lens.cuda() if lengths_on_device else lens)
    assert out.mask.device.type == "cuda"
    torch.testing.assert_close(out.memory.cpu(), ref.memory, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.state.cpu(), ref.state, atol=1e-4, rtol=1e-4)
