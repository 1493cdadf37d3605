"""Translation: parallel text -> RNN text encoder -> the shared attentional decoder -> detokenized text.

    run = TranslationRunConfig(data=TranslationDataConfig(src_train="train.de", tgt_train="train.en",
                                                          src_valid="val.de", tgt_valid="val.en"))
    train_translation(run, "runs/de-en")
    model = load_model("runs/de-en/best.pt", task="translation")
    translate(model, ["Ein Hund läuft im Schnee."], GenerationConfig(beam=5))

Every source sentence is encoded as its tokens followed by <eos> (training and inference alike); targets are
`<bos> ... <eos>`. Validation decodes the held-out source with `eval` (greedy by default) and scores it with
sacreBLEU (cased, 13a), which picks the best checkpoint and drives early stopping.
"""
from __future__ import annotations

import math
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from seqgen.config import to_dict
from seqgen.data.batch import Batch
from seqgen.data.batching import BucketBatchSampler, pad_sequences
from seqgen.data.parallel import ParallelCorpus, filter_by_length, read_parallel, read_tsv
from seqgen.data.text import read_bytes
from seqgen.decoders.rnn import DecoderConfig
from seqgen.distributed import entry_point, is_main_process
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.errors import LINE_BREAKS, SeqgenError, report_out_of_memory
from seqgen.model import GenerationConfig, ModelConfig, Seq2Seq
from seqgen.tokenizers import SubwordTokenizer, TextCodec
from seqgen.train import (Trainer, TrainConfig, TrainState, check_out_dir, load_resume_run,
                          seed_everything)
from seqgen.vocab import SPECIALS, Vocab

DEFAULT_MAX_SRC_LEN = 256   # translate(): longer sources (in tokens) are truncated with a warning


@dataclass
class TranslationDataConfig:
    src_train: str = ""            # aligned plain-text files, one sentence per line ...
    tgt_train: str = ""
    train_tsv: str = ""            # ... or one `source<TAB>target` file
    src_valid: str = ""            # held-out pairs for validation BLEU (or valid_tsv)
    tgt_valid: str = ""
    valid_tsv: str = ""
    level: Literal["char", "word", "subword"] = "subword"
    joint_vocab: bool = True       # one vocabulary (one sentencepiece model) for source and target
    vocab_size: int = 8000         # subword: sentencepiece pieces per model
    model_type: Literal["bpe", "unigram"] = "bpe"
    src_spm: str = ""              # subword: an existing sentencepiece .model file (then nothing is trained)
    tgt_spm: str = ""              # (with joint_vocab, one of src_spm/tgt_spm serves both sides)
    min_freq: int = 1              # char/word: rarer tokens become <unk>
    max_vocab: int = 0             # char/word: vocabulary cap including specials; 0 = none
    max_len: int = 100             # training pairs with more tokens on either side are dropped
    max_tokens: int = 0            # token budget per batch (padded source or target); 0 = use batch_size
    batch_size: int = 64           # sentences per batch when max_tokens is 0
    valid_batch_size: int = 64     # sentences per batch when decoding the validation set


@dataclass
class TranslationRunConfig:
    data: TranslationDataConfig = field(default_factory=TranslationDataConfig)
    encoder: RNNEncoderConfig = field(default_factory=lambda: RNNEncoderConfig(
        cell="gru", emb=256, hidden=512, layers=1, bidirectional=True, dropout=0.2))
    # Bahdanau attention with input feeding: 2x slower per token than the no-input-feeding Luong model
    # (whose decoder RNN runs the whole target in one call) but it learns far more per step: on Multi30k
    # after 20 minutes it scored 40.6 BLEU against 35.2 (docs/performance.md), so it is the default.
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        cell="gru", emb=256, hidden=512, layers=1, attention="bahdanau", input_feeding=True,
        tie_embeddings=False, dropout=0.2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=2e-3, warmup_steps=200, schedule="cosine", label_smoothing=0.1, max_steps=20000,
        eval_every=1000, checkpoint_every=1000, patience=0))
    eval: GenerationConfig = field(default_factory=lambda: GenerationConfig(beam=1, max_len=100))


# Changing any of these on --resume would change the vocabulary the checkpoint's weights were trained with.
_VOCAB_KEYS = ("level", "joint_vocab", "vocab_size", "model_type", "src_spm", "tgt_spm", "min_freq", "max_vocab")


