"""Translation end to end on synthetic tasks (copy, reverse, sort digit sequences), batched decoding,
attention variants, data handling and the errors a user meets."""
import json
import os
import random

import pytest
import torch

from seqgen.checkpoint import load_checkpoint
from seqgen.data.parallel import ParallelBatches
from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.inference.translation import translate, translate_nbest
from seqgen.model import ModelConfig, Seq2Seq, load_model
from seqgen.tasks.translation import (TranslationDataConfig, TranslationRunConfig, build_codecs, read_corpus,
                                      train_translation)
from seqgen.tokenizers import TextCodec
from seqgen.train import TrainConfig

TASKS = {"copy": lambda xs: xs, "reverse": lambda xs: xs[::-1], "sort": sorted}


def make_pairs(task: str, n: int, seed: int, min_len: int = 2, max_len: int = 6) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        xs = [str(rng.randrange(10)) for _ in range(rng.randint(min_len, max_len))]
        src.append(" ".join(xs))
        tgt.append(" ".join(TASKS[task](xs)))
    return src, tgt


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def write_task(folder, task: str, n_train: int = 10000, seed: int = 0) -> dict:
    """train/valid/test files of a synthetic task; returns their paths and the test pairs."""
    paths = {}
    for split, n, s in (("train", n_train, seed), ("valid", 100, seed + 100), ("test", 400, seed + 200)):
        src, tgt = make_pairs(task, n, s)
        paths[split] = (write_lines(folder / f"{split}.src", src), write_lines(folder / f"{split}.tgt", tgt))
        paths[f"{split}_pairs"] = (src, tgt)
    return paths


