"""A tiny character LM end to end: learns a repetitive text, checkpoints, resumes exactly."""
import json
import os

import pytest
import torch

from seqgen.checkpoint import load_checkpoint
from seqgen.decoders.rnn import DecoderConfig
from seqgen.generation import GenerationConfig
from seqgen.inference.lm import generate_text
from seqgen.model import load_model
from seqgen.tasks.lm import LMDataConfig, LMRunConfig, train_lm
from seqgen.train import TrainConfig

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def tiny_run(text_path, **train_kw):
    train = dict(lr=1e-2, warmup_steps=10, max_steps=150, eval_every=50, log_every=25,
                 checkpoint_every=50, seed=3, progress=False, device="cpu", schedule="cosine")
    train.update(train_kw)
    return LMRunConfig(
        data=LMDataConfig(text=str(text_path), level="char", seq_len=48, batch_size=16, valid_fraction=0.1),
        decoder=DecoderConfig(cell="lstm", emb=32, hidden=64, layers=1, dropout=0.0),
        train=TrainConfig(**train))


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_tiny_char_lm_memorises_text_and_greedy_reproduces_it(tmp_path, text_file):
    state = train_lm(tiny_run(text_file), str(tmp_path / "run"), log=lambda m: None)
    assert state.best < 0.05, f"validation loss {state.best} should approach zero on a repetitive text"
    model = load_model(str(tmp_path / "run" / "best.pt"))
    out = generate_text(model, "the quick", GenerationConfig(max_len=60))[0]
    assert out == TEXT[:len(out)]
    assert len(out) == len("the quick") + 60


def test_checkpoint_reload_gives_identical_outputs(tmp_path, text_file):
    train_lm(tiny_run(text_file, max_steps=20, eval_every=20), str(tmp_path / "run"), log=lambda m: None)
    a = load_model(str(tmp_path / "run" / "best.pt"))
    b = load_model(str(tmp_path / "run" / "best.pt"))
    tokens = torch.randint(4, len(a.tgt.vocab), (2, 9))
    la, _ = a.decoder(tokens, a.decoder.init_state(None, 2))
    lb, _ = b.decoder(tokens, b.decoder.init_state(None, 2))
    assert torch.equal(la, lb)
    gen = GenerationConfig(temperature=1.0, max_len=40)
    assert generate_text(a, "the", gen, seed=5) == generate_text(b, "the", gen, seed=5)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, text_file, ema):
    # dropout on, so the dropout masks must be the same after the resume; with ema, the average too
    def run(**kw):
        r = tiny_run(text_file, max_steps=60, eval_every=30, checkpoint_every=10, log_every=5, ema=ema, **kw)
        r.decoder.dropout = 0.2
        return r

    train_lm(run(), str(tmp_path / "full"), log=lambda m: None)

    def crash_at_27(msg):
        if msg.startswith("step 25 "):
            raise Interrupt
    with pytest.raises(Interrupt):
        train_lm(run(), str(tmp_path / "cut"), log=crash_at_27)
    state = train_lm(run(), str(tmp_path / "cut"), resume=True, log=lambda m: None)
    assert state.step == 60
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)  # outer wrapper only
    assert full["format"] == "seqgen-checkpoint"
    a = load_model(str(tmp_path / "full" / "last.pt")).state_dict()
    b = load_model(str(tmp_path / "cut" / "last.pt")).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if ema:
        ea = load_checkpoint(str(tmp_path / "full" / "last.pt"))["trainer"]["ema"]
        eb = load_checkpoint(str(tmp_path / "cut" / "last.pt"))["trainer"]["ema"]
        assert ea["updates"] == eb["updates"] == 60
        for k in ea["weights"]:
            assert torch.equal(ea["weights"][k], eb["weights"][k]), k
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(steps), "resumed metrics log must not repeat steps"


def test_refuses_to_overwrite_an_existing_run(tmp_path, text_file):
    from seqgen.errors import SeqgenError
    out = str(tmp_path / "run")
    train_lm(tiny_run(text_file, max_steps=5, eval_every=5), out, log=lambda m: None)
    before = os.path.getmtime(os.path.join(out, "best.pt"))
    with pytest.raises(SeqgenError, match="--resume"):
        train_lm(tiny_run(text_file, max_steps=5, eval_every=5), out, log=lambda m: None)
    assert os.path.getmtime(os.path.join(out, "best.pt")) == before


def test_generate_decodes_without_dropout_and_restores_the_mode():
    """A model left in training mode decodes as in eval mode (no dropout) and is in training mode again after;
    generate() leaves a model in eval mode as it is."""
    from seqgen.model import ModelConfig, Seq2Seq
    from seqgen.tokenizers import TextCodec
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(task="lm", decoder=DecoderConfig(emb=8, hidden=16, dropout=0.5)),
                    tgt=TextCodec.build("char", [TEXT]))
    gen = GenerationConfig(beam=3, n_best=2, max_len=12, amp="off")
    ref = model.eval().generate(batch_size=4, gen=gen)
    assert not any(m.training for m in model.modules())
    got = model.train().generate(batch_size=4, gen=gen)
    assert all(m.training for m in model.modules())
    assert [[(h.tokens, round(h.score, 5)) for h in hs] for hs in got] == \
           [[(h.tokens, round(h.score, 5)) for h in hs] for hs in ref]


def test_keep_checkpoints_keeps_the_last_n_validated_weights_and_a_resume_drops_the_redone_ones(tmp_path, text_file):
    from seqgen.average import average_models
    out = tmp_path / "run"
    state = train_lm(tiny_run(text_file, max_steps=40, eval_every=10, checkpoint_every=10, keep_checkpoints=2),
                     str(out), log=lambda m: None)
    assert state.step == 40
    assert sorted(p.name for p in out.glob("step-*.pt")) == ["step-30.pt", "step-40.pt"]
    # the kept file holds the validated weights: at the last step they are last.pt's
    last = load_model(str(out / "last.pt")).state_dict()
    kept = load_model(str(out / "step-40.pt")).state_dict()
    assert all(torch.equal(last[k], kept[k]) for k in last)
    avg = average_models([str(out / "step-30.pt"), str(out / "step-40.pt")]).state_dict()
    k = next(iter(avg))
    s30 = load_model(str(out / "step-30.pt")).state_dict()
    assert torch.allclose(avg[k], (s30[k] + kept[k]) / 2)
    # a step file from beyond the resumed step (the part of a killed run being redone) goes away
    (out / "step-50.pt").write_bytes((out / "step-40.pt").read_bytes())
    (out / "step-9.pt.tmp").write_bytes(b"x")   # not a kept checkpoint: left alone
    train_lm(tiny_run(text_file, max_steps=40, eval_every=10, checkpoint_every=10, keep_checkpoints=2),
             str(out), resume=True, log=lambda m: None)
    assert sorted(p.name for p in out.glob("step-*.pt")) == ["step-30.pt", "step-40.pt"]