# -- data ----------------------------------------------------------------------------------------------
def read_corpus(src: str, tgt: str, tsv: str, *, what: str) -> tuple[ParallelCorpus, str]:
    """Read a parallel corpus from two aligned files or one TSV; returns it and a name for messages."""
    flag = "train" if what == "training" else "valid"
    if tsv and (src or tgt):
        raise SeqgenError(f"give either --{flag}-tsv or --src-{flag}/--tgt-{flag}, not both")
    if tsv:
        return read_tsv(tsv), tsv
    if not src or not tgt:
        missing = [f for f, v in ((f"--src-{flag}", src), (f"--tgt-{flag}", tgt)) if not v]
        need = "" if what == "training" else " (validation BLEU picks the best checkpoint)"
        raise SeqgenError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: the {what} "
                          f"source and target files{need}, or --{flag}-tsv")
    return read_parallel(src, tgt), f"{src} / {tgt}"


def _codec_from_spm(path: str) -> TextCodec:
    """A subword codec from a sentencepiece .model file (the vocabulary: specials + its pieces)."""
    try:
        sub = SubwordTokenizer(read_bytes(path))
    except SeqgenError as e:
        raise SeqgenError(f"{path}: not a usable sentencepiece model ({e})") from None
    return TextCodec(sub, Vocab([*SPECIALS, *(p for p in sub.pieces() if p not in SPECIALS)]))


def build_codecs(data: TranslationDataConfig, corpus: ParallelCorpus) -> tuple[TextCodec, TextCodec]:
    """Source and target codecs: loaded from --src-spm/--tgt-spm, or fitted to the training corpus."""
    if (data.src_spm or data.tgt_spm) and data.level != "subword":
        raise SeqgenError("--src-spm/--tgt-spm are sentencepiece models: they need --level subword")
    kw = dict(min_freq=data.min_freq, max_size=data.max_vocab or None, vocab_size=data.vocab_size,
              model_type=data.model_type)
    if data.joint_vocab:
        if data.src_spm and data.tgt_spm and read_bytes(data.src_spm) != read_bytes(data.tgt_spm):
            raise SeqgenError(f"--joint-vocab needs one sentencepiece model, but {data.src_spm} and {data.tgt_spm} "
                              f"differ; pass one of them, or --joint-vocab false")
        spm = data.src_spm or data.tgt_spm
        codec = _codec_from_spm(spm) if spm else TextCodec.build(data.level, corpus.src + corpus.tgt, **kw)
        return codec, codec
    src = _codec_from_spm(data.src_spm) if data.src_spm else TextCodec.build(data.level, corpus.src, **kw)
    tgt = _codec_from_spm(data.tgt_spm) if data.tgt_spm else TextCodec.build(data.level, corpus.tgt, **kw)
    return src, tgt


def check_codecs_match(model: Seq2Seq, data: TranslationDataConfig, where: str) -> None:
    """The sentencepiece models named in `data` must be the ones inside the checkpoint `where`."""
    for side, path, codec in (("source", data.src_spm, model.src), ("target", data.tgt_spm, model.tgt)):
        if not path:
            continue
        if codec is None or codec != _codec_from_spm(path):
            raise SeqgenError(f"{path}: this sentencepiece model does not match the {side} vocabulary inside {where}; "
                              f"use the model the checkpoint was trained with (nothing was changed)")


def encode_source(codec: TextCodec, text: str) -> list[int]:
    """Source ids as the encoder sees them: tokens then <eos>."""
    return codec.encode(text, eos=True)


class ParallelBatches:
    """Bucketed batches of (source [B, S] + lengths, target [B, T+1] `bos ... eos`); a `BatchSource`.

    Deterministic for (seed, epoch), so a resumed run sees the same batches from the same position.
    """

    def __init__(self, src_ids: list[list[int]], tgt_ids: list[list[int]], *, pad: int, bos: int, eos: int,
                 max_tokens: int = 0, batch_size: int = 64, seed: int = 0, shuffle: bool = True):
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
        self.src = src_ids
        self.tgt = [[bos, *t, eos] for t in tgt_ids]
        self.pad = pad
        cost = [max(len(s), len(t) - 1) for s, t in zip(self.src, self.tgt)]
        self.sampler = BucketBatchSampler(cost, max_tokens=max_tokens or None,
                                          batch_size=None if max_tokens else batch_size,
                                          shuffle=shuffle, seed=seed)

    def num_batches(self, epoch: int) -> int:
        return len(self.sampler.batches(epoch))

    def make_batch(self, idx: Sequence[int]) -> Batch:
        source, lengths = pad_sequences([self.src[i] for i in idx], self.pad)
        target, _ = pad_sequences([self.tgt[i] for i in idx], self.pad)
        return Batch(target=target, source=source, source_lengths=lengths,
                     index=torch.as_tensor(list(idx), dtype=torch.long))

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[Batch]:
        """Batches [start:stop:step] of the epoch's list (a process's share under data parallelism)."""
        for idx in self.sampler.batches(epoch)[start:stop:step]:
            yield self.make_batch(idx)


