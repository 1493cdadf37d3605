"""Language models (char, word, subword), the task's wiring: the run config, the text split, training and
validation (generating from a prompt is seqgen.inference.lm).

The text is tokenized once into the prepared-data cache (seqgen.data.prepared_stream: the training and
validation token streams, memory-mapped) and the fitted vocabulary is kept beside it, so a later run or a
--resume on the same text and settings only hashes the text (file_digest): it neither loads nor tokenizes it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import torch

from seqgen.config import MAX_VOCAB, Bounds, File, Folder, Positive, to_dict, validate
from seqgen.data.prepared import cached_codecs
from seqgen.data.prepared_stream import prepare_stream, split_text, text_inputs
from seqgen.data.text import LMBatches, read_text
from seqgen.decoders.output_loss import linear_cross_entropy
from seqgen.decoders.rnn import DecoderConfig
from seqgen.distributed import entry_point, is_main_process, setup
from seqgen.errors import SeqgenError
from seqgen.log import Log, main_process_log
from seqgen.metrics import perplexity
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.runs import check_out_dir, data_fingerprint, holds_run_folder, load_init_model, load_resume_run
from seqgen.tokenizers import TextCodec
from seqgen.train import Trainer, TrainConfig, TrainState, seed_everything


@dataclass
class LMDataConfig:
    """The language model's data: one text file, its vocabulary and the training windows.

    text:           the UTF-8 training text
    level:          tokens: characters, words or sentencepiece subwords
    valid_fraction: the last part of the text held out for validation
    seq_len:        tokens per training window (the truncated backpropagation length)
    batch_size:     windows per batch
    min_freq:       char/word: rarer tokens become <unk>
    max_vocab:      char/word: vocabulary cap including specials; 0 = none
    vocab_size:     subword: sentencepiece vocabulary size
    prepared_dir:   the folder of the prepared data (the text tokenized once, memory-mapped, and the fitted
                    vocabulary); without it, OUT/prepared. Runs that share one skip the tokenizing
    """

    text: File = ""
    level: Literal["char", "word", "subword"] = "char"
    valid_fraction: Annotated[float, Bounds(0.0, 1.0, low_open=True, high_open=True)] = 0.1
    seq_len: Annotated[int, Bounds(1, 1_000_000)] = 256
    batch_size: Positive = 64
    min_freq: Positive = 1
    max_vocab: Annotated[int, Bounds(0, MAX_VOCAB)] = 0
    vocab_size: Annotated[int, Bounds(1, MAX_VOCAB)] = 8000
    prepared_dir: Folder = ""


@dataclass
class LMRunConfig:
    """A language-model run: `seqgen train lm`'s flags and YAML keys, section by section."""

    data: LMDataConfig = field(default_factory=LMDataConfig)
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        cell="lstm", emb=512, hidden=512, layers=2, dropout=0.2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-3, eval_every=500))


