"""Ensembles (one step() over several models) and checkpoint averaging."""
import pytest
import torch

from seqgen.average import average_models
from seqgen.checkpoint import save_checkpoint
from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.model import Ensemble
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.model import ModelConfig, Seq2Seq, load_model
from seqgen.inference.lm import generate_text
from seqgen.inference.translation import translate_nbest
from seqgen.tokenizers import TextCodec
from test_serve import WORDS

SENTENCES = ["ein mann fährt rad im park", "eine frau läuft", "hund im schnee", "ein hund"]


def translator(seed, hidden=32):
    torch.manual_seed(seed)
    codec = TextCodec.build("word", [" ".join(WORDS)])
    return Seq2Seq(ModelConfig(task="translation",
                               decoder=DecoderConfig(cell="gru", emb=16, hidden=hidden, attention="bahdanau",
                                                     dropout=0.0),
                               text_encoder=RNNEncoderConfig(cell="gru", emb=16, hidden=16, dropout=0.0)),
                   tgt=codec, src=codec).eval()


def lm(seed, text="abc def ghi\n"):
    torch.manual_seed(seed)
    return Seq2Seq(ModelConfig(task="lm", decoder=DecoderConfig(cell="lstm", emb=8, hidden=16, dropout=0.0)),
                   tgt=TextCodec.build("char", [text])).eval()


def results(model, gen):
    return [[(h.text, round(h.score, 5)) for h in hs] for hs in translate_nbest(model, SENTENCES, gen)]


@pytest.mark.parametrize("gen", [GenerationConfig(max_len=12, amp="off"),
                                 GenerationConfig(beam=4, n_best=2, max_len=12, amp="off")])
def test_an_ensemble_of_one_model_is_that_model(gen):
    model = translator(0)
    assert results(Ensemble([model]), gen) == results(model, gen)


def test_an_ensemble_of_two_differs_from_each_and_runs_beam_search_with_nbest_and_attention():
    a, b = translator(0), translator(1)
    gen = GenerationConfig(beam=4, n_best=3, max_len=12, amp="off")
    both = Ensemble([a, b])
    out = translate_nbest(both, SENTENCES, gen)
    assert all(len(hs) == 3 for hs in out)
    assert all(hs[0].attention is not None and hs[0].attention.size(1) == len(hs[0].source_tokens) for hs in out)
    mixed = results(both, gen)
    assert mixed != results(a, gen) and mixed != results(b, gen)
    # the ensemble's step is the log of the members' mean probability
    enc = both.decoder.prepare(both.encode(torch.tensor([[3, 4, 2]]), torch.tensor([3])), decoding=True)
    lp, _ = both.decoder.step(torch.tensor([1]), both.decoder.init_state(enc, 1), enc)
    pa, _ = a.decoder.step(torch.tensor([1]), a.decoder.init_state(enc.members[0], 1), enc.members[0])
    pb, _ = b.decoder.step(torch.tensor([1]), b.decoder.init_state(enc.members[1], 1), enc.members[1])
    assert torch.allclose(lp.exp(), (pa.exp() + pb.exp()) / 2, atol=1e-6)


def test_ensembles_load_from_a_comma_list_and_sample(tmp_path):
    save_checkpoint(str(tmp_path / "a.pt"), lm(0).to_payload())
    save_checkpoint(str(tmp_path / "b.pt"), lm(1).to_payload())
    model = load_model(f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}", task="lm")
    assert isinstance(model, Ensemble) and len(model.members) == 2
    text = generate_text(model, "ab", GenerationConfig(temperature=1.0, max_len=20), seed=3)[0]
    assert text.startswith("ab")


def test_incompatible_ensembles_are_refused(tmp_path):
    save_checkpoint(str(tmp_path / "lm.pt"), lm(0).to_payload())
    save_checkpoint(str(tmp_path / "other.pt"), lm(0, text="xyz\n").to_payload())
    save_checkpoint(str(tmp_path / "mt.pt"), translator(0).to_payload())
    with pytest.raises(SeqgenError, match="same task"):
        load_model([str(tmp_path / "lm.pt"), str(tmp_path / "mt.pt")])
    with pytest.raises(SeqgenError, match="target vocabularies differ"):
        load_model([str(tmp_path / "lm.pt"), str(tmp_path / "other.pt")])
    with pytest.raises(SeqgenError, match="no such checkpoint"):
        load_model([str(tmp_path / "lm.pt"), str(tmp_path / "missing.pt")])


def test_averaging_two_copies_gives_that_checkpoint_and_mismatches_are_refused(tmp_path):
    model = translator(0)
    for name in ("a.pt", "b.pt"):
        save_checkpoint(str(tmp_path / name), model.to_payload())
    avg = average_models([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    for k, v in model.state_dict().items():
        assert torch.equal(avg.state_dict()[k], v), k
    save_checkpoint(str(tmp_path / "c.pt"), translator(1).to_payload())
    mean = average_models([str(tmp_path / "a.pt"), str(tmp_path / "c.pt")])
    w = "decoder.out.weight" if "decoder.out.weight" in model.state_dict() else next(iter(model.state_dict()))
    assert torch.allclose(mean.state_dict()[w], (model.state_dict()[w] + translator(1).state_dict()[w]) / 2)
    save_checkpoint(str(tmp_path / "wide.pt"), translator(0, hidden=48).to_payload())
    with pytest.raises(SeqgenError, match=r"differ in decoder \(hidden\)"):
        average_models([str(tmp_path / "a.pt"), str(tmp_path / "wide.pt")])
    save_checkpoint(str(tmp_path / "lm.pt"), lm(0).to_payload())
    with pytest.raises(SeqgenError, match="task"):
        average_models([str(tmp_path / "a.pt"), str(tmp_path / "lm.pt")])


def test_average_command_writes_a_loadable_mean_and_refuses_bad_input(tmp_path, capsys):
    from seqgen.cli import main
    save_checkpoint(str(tmp_path / "a.pt"), translator(0).to_payload())
    save_checkpoint(str(tmp_path / "b.pt"), translator(1).to_payload())
    assert main(["average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "avg.pt")]) == 0
    avg = load_model(str(tmp_path / "avg.pt"))
    expected = average_models([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in avg.state_dict().items())
    capsys.readouterr()
    assert main(["average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "a.pt")]) == 2
    assert "is one of the checkpoints" in capsys.readouterr().err
    save_checkpoint(str(tmp_path / "lm.pt"), lm(0).to_payload())
    assert main(["average", str(tmp_path / "a.pt"), str(tmp_path / "lm.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot average" in err and not (tmp_path / "x.pt").exists()