def training_batches(corpus: ParallelCorpus, src_codec: TextCodec, tgt_codec: TextCodec,
                     data: TranslationDataConfig, *, seed: int, name: str = "training data",
                     warn: Callable[[str], None] | None = None) -> ParallelBatches:
    """Encode the training pairs, drop those longer than `data.max_len` tokens (warning with the count) and
    bucket them into batches of `data.max_tokens` tokens (or `data.batch_size` sentences)."""
    src_ids = [encode_source(src_codec, s) for s in corpus.src]
    tgt_ids = [tgt_codec.encode(t) for t in corpus.tgt]
    keep, dropped = filter_by_length([s[:-1] for s in src_ids], tgt_ids, data.max_len)
    if dropped and warn is not None:
        warn(f"seqgen: warning: {name}: filtered {dropped} of {len(src_ids)} pair(s) longer than --max-len "
             f"{data.max_len} tokens")
    if not keep:
        raise SeqgenError(f"{name}: every pair is longer than --max-len {data.max_len} tokens; raise --max-len")
    vocab = tgt_codec.vocab
    return ParallelBatches([src_ids[i] for i in keep], [tgt_ids[i] for i in keep], pad=vocab.pad, bos=vocab.bos,
                           eos=vocab.eos, max_tokens=data.max_tokens, batch_size=data.batch_size, seed=seed)


# -- inference ----------------------------------------------------------------------------------------
@dataclass
class Translation:
    """One hypothesis for one source sentence.

    score: the search score (length-penalised for beam search); log_prob: its total log-probability.
    source_tokens / target_tokens: token strings as the model saw and produced them (with "<eos>" where the
    model read or wrote one).  attention: [len(target_tokens), len(source_tokens)] weights, or None.
    """

    text: str
    score: float
    log_prob: float
    source_tokens: list[str] = field(default_factory=list)
    target_tokens: list[str] = field(default_factory=list)
    attention: Tensor | None = None


def _require_translation(model: Seq2Seq) -> None:
    if model.config.task != "translation" or model.src is None:
        raise SeqgenError(f"this is a {model.config.task!r} model; translation needs a model trained with "
                          f"`seqgen train translation`")


def _default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# A subword vocabulary can hold line breaks (learned from a lone CR in the training text), and one inside a
# translation would break one-line-per-sentence output.
_LINE_BREAK = re.compile(f"[{LINE_BREAKS}]")


def _hypothesis_to_translation(model: Seq2Seq, hyp, src_tokens: list[str]) -> Translation:
    ids = [int(t) for t in hyp.tokens]                  # without bos and the final eos
    tgt_tokens = model.tgt.vocab.tokens(ids)
    attn = hyp.attention
    if attn is not None:
        if attn.size(0) > len(ids):                     # the step that wrote <eos> has attention too
            tgt_tokens.append(model.tgt.vocab.tokens([model.tgt.vocab.eos])[0])
        attn = attn[: len(tgt_tokens), : len(src_tokens)].detach().float().cpu()
    return Translation(text=_LINE_BREAK.sub(" ", model.tgt.decode(ids)), score=float(hyp.score),
                       log_prob=float(hyp.log_prob), source_tokens=src_tokens, target_tokens=tgt_tokens, attention=attn)