def tiny_run(paths: dict, *, steps: int = 800, attention: str = "bahdanau", input_feeding: bool = False,
             **data_kw) -> TranslationRunConfig:
    data = dict(src_train=paths["train"][0], tgt_train=paths["train"][1], src_valid=paths["valid"][0],
                tgt_valid=paths["valid"][1], level="word", batch_size=64)
    data.update(data_kw)
    return TranslationRunConfig(
        data=TranslationDataConfig(**data),
        encoder=RNNEncoderConfig(cell="gru", emb=32, hidden=64, dropout=0.0),
        decoder=DecoderConfig(cell="gru", emb=32, hidden=128, attention=attention, input_feeding=input_feeding,
                              dropout=0.0),
        train=TrainConfig(lr=1e-2, warmup_steps=20, max_steps=steps, eval_every=steps, checkpoint_every=steps,
                          log_every=100, label_smoothing=0.0, seed=1, device="cpu", progress=False),
        eval=GenerationConfig(beam=1, max_len=20))


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module", params=sorted(TASKS))
def trained(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    paths = write_task(folder, request.param)
    state = train_translation(tiny_run(paths), str(folder / "run"), log=quiet)
    return request.param, paths, state, load_model(str(folder / "run" / "best.pt"), task="translation")


# -- learning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp", ["off", "bf16"])
@pytest.mark.parametrize("beam", [1, 4])
def test_synthetic_task_is_learned_to_exact_match(trained, beam, amp):
    task, paths, state, model = trained
    src, ref = paths["test_pairs"]
    out = translate(model, src, GenerationConfig(beam=beam, max_len=20, amp=amp), batch_size=64)
    wrong = [(s, o, r) for s, o, r in zip(src, out, ref) if o != r]
    accuracy = 1 - len(wrong) / len(ref)
    assert accuracy >= 0.99, f"{task} beam {beam} amp {amp}: exact match {accuracy:.3f} on held-out, e.g. {wrong[:3]}"
    assert state.best > 95  # validation BLEU picked best.pt


def test_batched_beam_equals_one_sentence_at_a_time(trained):
    _, paths, _, model = trained
    src = paths["test_pairs"][0][:24]
    # float32: under bf16 autocast (the default where native) rounding makes results depend on the batch
    gen = GenerationConfig(beam=4, n_best=3, max_len=20, amp="off")
    batched = translate_nbest(model, src, gen, batch_size=64)
    for sentence, hyps in zip(src, batched):
        alone = translate_nbest(model, [sentence], gen, batch_size=1)[0]
        assert [h.text for h in hyps] == [h.text for h in alone]
        for a, b in zip(hyps, alone):
            assert a.score == pytest.approx(b.score, abs=1e-5)
            assert a.log_prob == pytest.approx(b.log_prob, abs=1e-5)


def test_api_translate_and_nbest_order(trained):
    _, paths, _, model = trained
    src, ref = paths["test_pairs"]
    # the API is translate() (quality: test_synthetic_task_is_learned_to_exact_match, which allows 1% wrong)
    assert model.translate(src[:5], beam=3) == translate(model, src[:5], GenerationConfig(beam=3), batch_size=64)
    assert sum(a == b for a, b in zip(model.translate(src[:20], beam=3), ref[:20])) >= 19
    hyps = translate_nbest(model, src[:5], GenerationConfig(beam=4, n_best=4, max_len=20))
    for h in hyps:
        assert len(h) == 4
        assert [x.score for x in h] == sorted((x.score for x in h), reverse=True)
    # attention rows: one per generated token and the eos step; columns: source tokens and <eos>
    best = hyps[0][0]
    assert best.attention.shape == (len(best.target_tokens), len(best.source_tokens))
    assert best.source_tokens[-1] == "<eos>" and best.target_tokens[-1] == "<eos>"
    assert torch.allclose(best.attention.sum(-1), torch.ones(len(best.target_tokens)), atol=1e-5)


@pytest.mark.parametrize("amp", ["off", "bf16", "auto"])
def test_decoding_precision_follows_amp(trained, amp):
    from seqgen.precision import native_bf16
    _, paths, _, model = trained
    seen = []
    hook = model.decoder.output.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    try:
        hyps = translate_nbest(model, paths["test_pairs"][0][:4], GenerationConfig(beam=3, max_len=20, amp=amp))
    finally:
        hook.remove()
    bf16 = amp == "bf16" or (amp == "auto" and native_bf16(torch.device("cpu")))
    assert set(seen) == {torch.bfloat16 if bf16 else torch.float32}
    for (h,) in ((hs[0],) for hs in hyps):   # scores and attention maps stay float32 either way
        assert h.attention.dtype == torch.float32
        assert torch.allclose(h.attention.sum(-1), torch.ones(h.attention.size(0)), atol=1e-5)
    with pytest.raises(SeqgenError, match="--amp must be one of"):
        model.translate(["a"], amp="fast")


def test_bf16_decoding_casts_each_weight_once(trained):
    """autocast caches its bf16 copies of the weights for the whole search (outside inference_mode it can):
    without the cache, every step re-casts every weight. (The attention's query projection: the first RNN
    layer's weights are cast once per weight version by the decoder itself, see FastStep.gate_table in seqgen/decoders/fast_step.py.)"""
    from torch.profiler import profile
    _, paths, _, model = trained
    shape = list(model.decoder.attention.query_proj.weight.shape)
    with profile(record_shapes=True) as prof:
        hyps = translate_nbest(model, paths["test_pairs"][0][:8], GenerationConfig(beam=3, max_len=20, amp="bf16"))
    casts = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::copy_" and e.input_shapes[:2] == [shape, shape])
    same_shape = sum(1 for p in model.parameters() if list(p.shape) == shape)   # the key projection, the bridge
    assert max(len(h[0].text.split()) for h in hyps) >= 3 and casts == same_shape, casts


# -- every attention variant decodes consistently ----------------------------------------------------------
@pytest.mark.parametrize("cell, attention, feed", [
    ("gru", "bahdanau", True), ("lstm", "luong_dot", False), ("gru", "luong_general", True), ("lstm", "none", False),
])
def test_attention_variants_train_and_batch_consistently(tmp_path, cell, attention, feed):
    torch.manual_seed(0)
    src_text, tgt_text = make_pairs("reverse", 200, seed=5)
    codec = TextCodec.build("word", src_text + tgt_text)
    enc = RNNEncoderConfig(cell=cell, emb=16, hidden=16, dropout=0.0)
    dec = DecoderConfig(cell=cell, emb=16, hidden=32, attention=attention, input_feeding=feed, dropout=0.0)
    model = Seq2Seq(ModelConfig(task="translation", text_encoder=enc, decoder=dec), tgt=codec, src=codec)
    data = ParallelBatches([codec.encode(s, eos=True) for s in src_text], [codec.encode(t) for t in tgt_text],
                           pad=0, bos=1, eos=2, batch_size=16, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in list(data.iter_batches(0))[:5]:
        loss, n = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and n == batch.num_target_tokens(0)
    model.eval()
    gen = GenerationConfig(beam=3, n_best=2, max_len=8, amp="off")   # float32: batch-independent
    batched = translate_nbest(model, src_text[:8], gen)
    for s, hyps in zip(src_text[:8], batched):
        alone = translate_nbest(model, [s], gen, batch_size=1)[0]
        assert [h.text for h in hyps] == [h.text for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-5)
        assert (hyps[0].attention is None) == (attention == "none")


# -- data ----------------------------------------------------------------------------------------------
def test_parallel_batches_shapes_and_determinism():
    src = [[5, 6, 2], [7, 2], [5, 5, 5, 5, 2]]
    tgt = [[8], [9, 9, 9], [8, 8]]
    data = ParallelBatches(src, tgt, pad=0, bos=1, eos=2, batch_size=2, seed=3)
    batches = list(data.iter_batches(0))
    assert data.num_batches(0) == len(batches) == 2
    seen = set()
    for b in batches:
        assert b.source.shape[0] == b.target.shape[0] == len(b.source_lengths) == len(b.index)
        for row, i in enumerate(b.index.tolist()):
            seen.add(i)
            assert b.source[row, : b.source_lengths[row]].tolist() == src[i]
            t = b.target[row].tolist()
            assert t[: len(tgt[i]) + 2] == [1, *tgt[i], 2] and set(t[len(tgt[i]) + 2:]) <= {0}
    assert seen == {0, 1, 2}
    again = list(data.iter_batches(0, start=1))
    assert torch.equal(again[0].target, batches[1].target)


def test_max_tokens_budget_and_length_filter_warning(tmp_path):
    src, tgt = make_pairs("copy", 300, seed=1, max_len=6)
    src += ["1 2 3 4 5 6 7 8 9 0 1 2"] * 3
    tgt += ["1"] * 3
    paths = {"train": (write_lines(tmp_path / "a.src", src), write_lines(tmp_path / "a.tgt", tgt)),
             "valid": (write_lines(tmp_path / "v.src", src[:10]), write_lines(tmp_path / "v.tgt", tgt[:10]))}
    messages = []
    run = tiny_run(paths, steps=3, max_len=10, max_tokens=64)
    train_translation(run, str(tmp_path / "run"), log=messages.append)
    assert any("filtered 3 of 303 pair(s) longer than --max-len 10" in m for m in messages), messages
    codec = load_model(str(tmp_path / "run" / "best.pt")).src
    data = ParallelBatches([codec.encode(s, eos=True) for s in src[:300]], [codec.encode(t) for t in tgt[:300]],
                           pad=0, bos=1, eos=2, max_tokens=64, seed=1)
    for b in data.iter_batches(0):
        assert b.source.numel() <= 64 and b.target[:, 1:].numel() <= 64


def test_subword_joint_and_separate_vocabularies_and_spm_files(tmp_path):
    src = ["ein kleines haus am see", "zwei hunde spielen im park", "eine frau liest ein buch"] * 30
    tgt = ["a small house by the lake", "two dogs play in the park", "a woman reads a book"] * 30
    corpus = read_corpus(write_lines(tmp_path / "s", src), write_lines(tmp_path / "t", tgt), "", what="training")[0]
    joint_s, joint_t = build_codecs(TranslationDataConfig(level="subword", vocab_size=40), corpus)
    assert joint_s == joint_t
    sep_s, sep_t = build_codecs(TranslationDataConfig(level="subword", vocab_size=30, joint_vocab=False), corpus)
    assert sep_s != sep_t
    assert sep_s.decode(sep_s.encode(src[1])) == src[1] and sep_t.decode(sep_t.encode(tgt[1])) == tgt[1]
    spm = tmp_path / "src.model"
    spm.write_bytes(sep_s.tokenizer.model_proto)
    loaded, _ = build_codecs(TranslationDataConfig(level="subword", joint_vocab=False, src_spm=str(spm),
                                                   vocab_size=30), corpus)
    assert loaded == sep_s
    with pytest.raises(SeqgenError, match="need --level subword"):
        build_codecs(TranslationDataConfig(level="word", src_spm=str(spm)), corpus)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(SeqgenError, match="bad.model: not a usable sentencepiece model"):
        build_codecs(TranslationDataConfig(level="subword", src_spm=str(bad)), corpus)


# -- bad input -----------------------------------------------------------------------------------------
@pytest.fixture
def small_paths(tmp_path):
    src, tgt = make_pairs("reverse", 200, seed=2)
    return {"train": (write_lines(tmp_path / "train.src", src), write_lines(tmp_path / "train.tgt", tgt)),
            "valid": (write_lines(tmp_path / "valid.src", src[:20]), write_lines(tmp_path / "valid.tgt", tgt[:20]))}


def test_mismatched_line_counts_name_both_files(tmp_path, small_paths):
    short = write_lines(tmp_path / "short.tgt", ["1 2"] * 7)
    run = tiny_run({**small_paths, "train": (small_paths["train"][0], short)}, steps=2)
    with pytest.raises(SeqgenError) as e:
        train_translation(run, str(tmp_path / "run"), log=quiet)
    assert f"{small_paths['train'][0]} has 200 lines but {short} has 7" in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_invalid_utf8_names_file_and_line(tmp_path, small_paths):
    bad = tmp_path / "bad.src"
    bad.write_bytes(("1 2\n" * 4).encode() + b"3 \xff 4\n" + ("5 6\n" * 195).encode())
    run = tiny_run({**small_paths, "train": (str(bad), small_paths["train"][1])}, steps=2)
    with pytest.raises(SeqgenError, match=r"bad\.src:5:3: invalid UTF-8"):
        train_translation(run, str(tmp_path / "run"), log=quiet)


def test_empty_lines_are_skipped_and_counted(tmp_path):
    src, tgt = make_pairs("copy", 50, seed=3)
    src[3] = ""
    tgt[10] = "   "
    paths = {"train": (write_lines(tmp_path / "s", src), write_lines(tmp_path / "t", tgt)),
             "valid": (write_lines(tmp_path / "vs", src[20:30]), write_lines(tmp_path / "vt", tgt[20:30]))}
    messages = []
    train_translation(tiny_run(paths, steps=2), str(tmp_path / "run"), log=messages.append)
    assert any("skipped 2 pair(s) with an empty line" in m for m in messages), messages


def test_missing_validation_files_are_required(tmp_path, small_paths):
    run = tiny_run(small_paths, steps=2, src_valid="", tgt_valid="")
    with pytest.raises(SeqgenError, match="--src-valid and --tgt-valid are required"):
        train_translation(run, str(tmp_path / "run"), log=quiet)


def test_non_translation_model_is_refused(tmp_path):
    codec = TextCodec.build("char", ["abc"])
    lm = Seq2Seq(ModelConfig(task="lm", decoder=DecoderConfig(emb=8, hidden=8)), tgt=codec)
    with pytest.raises(SeqgenError, match="'lm' model; translation needs"):
        translate(lm, ["abc"])


def test_long_sources_truncated_with_warning_and_empty_lines_kept(trained, capsys):
    _, _, _, model = trained
    messages = []
    out = translate(model, ["1 2 3", "", " ".join(["4"] * 30)], GenerationConfig(max_len=5), max_src_len=10,
                    warn=messages.append)
    assert len(out) == 3 and out[1] == ""
    assert any("1 sentence(s) longer than 10 tokens were truncated (lines 3)" in m for m in messages)
    assert any("1 empty line(s)" in m for m in messages)
    capsys.readouterr()
    translate(model, ["1 " * 20], GenerationConfig(max_len=3), max_src_len=4)   # without `warn`: a stderr line
    assert "seqgen: warning: 1 sentence(s) longer than 4 tokens were truncated" in capsys.readouterr().err


def test_resume_refuses_other_vocabulary_and_other_spm(tmp_path, small_paths):
    out = tmp_path / "run"
    train_translation(tiny_run(small_paths, steps=4, level="subword", vocab_size=20), str(out), log=quiet)
    with pytest.raises(SeqgenError, match="--level cannot change on --resume"):
        train_translation(tiny_run(small_paths, steps=8), str(out), resume=True,
                          overrides={"data": {"level": "word"}, "train": {"max_steps": 8}}, log=quiet)
    other = TextCodec.build("subword", ["x y z w"] * 20 + ["1 2 3 4 5 6 7 8 9 0"] * 20, vocab_size=18)
    spm = tmp_path / "other.model"
    spm.write_bytes(other.tokenizer.model_proto)
    payload = load_checkpoint(str(out / "last.pt"))
    saved = json.loads(payload["run_config"])
    saved["data"]["src_spm"] = str(spm)       # as if the run had named a file that has changed since
    from seqgen.checkpoint import save_checkpoint
    payload["run_config"] = json.dumps(saved)
    save_checkpoint(str(out / "last.pt"), payload)
    before = os.path.getmtime(out / "last.pt")
    with pytest.raises(SeqgenError, match="other.model: this sentencepiece model does not match the source"):
        train_translation(tiny_run(small_paths), str(out), resume=True, log=quiet)
    assert os.path.getmtime(out / "last.pt") == before


def test_resume_continues_training(tmp_path, small_paths):
    out = tmp_path / "run"
    run = tiny_run(small_paths, steps=6)
    run.train.eval_every = run.train.checkpoint_every = 3
    train_translation(run, str(out), log=quiet)
    state = train_translation(run, str(out), resume=True, overrides={"train": {"max_steps": 9}}, log=quiet)
    assert state.step == 9
    with pytest.raises(SeqgenError, match="already holds a trained model"):
        train_translation(run, str(out), log=quiet)


# -- pictures ------------------------------------------------------------------------------------------
def test_attention_heatmap_and_loss_curve_pngs(tmp_path, trained):
    pytest.importorskip("matplotlib")
    from seqgen.plots import attention_heatmap, loss_curve
    _, paths, _, model = trained
    best = translate_nbest(model, ["3 1 4 1 5"], GenerationConfig(beam=2, max_len=10))[0][0]
    png = attention_heatmap(best.attention, best.source_tokens, best.target_tokens, str(tmp_path / "a.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="attention has shape"):
        attention_heatmap(best.attention, best.source_tokens[:-1], best.target_tokens, str(tmp_path / "b.png"))
    metrics = os.path.join(os.path.dirname(paths["train"][0]), "run", "metrics.jsonl")
    assert os.path.getsize(loss_curve(metrics, str(tmp_path / "curve.png"))) > 1000


def test_tsv_input_and_char_level(tmp_path):
    src, tgt = make_pairs("reverse", 60, seed=4)
    lines = [f"{s}\t{t}" for s, t in zip(src, tgt)]
    train, valid = write_lines(tmp_path / "train.tsv", lines), write_lines(tmp_path / "valid.tsv", lines[:8])
    run = tiny_run({"train": ("", ""), "valid": ("", "")}, steps=2, train_tsv=train, valid_tsv=valid, level="char",
                   joint_vocab=False)
    train_translation(run, str(tmp_path / "run"), log=quiet)
    model = load_model(str(tmp_path / "run" / "best.pt"), task="translation")
    assert model.src.level == "char" and " " in model.src.vocab
    both = tiny_run({"train": (train, train), "valid": ("", "")}, steps=2, train_tsv=train, valid_tsv=valid)
    with pytest.raises(SeqgenError, match="either --train-tsv or --src-train/--tgt-train"):
        train_translation(both, str(tmp_path / "run2"), log=quiet)
