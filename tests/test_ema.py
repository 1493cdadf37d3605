"""The weight average (--ema): its arithmetic, and that validation and best.pt use it."""
import pytest
import torch
from torch import nn

from seqgen.checkpoint import load_checkpoint
from seqgen.decoders.rnn import DecoderConfig
from seqgen.ema import WeightEMA, ema_decay
from seqgen.errors import SeqgenError
from seqgen.model import load_model
from seqgen.tasks.lm import LMDataConfig, LMRunConfig, train_lm
from seqgen.train import TrainConfig


def test_average_follows_the_decay_rule_and_applied_restores_the_weights_bitwise():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.5)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        w = 1 - ema_decay(0.5, ema.updates)
        expected = {n: e + w * (p.detach() - e) for (n, p), e in zip(model.named_parameters(), expected.values())}
    assert ema_decay(0.5, 1) == pytest.approx(2 / 11) and ema_decay(0.5, 100) == 0.5
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied():
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n])
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), training[n])


def test_applied_restores_the_weights_when_evaluation_fails():
    model = nn.Linear(2, 2)
    before = model.weight.detach().clone()
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("evaluation crashed")
    assert torch.equal(model.weight.detach(), before + 1.0)


@pytest.mark.parametrize("decay", [1.0, -0.1, 2.0])
def test_decay_outside_0_1_is_refused(decay):
    with pytest.raises(SeqgenError, match="--ema"):
        WeightEMA(nn.Linear(2, 2), decay)


def test_a_mismatched_saved_average_is_refused():
    ema = WeightEMA(nn.Linear(2, 2), 0.9)
    with pytest.raises(SeqgenError, match="ckpt.pt"):
        ema.load_state_dict(WeightEMA(nn.Linear(3, 2), 0.9).state_dict(), where="ckpt.pt")


def test_training_with_ema_validates_and_keeps_the_average_as_best(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    run = LMRunConfig(
        data=LMDataConfig(text=str(text), level="char", seq_len=32, batch_size=8, valid_fraction=0.1),
        decoder=DecoderConfig(cell="gru", emb=16, hidden=32, layers=1, dropout=0.0),
        train=TrainConfig(lr=1e-2, warmup_steps=2, max_steps=20, eval_every=20, checkpoint_every=20, ema=0.9,
                          seed=1, progress=False, device="cpu"))
    train_lm(run, str(tmp_path / "run"), log=lambda m: None)
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    best = load_model(str(tmp_path / "run" / "best.pt")).state_dict()
    raw = load_model(str(tmp_path / "run" / "last.pt")).state_dict()
    average = last["trainer"]["ema"]["weights"]
    assert last["trainer"]["ema"]["updates"] == 20
    for name, value in average.items():
        assert torch.equal(best[name], value), name          # best.pt = the average that was validated
    assert any(not torch.equal(raw[n], average[n]) for n in average)   # last.pt keeps the training weights