def translate_nbest(model: Seq2Seq, sentences: Sequence[str], gen: GenerationConfig | None = None, *,
                    batch_size: int = 64, max_src_len: int = DEFAULT_MAX_SRC_LEN, seed: int = 1,
                    warn: Callable[[str], None] | None = None) -> list[list[Translation]]:
    """Translate `sentences`; returns, per sentence and in input order, gen.n_best hypotheses best first
    (one for greedy and sampling).

    Sentences are sorted by length and decoded `batch_size` at a time. A source longer than `max_src_len`
    tokens is truncated, and an empty one gives an empty translation; both are counted in one warning each.
    """
    _require_translation(model)
    gen = gen or GenerationConfig(beam=5)
    gen.validate()
    if batch_size < 1:
        raise SeqgenError(f"--batch-size must be >= 1, got {batch_size}")
    if max_src_len < 1:
        raise SeqgenError(f"--max-src-len must be >= 1, got {max_src_len}")
    warn = warn or _default_warn
    src = model.src
    results: list[list[Translation]] = [[] for _ in sentences]
    ids: dict[int, list[int]] = {}
    truncated, empty = [], 0
    for i, text in enumerate(sentences):
        text = text.strip()
        if not text:
            empty += 1
            results[i] = [Translation(text="", score=0.0, log_prob=0.0)]
            continue
        x = src.encode(text)
        if len(x) > max_src_len:
            truncated.append(i + 1)
            x = x[:max_src_len]
        ids[i] = x + [src.vocab.eos]
    if truncated:
        shown = ", ".join(map(str, truncated[:10])) + (", ..." if len(truncated) > 10 else "")
        warn(f"{len(truncated)} sentence(s) longer than {max_src_len} tokens were truncated (lines {shown}); "
             f"raise --max-src-len to translate them whole")
    if empty:
        warn(f"{empty} empty line(s) left empty in the output")
    order = sorted(ids, key=lambda i: len(ids[i]), reverse=True)
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed) if gen.temperature > 0 else None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        tokens, lengths = pad_sequences([ids[i] for i in chunk], src.vocab.pad)
        with report_out_of_memory(f"translating a batch of {len(chunk)} sentences x {tokens.size(1)} tokens "
                                  f"(beam {gen.beam})", f"lower --batch-size (now {batch_size}) or --beam"):
            hyps = model.generate(tokens.to(device), lengths, gen=gen, generator=generator)
        for i, hs in zip(chunk, hyps):
            src_tokens = src.vocab.tokens(ids[i])
            results[i] = [_hypothesis_to_translation(model, h, src_tokens) for h in hs]
    return results


