"""Self-critical sequence training (Rennie et al. 2017): optimise a captioner's CIDEr-D directly.

For each image of a batch the current model draws K captions: samples, or the K best of a beam search of width K
(Cornia et al. 2020's variant: its captions start near the model's best, so the first steps are not spent
sharpening a sampling distribution). Each earns its CIDEr-D against the image's references (idf over the whole
training set, `metrics.CiderD`, the same code validation scores with), plus, with a BLEU weight, that times its
smoothed BLEU-4 (`metrics.SentenceBleu`), minus a baseline: the mean reward of the image's other K - 1 captions
(Luo 2020's "new SCST"; no extra search), or the reward of the greedy caption (Rennie et al.). The loss raises
the log-probability of captions that beat the baseline and lowers the others:

    loss = - sum_i (r_i - b_i) * sum_t log p(w_i,t | w_i,<t, image) / sum_i len_i

It is a training objective the captioning task hands to the Trainer (`Trainer(objective=...)`): a module
whose forward takes a `Batch` (cached image features; `index` = image rows, `data.captions.CachedImageBatches`)
and returns the scalar loss. `stats()` returns the mean reward, baseline and sample length since its last call,
for the training log; `stop_reason()` says when those show a collapse (the Trainer then stops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqgen.config import Bounds, ConfigValueError, NonNegative, Positive, Tokens, validate
from seqgen.data.batch import Batch
from seqgen.decoders.state import select_batch
from seqgen.errors import SeqgenError
from seqgen.metrics import CiderD, SentenceBleu
from seqgen.generation import MAX_BEAM, GenerationConfig
from seqgen.model import Seq2Seq
from seqgen.data.batching import pad_sequences


@dataclass
class SCSTConfig:
    """Self-critical fine-tuning of a captioner (`seqgen train captioning --init-from MODEL --scst`).

    scst:             fine-tune a trained captioner with self-critical training on CIDEr-D (needs --init-from
                      and a frozen backbone: it trains on cached features)
    scst_samples:     captions drawn per image at each step (samples, or the beam width)
    scst_candidates:  how they are drawn: sampled at scst_temperature, or the scst_samples best captions of a beam
                      search that wide
    scst_baseline:    what a sample's reward is compared with: the mean of the image's other samples, or the
                      reward of its greedy caption
    scst_max_len:     longest sampled caption, in tokens
    scst_temperature: the sampling temperature
    scst_bleu_weight: the reward is CIDEr-D plus this times the caption's smoothed BLEU-4 (0..1); 0 = CIDEr-D alone
    """

    scst: bool = False
    scst_samples: Positive = 5
    scst_candidates: Literal["sample", "beam"] = "sample"
    scst_baseline: Literal["mean", "greedy"] = "mean"
    scst_max_len: Tokens = 20
    scst_temperature: Annotated[float, Bounds(0.0, low_open=True)] = 1.0
    scst_bleu_weight: NonNegative = 0.0

    def validate(self) -> None:
        """Every field within its bounds, and the rules between them (seqgen.config.validate)."""
        validate(self)

    def cross_check(self) -> None:
        if self.scst_baseline == "mean" and self.scst_samples < 2:
            raise ConfigValueError(("scst_samples",), f"must be >= 2 with the mean baseline (>= 1 with greedy), "
                                                      f"got {self.scst_samples}")
        if self.scst_candidates == "beam" and self.scst_samples > MAX_BEAM:
            raise ConfigValueError(("scst_samples",), f"is the beam width with --scst-candidates beam: at most "
                                                      f"{MAX_BEAM}, got {self.scst_samples}")


# Collapse: SCST can drive a captioner to degenerate captions (empty, or a few words that game the reward's
# n-grams); the training stops when a log window's mean sampled length falls under MIN_SAMPLE_LEN tokens or its
# mean reward under COLLAPSE_FRACTION of the first window's. best.pt keeps the last good validation.
MIN_SAMPLE_LEN = 2.0
COLLAPSE_FRACTION = 0.25


class SelfCritical(nn.Module):
    """The SCST loss of `model` (see the module docstring). references[row]: the captions of image `row`."""

    def __init__(self, model: Seq2Seq, references: Sequence[Sequence[str]], cfg: SCSTConfig, amp: str = "auto"):
        super().__init__()
        cfg.validate()
        self.model, self.cfg = model, cfg
        self.references = [list(r) for r in references]
        self.cider = CiderD(self.references)
        self.bleu = SentenceBleu() if cfg.scst_bleu_weight > 0 else None
        self._ref_vectors: dict[int, tuple] = {}   # image row -> its references, counted once
        self.sample_gen = GenerationConfig(temperature=cfg.scst_temperature, max_len=cfg.scst_max_len, amp=amp)
        self.greedy_gen = GenerationConfig(max_len=cfg.scst_max_len, amp=amp)
        self.beam_gen = GenerationConfig(beam=cfg.scst_samples, n_best=cfg.scst_samples, max_len=cfg.scst_max_len,
                                         amp=amp)
        self._sums = {"reward": 0.0, "baseline": 0.0, "sample_len": 0.0}
        self._count = 0
        self._first_reward: float | None = None
        self._stop: str | None = None

    def _rewards(self, texts: list[str], rows: list[int]) -> list[float]:
        out = []
        for text, row in zip(texts, rows):
            if row not in self._ref_vectors:
                refs = self.references[row]
                self._ref_vectors[row] = (self.cider.references(refs),
                                          self.bleu.references(refs) if self.bleu else None)
            cider_refs, bleu_refs = self._ref_vectors[row]
            reward = self.cider.score(text, cider_refs)
            if self.bleu is not None:
                reward += self.cfg.scst_bleu_weight * self.bleu.score(text, bleu_refs)
            out.append(reward)
        return out

    def forward(self, batch: Batch) -> Tensor:
        if batch.index is None:
            raise SeqgenError("self-critical training needs batches that name their images (Batch.index)")
        # Without dropout in both passes: the log-probabilities that get the gradient must be those of the policy
        # that drew the samples (with dropout on in the second pass only, the rewards would credit captions to a
        # different, randomly thinned network, and greedy validation falls while the sampled reward rises).
        was_training = self.model.training
        self.model.eval()
        try:
            return self._loss(batch)
        finally:
            self.model.train(was_training)

    def _loss(self, batch: Batch) -> Tensor:
        model, k = self.model, self.cfg.scst_samples
        rows = batch.index.tolist()
        enc = model.encode(batch.source, batch.source_lengths)
        expand = torch.arange(len(rows), device=batch.target.device).repeat_interleave(k)
        enc_k = select_batch(enc, expand)                                   # [B * K, ...] features
        with torch.no_grad():
            if self.cfg.scst_candidates == "beam":
                # row i * k + j: image i's j-th best (a beam search returns fewer only when fewer captions exist)
                tokens = [h[min(j, len(h) - 1)].tokens for h in model.generate(enc, gen=self.beam_gen)
                          for j in range(k)]
            else:
                tokens = [h[0].tokens for h in model.generate(enc_k, gen=self.sample_gen)]
            texts = [model.tgt.decode(t).strip() for t in tokens]
            sample_rows = [r for r in rows for _ in range(k)]
            rewards = torch.tensor(self._rewards(texts, sample_rows), dtype=torch.float32).view(-1, k)
            if self.cfg.scst_baseline == "mean":
                baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
            else:
                greedy = [model.tgt.decode(h[0].tokens).strip() for h in model.generate(enc, gen=self.greedy_gen)]
                baseline = torch.tensor(self._rewards(greedy, rows), dtype=torch.float32).unsqueeze(1).expand(-1, k)
        vocab = model.tgt.vocab
        ended = [t + [vocab.eos] if len(t) < self.cfg.scst_max_len else t for t in tokens]
        target, _ = pad_sequences([[vocab.bos] + t for t in ended], vocab.pad)
        target = target.to(batch.target.device)
        logits = model(Batch(target=target, source=enc_k))                  # [B * K, T, V]
        gold = target[:, 1:]
        mask = (gold != vocab.pad).float()
        logp = F.log_softmax(logits.float(), dim=-1).gather(2, gold.unsqueeze(2)).squeeze(2) * mask
        advantage = (rewards - baseline).view(-1).to(logp.device)
        loss = -(advantage * logp.sum(dim=1)).sum() / mask.sum().clamp(min=1.0)
        self._sums["reward"] += float(rewards.mean())
        self._sums["baseline"] += float(baseline.mean())
        self._sums["sample_len"] += sum(len(t) for t in tokens) / len(tokens)
        self._count += 1
        return loss

    def stats(self) -> dict[str, float]:
        """Mean reward, baseline and sampled length per step since the last call (then reset); the window is
        also what `stop_reason` judges."""
        if not self._count:
            return {}
        out = {k: v / self._count for k, v in self._sums.items()}
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._count = 0
        if self._first_reward is None:
            self._first_reward = out["reward"]
        if out["sample_len"] < MIN_SAMPLE_LEN:
            self._stop = (f"self-critical training collapsed: sampled captions average {out['sample_len']:.2f} "
                          f"tokens")
        elif self._first_reward > 0 and out["reward"] < COLLAPSE_FRACTION * self._first_reward:
            self._stop = (f"self-critical training collapsed: the mean reward fell from {self._first_reward:.3f} "
                          f"to {out['reward']:.3f}")
        return out

    def stop_reason(self) -> str | None:
        """Why training should stop (a collapse seen by the last `stats` window), or None."""
        return self._stop