def make_evaluate(valid_ids: torch.Tensor, seq_len: int, streams: int, bos: int, pad: int
                  ) -> Callable[[Seq2Seq], dict[str, float]]:
    """Validation loss in nats per token (per character at char level) over the whole held-out text.

    The text is read as `streams` contiguous segments whose RNN state is carried from one window to the
    next (the usual RNN-LM evaluation), so each token is predicted from all the text before it in its
    segment rather than from a window that restarts every `seq_len` tokens.
    """

    def evaluate(model: Seq2Seq) -> dict[str, float]:
        if len(valid_ids) == 0:
            return {"loss": float("nan")}
        # few streams for a short text: every stream starts cold, from bos alone
        n_streams = max(1, min(streams, len(valid_ids) // (4 * seq_len)))
        n = -(-len(valid_ids) // n_streams)
        rows = torch.full((n_streams, n + 1), pad, dtype=torch.long)
        rows[:, 0] = bos
        for i in range(n_streams):
            seg = valid_ids[i * n:(i + 1) * n]
            rows[i, 1:1 + len(seg)] = seg
        rows = rows.to(model.device)
        state = model.decoder.init_state(None, n_streams)
        total, count = 0.0, 0
        for w in range(0, n, seq_len):
            gold = rows[:, w + 1:w + seq_len + 1]
            features, state = model.decoder.features(rows[:, w:w + gold.size(1)], state)
            out = model.decoder.output
            loss_sum, n_tokens = linear_cross_entropy(features, out.weight, out.bias, gold, ignore_index=pad,
                                                      reduction="sum")
            total, count = total + loss_sum.item(), count + n_tokens
        loss = total / count
        return {"loss": loss, "ppl": perplexity(loss, finite=True)}

    return evaluate


# Changing any of these on --resume (or with --init-from) would change the vocabulary.
_VOCAB_KEYS = ("level", "min_freq", "max_vocab", "vocab_size")


def fit_codec(data: LMDataConfig, prepared_dir: str, *, log: Callable[[str], None]) -> TextCodec:
    """The codec fitted to the training part of `data.text` (in memory, on the whole part), kept in
    `prepared_dir` for the next run on the same text and settings."""
    key = {"task": "lm", "inputs": [[x["size"], x["mtime"], x["sha256"]] for x in text_inputs(data.text).values()],
           "settings": {k: getattr(data, k) for k in (*_VOCAB_KEYS, "valid_fraction")}}

    def fit() -> tuple[TextCodec, TextCodec]:
        train_text, _ = split_text(read_text(data.text), data.valid_fraction)
        codec = TextCodec.build(data.level, [train_text], min_freq=data.min_freq, max_size=data.max_vocab or None,
                                vocab_size=data.vocab_size)
        return codec, codec

    return cached_codecs(prepared_dir, key, fit, log=log)[0]


@entry_point
@holds_run_folder
def train_lm(run: LMRunConfig, out_dir: str, *, resume: bool = False, overrides: dict | None = None,
             log: Log | None = None, allow_data_change: bool = False) -> TrainState:
    """Train (or resume) a language model on `run.data.text`; checkpoints go to `out_dir`.

    allow_data_change: resume although the text file is not the one the checkpoint was trained on.
    Under torchrun every process calls this (data parallelism, see seqgen/distributed.py)."""
    validate(run)
    resume_path = check_out_dir(out_dir, resume)
    model = None
    if resume_path:
        run, model = load_resume_run(resume_path, "lm", LMRunConfig, overrides,
                                     vocab_keys=_VOCAB_KEYS,
                                     model_sections=("decoder",), allow_data_change=allow_data_change)
        codec = model.tgt
    elif run.train.init_from:
        run, model = load_init_model(run, overrides, "lm", vocab_keys=_VOCAB_KEYS,
                                     sections={"decoder": "decoder"})
        codec = model.tgt
        seed_everything(run.train.seed)
    if not run.data.text:   # (a --resume of a run killed before its first checkpoint starts it anew)
        raise SeqgenError("--text is required: the UTF-8 text file to train on")
    d = run.data
    say = main_process_log(log, is_main_process())
    dist = setup(run.train.device)
    prepared_dir = d.prepared_dir or os.path.join(out_dir, "prepared")
    # a new run's own OUT/prepared goes again when the run fails before training: a rejected run writes nothing
    own = not d.prepared_dir and not os.path.exists(prepared_dir) and dist.is_main
    if own:      # OUT/prepared lives in the run folder: one that cannot be made is that folder's error
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise SeqgenError(f"--out {out_dir}: cannot create the run folder ({e.strerror or e})") from None
    try:
        with dist.main_first():     # process 0 fits and tokenizes; the others open what it wrote
            if model is None:
                codec = fit_codec(d, prepared_dir, log=say)
                seed_everything(run.train.seed)
                model = Seq2Seq(ModelConfig(task="lm", decoder=run.decoder), tgt=codec)
            # its lines wait until the run starts: a rejected run prints its error line alone
            prepared_lines: list[str] = []
            stream = prepare_stream(d.text, codec, d.valid_fraction, prepared_dir, log=prepared_lines.append)
        data = LMBatches(stream.train, seq_len=d.seq_len, batch_size=d.batch_size, bos=codec.vocab.bos,
                         seed=run.train.seed, name=d.text)
        valid_ids = torch.from_numpy(stream.valid.astype("int64"))
        evaluate = make_evaluate(valid_ids, d.seq_len, 8, codec.vocab.bos, codec.vocab.pad)
        trainer = Trainer(model, data, evaluate, run.train, out_dir, metric="loss", mode="min",
                          run_config=to_dict(run), log=log, data_fingerprint=data_fingerprint(run.data))
        if resume_path:
            trainer.resume(resume_path)
    except BaseException:
        if own:
            shutil.rmtree(prepared_dir, ignore_errors=True)
        raise
    for line in prepared_lines:
        say(line)
    if not resume_path:
        trainer.log(f"{run.data.text}: {len(stream.train):,} training and {len(valid_ids):,} validation "
                     f"tokens, vocabulary {len(codec.vocab)} ({run.data.level}); "
                     f"{sum(p.numel() for p in model.parameters()):,} parameters"
                     + (f"; weights from {run.train.init_from}" if run.train.init_from else ""))
    return trainer.train()