def translate(model: Seq2Seq, sentences: Sequence[str], gen: GenerationConfig | None = None, *,
              batch_size: int = 64, max_src_len: int = DEFAULT_MAX_SRC_LEN, seed: int = 1,
              warn: Callable[[str], None] | None = None) -> list[str]:
    """Translate `sentences` (batched, sorted by length inside); returns the best translation of each, in order."""
    return [hs[0].text for hs in translate_nbest(model, sentences, gen, batch_size=batch_size,
                                                 max_src_len=max_src_len, seed=seed, warn=warn)]


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """sacreBLEU BLEU and chrF (defaults: cased, 13a) with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": b.score, "chrf": c.score,
            "bleu_line": b.format(signature=str(bleu.get_signature())),
            "chrf_line": c.format(signature=str(chrf.get_signature()))}


# -- training -----------------------------------------------------------------------------------------
def make_evaluate(valid: ParallelCorpus, gen: GenerationConfig,
                  batch_size: int) -> Callable[[Seq2Seq], dict[str, float]]:
    """Validation: decode the held-out source with `gen`, sacreBLEU against the references, and the
    teacher-forced loss (nats per target token)."""
    cache: list[ParallelBatches] = []

    def evaluate(model: Seq2Seq) -> dict[str, float]:
        hyps = translate(model, valid.src, gen, batch_size=batch_size, warn=lambda m: None)
        from sacrebleu.metrics import BLEU, CHRF
        metrics = {"bleu": BLEU().corpus_score(hyps, [valid.tgt]).score,
                   "chrf": CHRF().corpus_score(hyps, [valid.tgt]).score}
        if not cache:   # the codecs never change during a run: encode the references once
            src, tgt = model.src, model.tgt
            cache.append(ParallelBatches([encode_source(src, s) for s in valid.src],
                                         [tgt.encode(t) for t in valid.tgt], pad=tgt.vocab.pad,
                                         bos=tgt.vocab.bos, eos=tgt.vocab.eos, batch_size=batch_size,
                                         shuffle=False))
        total, count = 0.0, 0
        for batch in cache[0].iter_batches(0):
            loss, n = model.loss(batch.to(model.device))
            total += loss.item() * n
            count += n
        metrics["loss"] = total / max(count, 1)
        metrics["ppl"] = math.exp(min(metrics["loss"], 50.0))
        return metrics

    return evaluate


@entry_point
def train_translation(run: TranslationRunConfig, out_dir: str, *, resume: bool = False,
                      overrides: dict | None = None, log: Callable[[str], None] | None = None) -> TrainState:
    """Train (or resume) a translation model; checkpoints and metrics.jsonl go to `out_dir`.

    Validation BLEU (sacreBLEU, decoding with `run.eval`) every `run.train.eval_every` steps picks best.pt
    and drives early stopping (`run.train.patience`). Under torchrun every process calls this (data
    parallelism, see seqgen/distributed.py); process 0 alone prints.
    """
    say = (log or _stderr) if is_main_process() else _quiet
    resume_path = check_out_dir(out_dir, resume)
    model: Seq2Seq | None = None
    if resume_path:
        run, model = load_resume_run(resume_path, "translation", TranslationRunConfig, overrides,
                                     vocab_keys=_VOCAB_KEYS)
        check_codecs_match(model, run.data, resume_path)
    d = run.data
    if d.max_len < 1:
        raise SeqgenError(f"--max-len must be >= 1, got {d.max_len}")
    if d.max_tokens < 0 or d.batch_size < 1 or d.valid_batch_size < 1:
        raise SeqgenError("--max-tokens must be >= 0 and --batch-size/--valid-batch-size >= 1")
    run.eval.validate()

    corpus, train_name = read_corpus(d.src_train, d.tgt_train, d.train_tsv, what="training")
    valid, valid_name = read_corpus(d.src_valid, d.tgt_valid, d.valid_tsv, what="validation")
    for name, c in ((train_name, corpus), (valid_name, valid)):
        if c.skipped_empty:
            say(f"seqgen: warning: {name}: skipped {c.skipped_empty} pair(s) with an empty line on either side")
    if len(corpus) == 0 or len(valid) == 0:
        raise SeqgenError(f"{train_name if len(corpus) == 0 else valid_name}: no sentence pairs left after "
                          f"skipping empty lines")

    if model is None:
        t0 = time.perf_counter()
        src_codec, tgt_codec = build_codecs(d, corpus)
        if d.level == "subword" and not (d.src_spm or d.tgt_spm):
            say(f"trained sentencepiece ({d.model_type}, {'joint' if d.joint_vocab else 'separate'}) "
                f"in {time.perf_counter() - t0:.1f}s")
        seed_everything(run.train.seed)
        try:
            model = Seq2Seq(ModelConfig(task="translation", decoder=run.decoder, text_encoder=run.encoder),
                            tgt=tgt_codec, src=src_codec)
        except ValueError as e:
            raise SeqgenError(f"model config: {e}") from None
    src_codec, tgt_codec = model.src, model.tgt
    data = training_batches(corpus, src_codec, tgt_codec, d, seed=run.train.seed, name=train_name, warn=say)

    evaluate = make_evaluate(valid, run.eval, d.valid_batch_size)
    trainer = Trainer(model, data, evaluate, run.train, out_dir, metric="bleu", mode="max",
                      run_config=to_dict(run), log=log)
    if resume_path:
        trainer.resume(resume_path)
    else:
        n_src = sum(len(s) for s in data.src)
        n_tgt = sum(len(t) - 1 for t in data.tgt)
        vocab = (f"joint vocabulary {len(tgt_codec.vocab)}" if src_codec is tgt_codec or src_codec == tgt_codec
                 else f"vocabularies {len(src_codec.vocab)} / {len(tgt_codec.vocab)}")
        trainer.log(f"{train_name}: {len(data.src):,} pairs ({n_src:,} source / {n_tgt:,} target tokens), "
                     f"{data.num_batches(0):,} batches per epoch; {valid_name}: {len(valid):,} pairs; {vocab} "
                     f"({d.level}); {sum(p.numel() for p in model.parameters()):,} parameters")
    return trainer.train()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _quiet(_message: str) -> None:
    pass


__all__ = ["TranslationDataConfig", "TranslationRunConfig", "Translation", "ParallelBatches", "train_translation",
           "translate", "translate_nbest", "corpus_scores", "read_corpus", "build_codecs", "encode_source",
           "training_batches", "make_evaluate"]
