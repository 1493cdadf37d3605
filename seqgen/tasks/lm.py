"""Language models (char, word, subword), the task's wiring: the run config, the text split, training and
validation (generating from a prompt is seqgen.inference.lm)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import torch
import torch.nn.functional as F

from seqgen.config import MAX_VOCAB, Bounds, File, Positive, to_dict, validate
from seqgen.data.text import LMBatches, read_text
from seqgen.decoders.rnn import DecoderConfig
from seqgen.distributed import entry_point
from seqgen.errors import SeqgenError
from seqgen.log import Log
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
    """

    text: File = ""
    level: Literal["char", "word", "subword"] = "char"
    valid_fraction: Annotated[float, Bounds(0.0, 1.0, low_open=True, high_open=True)] = 0.1
    seq_len: Annotated[int, Bounds(1, 1_000_000)] = 256
    batch_size: Positive = 64
    min_freq: Positive = 1
    max_vocab: Annotated[int, Bounds(0, MAX_VOCAB)] = 0
    vocab_size: Annotated[int, Bounds(1, MAX_VOCAB)] = 8000


@dataclass
class LMRunConfig:
    """A language-model run: `seqgen train lm`'s flags and YAML keys, section by section."""

    data: LMDataConfig = field(default_factory=LMDataConfig)
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        cell="lstm", emb=512, hidden=512, layers=2, dropout=0.2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-3, eval_every=500))


def split_text(text: str, valid_fraction: float) -> tuple[str, str]:
    """First (1 - valid_fraction) of the characters for training, the rest for validation."""
    if not 0.0 <= valid_fraction < 1.0:
        raise SeqgenError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    cut = int(len(text) * (1.0 - valid_fraction))
    return text[:cut], text[cut:]


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
            logits, state = model.decoder(rows[:, w:w + gold.size(1)], state)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), gold.reshape(-1),
                                     ignore_index=pad, reduction="sum").item()
            count += int((gold != pad).sum())
        loss = total / count
        return {"loss": loss, "ppl": perplexity(loss, finite=True)}

    return evaluate


# Changing any of these on --resume (or with --init-from) would change the vocabulary.
_VOCAB_KEYS = ("level", "min_freq", "max_vocab", "vocab_size")


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
    text = read_text(run.data.text)
    train_text, valid_text = split_text(text, run.data.valid_fraction)
    if model is None:
        codec = TextCodec.build(run.data.level, [train_text], min_freq=run.data.min_freq,
                                max_size=run.data.max_vocab or None, vocab_size=run.data.vocab_size)
        seed_everything(run.train.seed)
        model = Seq2Seq(ModelConfig(task="lm", decoder=run.decoder), tgt=codec)
    train_ids = torch.tensor(codec.encode(train_text), dtype=torch.long)
    valid_ids = torch.tensor(codec.encode(valid_text), dtype=torch.long)
    data = LMBatches(train_ids, seq_len=run.data.seq_len, batch_size=run.data.batch_size,
                     bos=codec.vocab.bos, seed=run.train.seed, name=run.data.text)
    evaluate = make_evaluate(valid_ids, run.data.seq_len, 8, codec.vocab.bos, codec.vocab.pad)
    trainer = Trainer(model, data, evaluate, run.train, out_dir, metric="loss", mode="min",
                      run_config=to_dict(run), log=log, data_fingerprint=data_fingerprint(run.data))
    if resume_path:
        trainer.resume(resume_path)
    else:
        trainer.log(f"{run.data.text}: {len(train_ids):,} training and {len(valid_ids):,} validation "
                     f"tokens, vocabulary {len(codec.vocab)} ({run.data.level}); "
                     f"{sum(p.numel() for p in model.parameters()):,} parameters"
                     + (f"; weights from {run.train.init_from}" if run.train.init_from else ""))
    return trainer.train()
