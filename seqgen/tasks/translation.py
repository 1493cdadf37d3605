"""Translation: parallel text -> RNN text encoder -> the shared attentional decoder -> detokenized text.

    run = TranslationRunConfig(data=TranslationDataConfig(src_train="train.de", tgt_train="train.en",
                                                          src_valid="val.de", tgt_valid="val.en"))
    train_translation(run, "runs/de-en")
    model = load_model("runs/de-en/best.pt", task="translation")
    translate(model, ["Ein Hund läuft im Schnee."], GenerationConfig(beam=5))   # seqgen.inference.translation

This module is the task's wiring: its run config, reading the corpus, the vocabularies, training and
validation. Every source sentence is encoded as its tokens followed by <eos> (training and inference alike);
targets are `<bos> ... <eos>`. Validation decodes the held-out source with `eval` (greedy by default) and
scores it with sacreBLEU (cased, 13a), which picks the best checkpoint and drives early stopping.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import numpy as np

from seqgen.config import MAX_VOCAB, Bounds, Count, File, Folder, Positive, Tokens, to_dict, validate
from seqgen.data.line_chunks import Sources, count_tokens, sample_pairs
from seqgen.data.parallel import ParallelBatches, ParallelCorpus, filter_by_length, read_parallel, read_tsv
from seqgen.data.prepared import PreparedPairs, cached_codecs, input_digests, prepare_pairs
from seqgen.data.text import file_digest, open_binary, read_bytes
from seqgen.decoders.rnn import DecoderConfig
from seqgen.distributed import entry_point, is_main_process, setup
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.inference.translation import translate
from seqgen.log import Log, main_process_log, quiet, warning
from seqgen.metrics import corpus_scores, perplexity
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.runs import check_out_dir, data_fingerprint, holds_run_folder, load_init_model, load_resume_run
from seqgen.tokenizers import SubwordTokenizer, TextCodec, make_tokenizer
from seqgen.train import Trainer, TrainConfig, TrainState, seed_everything
from seqgen.vocab import SPECIALS, Vocab


@dataclass
class TranslationDataConfig:
    """The translation data: parallel text for training and validation, the vocabularies, the batches.

    src_train:        training source sentences, one per line, aligned line by line with tgt_train
    tgt_train:        training target sentences, one per line
    train_tsv:        instead of src_train and tgt_train: one file of source<TAB>target lines
    src_valid:        held-out source sentences for validation BLEU, aligned with tgt_valid
    tgt_valid:        held-out target sentences
    valid_tsv:        instead of src_valid and tgt_valid: one file of source<TAB>target lines
    level:            tokens: characters, words or sentencepiece subwords
    joint_vocab:      one vocabulary (one sentencepiece model) for source and target
    vocab_size:       subword: sentencepiece pieces per model
    model_type:       subword: the sentencepiece algorithm
    src_spm:          subword: an existing sentencepiece .model file for the source (then none is trained)
    tgt_spm:          subword: the same for the target (with joint_vocab, one of the two serves both sides)
    min_freq:         char/word: rarer tokens become <unk>
    max_vocab:        char/word: vocabulary cap including specials; 0 = none
    max_len:          training pairs with more tokens than this on either side are dropped (at most 10,000)
    max_tokens:       token budget per batch (padded source or target); 0 = batch_size sentences per batch
    batch_size:       sentences per batch when max_tokens is 0
    valid_batch_size: sentences per batch when decoding the validation set
    vocab_sample:     subword: sentencepiece trains on at most this many training pairs, a seeded random sample
                      (0 = all of them)
    prepared_dir:     the folder of the prepared data (the training pairs tokenized once, memory-mapped, and the
                      fitted vocabularies); without it, OUT/prepared. Runs that share one skip the tokenizing
    prepare_workers:  processes that tokenize the training pairs; 0 = one per core
    """

    src_train: File = ""
    tgt_train: File = ""
    train_tsv: File = ""
    src_valid: File = ""
    tgt_valid: File = ""
    valid_tsv: File = ""
    level: Literal["char", "word", "subword"] = "subword"
    joint_vocab: bool = True
    vocab_size: Annotated[int, Bounds(1, MAX_VOCAB)] = 8000
    model_type: Literal["bpe", "unigram"] = "bpe"
    src_spm: File = ""
    tgt_spm: File = ""
    min_freq: Positive = 1
    max_vocab: Annotated[int, Bounds(0, MAX_VOCAB)] = 0
    max_len: Tokens = 100
    max_tokens: Count = 0
    batch_size: Positive = 64
    valid_batch_size: Positive = 64
    vocab_sample: Count = 1_000_000
    prepared_dir: Folder = ""
    prepare_workers: Count = 0


@dataclass
class TranslationRunConfig:
    """A translation run: `seqgen train translation`'s flags and YAML keys, section by section.

    The decoder defaults to Bahdanau attention with input feeding: slower per token than the Luong model
    without it (whose decoder RNN runs the whole target in one call), but it learns so much more per step
    that it is ahead after the same training time (docs/performance.md, "Translation").
    """

    data: TranslationDataConfig = field(default_factory=TranslationDataConfig)
    encoder: RNNEncoderConfig = field(default_factory=lambda: RNNEncoderConfig(
        cell="gru", emb=256, hidden=512, layers=1, bidirectional=True, dropout=0.2))
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        cell="gru", emb=256, hidden=512, layers=1, attention="bahdanau", input_feeding=True,
        tie_embeddings=False, dropout=0.2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=2e-3, warmup_steps=200, schedule="cosine", label_smoothing=0.1, max_steps=20000,
        eval_every=1000, checkpoint_every=1000, patience=0))
    eval: GenerationConfig = field(default_factory=lambda: GenerationConfig(beam=1, max_len=100))


# Changing any of these on --resume would change the vocabulary the checkpoint's weights were trained with.
_VOCAB_KEYS = ("level", "joint_vocab", "vocab_size", "model_type", "src_spm", "tgt_spm", "min_freq", "max_vocab",
               "vocab_sample")


# -- data ----------------------------------------------------------------------------------------------
def corpus_sources(src: str, tgt: str, tsv: str, *, what: str) -> Sources:
    """The files of a parallel corpus, two aligned files or one TSV; SeqgenError naming the flags missing."""
    flag = "train" if what == "training" else "valid"
    if tsv and (src or tgt):
        raise SeqgenError(f"give either --{flag}-tsv or --src-{flag}/--tgt-{flag}, not both")
    if not tsv and (not src or not tgt):
        missing = [f for f, v in ((f"--src-{flag}", src), (f"--tgt-{flag}", tgt)) if not v]
        need = "" if what == "training" else " (validation BLEU picks the best checkpoint)"
        raise SeqgenError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: the {what} "
                          f"source and target files{need}, or --{flag}-tsv")
    return Sources(src=src, tgt=tgt, tsv=tsv) if not tsv else Sources(tsv=tsv)


def read_corpus(src: str, tgt: str, tsv: str, *, what: str) -> tuple[ParallelCorpus, str]:
    """Read a parallel corpus from two aligned files or one TSV; returns it and a name for messages."""
    files = corpus_sources(src, tgt, tsv, what=what)
    return (read_tsv(tsv) if tsv else read_parallel(src, tgt)), files.name


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


def fit_codecs(data: TranslationDataConfig, sources: Sources, prepared_dir: str, *,
               log: Log) -> tuple[TextCodec, TextCodec]:
    """build_codecs for a training corpus on disk, in bounded memory: sentencepiece trains on a seeded sample
    of at most `data.vocab_sample` pairs, char/word vocabularies count every token on all cores. The result
    is kept in `prepared_dir` for the next run on the same files and settings."""
    if (data.src_spm or data.tgt_spm) and data.level != "subword":
        raise SeqgenError("--src-spm/--tgt-spm are sentencepiece models: they need --level subword")
    if data.src_spm and data.tgt_spm or data.joint_vocab and (data.src_spm or data.tgt_spm):
        return build_codecs(data, ParallelCorpus(src=[], tgt=[]))      # nothing is fitted to the corpus
    spms = [(file_digest(p) or {}).get("sha256", p) for p in (data.src_spm, data.tgt_spm) if p]
    key = {"inputs": [[d["size"], d["mtime"], d["sha256"]] for d in input_digests(sources).values()],
           "settings": {k: getattr(data, k) for k in _VOCAB_KEYS if not k.endswith("_spm")}, "spm": spms}

    def fit() -> tuple[TextCodec, TextCodec]:
        t0 = time.perf_counter()
        if data.level == "subword":
            src, tgt, lines = sample_pairs(sources, data.vocab_sample, seed=0)
            codecs = build_codecs(data, ParallelCorpus(src=src, tgt=tgt))
            sample = (f"a random sample of {len(src):,} of {lines:,} pairs (--vocab-sample {data.vocab_sample:,})"
                      if data.vocab_sample and lines > data.vocab_sample else f"{len(src):,} pairs")
            log(f"trained sentencepiece ({data.model_type}, {'joint' if data.joint_vocab else 'separate'}) on "
                f"{sample} in {time.perf_counter() - t0:.1f}s")
            return codecs
        src_counts, tgt_counts, _ = count_tokens(sources, data.level, workers=data.prepare_workers or None)
        tok, kw = make_tokenizer(data.level), dict(min_freq=data.min_freq, max_size=data.max_vocab or None)
        if data.joint_vocab:
            codec = TextCodec(tok, Vocab.from_counts(src_counts + tgt_counts, **kw))
            return codec, codec
        return TextCodec(tok, Vocab.from_counts(src_counts, **kw)), TextCodec(tok, Vocab.from_counts(tgt_counts, **kw))

    src, tgt, _ = cached_codecs(prepared_dir, key, fit, log=log)
    return (src, src) if data.joint_vocab else (src, tgt)


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


def training_batches(corpus: ParallelCorpus, src_codec: TextCodec, tgt_codec: TextCodec,
                     data: TranslationDataConfig, *, seed: int, name: str = "training data",
                     warn: Log | None = None) -> ParallelBatches:
    """Encode the training pairs, drop those longer than `data.max_len` tokens (warning with the count) and
    bucket them into batches of `data.max_tokens` tokens (or `data.batch_size` sentences)."""
    src_ids = [encode_source(src_codec, s) for s in corpus.src]
    tgt_ids = [tgt_codec.encode(t) for t in corpus.tgt]
    keep, dropped = filter_by_length([s[:-1] for s in src_ids], tgt_ids, data.max_len)
    if dropped and warn is not None:
        warn(warning(f"{name}: filtered {dropped} of {len(src_ids)} pair(s) longer than --max-len "
                     f"{data.max_len} tokens"))
    if not keep:
        raise SeqgenError(f"{name}: every pair is longer than --max-len {data.max_len} tokens; raise --max-len")
    vocab = tgt_codec.vocab
    return ParallelBatches([src_ids[i] for i in keep], [tgt_ids[i] for i in keep], pad=vocab.pad, bos=vocab.bos,
                           eos=vocab.eos, max_tokens=data.max_tokens, batch_size=data.batch_size, seed=seed)


def prepared_batches(prepared: PreparedPairs, src_codec: TextCodec, tgt_codec: TextCodec,
                     data: TranslationDataConfig, *, seed: int, name: str = "training data",
                     warn: Log | None = None) -> ParallelBatches:
    """training_batches over the memory-mapped pairs of a prepared-data cache: the same filter, warning and
    batches for the same pairs and seed, with the lengths as arrays and no Python list per sentence."""
    src_len, tgt_len = prepared.src.lengths(), prepared.tgt.lengths()
    keep = np.flatnonzero((src_len <= data.max_len) & (tgt_len <= data.max_len))
    keep = keep.astype(np.int32) if len(src_len) < 2 ** 31 else keep      # 4 bytes a kept pair
    total = len(src_len)
    dropped = total - len(keep)
    del src_len, tgt_len
    if dropped and warn is not None:
        warn(warning(f"{name}: filtered {dropped} of {total} pair(s) longer than --max-len "
                     f"{data.max_len} tokens"))
    if not len(keep):
        raise SeqgenError(f"{name}: every pair is longer than --max-len {data.max_len} tokens; raise --max-len")
    whole = dropped == 0     # no row index array when every pair is kept
    src = prepared.src if whole else prepared.src.take(keep)
    tgt = prepared.tgt if whole else prepared.tgt.take(keep)
    vocab = tgt_codec.vocab
    return ParallelBatches(src, tgt, pad=vocab.pad, bos=vocab.bos, eos=vocab.eos, max_tokens=data.max_tokens,
                           batch_size=data.batch_size, seed=seed, src_eos=True)


def prepare_translation(data: TranslationDataConfig, *, log: Log | None = None) -> PreparedPairs:
    """`seqgen prepare translation`: fit the vocabulary and tokenize the training pairs into
    `data.prepared_dir` ahead of training (a run given the same --prepared-dir and files starts at once)."""
    validate(data)
    say = main_process_log(log, True)
    if not data.prepared_dir:
        raise SeqgenError("--prepared-dir is required: the folder to prepare the data in (then pass the same "
                          "--prepared-dir to seqgen train translation)")
    sources = corpus_sources(data.src_train, data.tgt_train, data.train_tsv, what="training")
    src, tgt = fit_codecs(data, sources, data.prepared_dir, log=say)
    prepared = prepare_pairs(sources, src, tgt, data.prepared_dir, workers=data.prepare_workers or None, log=say)
    if prepared.skipped_empty:
        say(warning(f"{sources.name}: skipped {prepared.skipped_empty} pair(s) with an empty line on either side"))
    return prepared


# -- training -----------------------------------------------------------------------------------------
def make_evaluate(valid: ParallelCorpus, gen: GenerationConfig,
                  batch_size: int) -> Callable[[Seq2Seq], dict[str, float]]:
    """Validation: decode the held-out source with `gen`, sacreBLEU against the references, and the
    teacher-forced loss (nats per target token)."""
    cache: list[ParallelBatches] = []

    def evaluate(model: Seq2Seq) -> dict[str, float]:
        hyps = translate(model, valid.src, gen, batch_size=batch_size, warn=quiet)
        scores = corpus_scores(hyps, valid.tgt)
        metrics = {"bleu": scores["bleu"], "chrf": scores["chrf"]}
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
        metrics["ppl"] = perplexity(metrics["loss"], finite=True)
        return metrics

    return evaluate


@entry_point
@holds_run_folder
def train_translation(run: TranslationRunConfig, out_dir: str, *, resume: bool = False,
                      overrides: dict | None = None, log: Log | None = None,
                      allow_data_change: bool = False) -> TrainState:
    """Train (or resume) a translation model; checkpoints and metrics.jsonl go to `out_dir`.

    Validation BLEU (sacreBLEU, decoding with `run.eval`) every `run.train.eval_every` steps picks best.pt
    and drives early stopping (`run.train.patience`). Under torchrun every process calls this (data
    parallelism, see seqgen/distributed.py); process 0 alone prints. allow_data_change: resume although a
    data file is not the one the checkpoint was trained on.
    """
    validate(run)
    say = main_process_log(log, is_main_process())
    resume_path = check_out_dir(out_dir, resume)
    model: Seq2Seq | None = None
    if resume_path:
        run, model = load_resume_run(resume_path, "translation", TranslationRunConfig, overrides,
                                     vocab_keys=_VOCAB_KEYS, allow_data_change=allow_data_change)
        check_codecs_match(model, run.data, resume_path)
    elif run.train.init_from:
        run, model = load_init_model(run, overrides, "translation", vocab_keys=_VOCAB_KEYS,
                                     sections={"encoder": "text_encoder", "decoder": "decoder"})
        check_codecs_match(model, run.data, run.train.init_from)
        seed_everything(run.train.seed)
    d = run.data

    sources = corpus_sources(d.src_train, d.tgt_train, d.train_tsv, what="training")
    for path in sources.paths:
        open_binary(path).close()     # a missing or unreadable file: one line before anything else happens
    train_name = sources.name
    valid, valid_name = read_corpus(d.src_valid, d.tgt_valid, d.valid_tsv, what="validation")
    dist = setup(run.train.device)
    prepared_dir = d.prepared_dir or os.path.join(out_dir, "prepared")
    # a new run's own OUT/prepared goes again when the run fails before training: a rejected run writes nothing
    own = not d.prepared_dir and not os.path.exists(prepared_dir) and dist.is_main
    try:
        with dist.main_first():     # process 0 fits and tokenizes; the others open what it wrote
            if model is None:
                src_codec, tgt_codec = fit_codecs(d, sources, prepared_dir, log=say)
                seed_everything(run.train.seed)
                try:
                    model = Seq2Seq(ModelConfig(task="translation", decoder=run.decoder, text_encoder=run.encoder),
                                    tgt=tgt_codec, src=src_codec)
                except ValueError as e:
                    raise SeqgenError(f"model config: {e}") from None
            prepared = prepare_pairs(sources, model.src, model.tgt, prepared_dir, workers=d.prepare_workers or None,
                                     log=say)
    except BaseException:
        if own:
            shutil.rmtree(prepared_dir, ignore_errors=True)
        raise
    for name, skipped in ((train_name, prepared.skipped_empty), (valid_name, valid.skipped_empty)):
        if skipped:
            say(warning(f"{name}: skipped {skipped} pair(s) with an empty line on either side"))
    if len(prepared) == 0 or len(valid) == 0:
        raise SeqgenError(f"{train_name if len(prepared) == 0 else valid_name}: no sentence pairs left after "
                          f"skipping empty lines")
    src_codec, tgt_codec = model.src, model.tgt
    data = prepared_batches(prepared, src_codec, tgt_codec, d, seed=run.train.seed, name=train_name, warn=say)

    evaluate = make_evaluate(valid, run.eval, d.valid_batch_size)
    trainer = Trainer(model, data, evaluate, run.train, out_dir, metric="bleu", mode="max",
                      run_config=to_dict(run), log=log, dist=dist, data_fingerprint=data_fingerprint(d))
    if resume_path:
        trainer.resume(resume_path)
    else:
        n_src, n_tgt = data.src_tokens, data.tgt_tokens + len(data)
        vocab = (f"joint vocabulary {len(tgt_codec.vocab)}" if src_codec is tgt_codec or src_codec == tgt_codec
                 else f"vocabularies {len(src_codec.vocab)} / {len(tgt_codec.vocab)}")
        trainer.log(f"{train_name}: {len(data):,} pairs ({n_src:,} source / {n_tgt:,} target tokens), "
                     f"{data.num_batches(0):,} batches per epoch; {valid_name}: {len(valid):,} pairs; {vocab} "
                     f"({'from the model' if run.train.init_from else d.level}); "
                     f"{sum(p.numel() for p in model.parameters()):,} parameters"
                     + (f"; weights from {run.train.init_from}" if run.train.init_from else ""))
    return trainer.train()


__all__ = ["TranslationDataConfig", "TranslationRunConfig", "train_translation", "read_corpus", "corpus_sources",
           "build_codecs", "fit_codecs", "check_codecs_match", "encode_source", "training_batches",
           "prepared_batches", "prepare_translation", "make_evaluate"]
