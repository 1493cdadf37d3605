"""Evaluation metrics shared by the tasks: sacrebleu BLEU/chrF, caption BLEU-1..4, CIDEr-D, perplexity.

Scores are on sacrebleu's 0..100 scale for BLEU/chrF; CIDEr-D is on its usual scale (x10, ~0..10).

Caption metrics follow the coco-caption conventions: captions are lowercased, split PTB-style (clitics
such as 's and n't become their own tokens) and punctuation tokens are dropped, then BLEU is computed on
those tokens (sacrebleu with tokenize="none", no smoothing, closest reference length) and CIDEr-D on the
same tokens. coco-caption runs the Stanford PTBTokenizer in Java; `caption_tokens` is a dependency-free
approximation that agrees with it on ordinary captions.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from seqgen.errors import SeqgenError

# -- translation-style corpus metrics --------------------------------------------------------------


def _ref_streams(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """refs as sacrebleu's reference streams (one list per reference, each as long as `hyps`)."""
    if refs and all(isinstance(r, str) for r in refs):
        streams = [list(refs)]  # a single reference stream
    else:
        streams = [list(s) for s in refs]
    if not streams:
        raise SeqgenError("no references given")
    for k, s in enumerate(streams):
        if len(s) != len(hyps):
            raise SeqgenError(f"reference stream {k + 1} has {len(s)} lines but there are {len(hyps)} hypotheses")
    return streams


def _sacrebleu(metric, hyps: Sequence[str], streams: list[list[str]]) -> dict:
    """One sacreBLEU corpus score as data: {"score", "name", "signature", "line"} (see `corpus_scores`)."""
    score = metric.corpus_score(list(hyps), streams)
    signature = str(metric.get_signature())
    return {"score": score.score, "name": score.name, "signature": signature,
            "line": score.format(signature=signature)}


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> dict:
    """sacrebleu corpus BLEU (default 13a tokenization, case-sensitive).

    refs: one list of reference lines, or a list of reference streams (each aligned with `hyps`).
    Returns {"bleu": float 0..100, "signature": str}.
    """
    from sacrebleu.metrics import BLEU
    out = _sacrebleu(BLEU(), hyps, _ref_streams(hyps, refs))
    return {"bleu": out["score"], "signature": out["signature"]}


def corpus_chrf(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> dict:
    """sacrebleu corpus chrF. refs as in `corpus_bleu`. Returns {"chrf": float 0..100, "signature": str}."""
    from sacrebleu.metrics import CHRF
    out = _sacrebleu(CHRF(), hyps, _ref_streams(hyps, refs))
    return {"chrf": out["score"], "signature": out["signature"]}


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """sacreBLEU BLEU and chrF (defaults: cased, 13a) of one reference stream, as data.

    Returns {"bleu", "chrf": float 0..100; "bleu_signature", "chrf_signature": the signature as sacreBLEU
    prints it, metric name first ("BLEU|nrefs:1|case:mixed|..."); "bleu_line", "chrf_line": sacreBLEU's
    report lines ("BLEU|nrefs:1|... = 35.20 66.7/41.2/27.5/18.9 (BP = ...)")}.
    """
    from sacrebleu.metrics import BLEU, CHRF
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    out: dict = {}
    for key, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        s = _sacrebleu(metric, hypotheses, [list(references)])
        out.update({key: s["score"], f"{key}_signature": f"{s['name']}|{s['signature']}", f"{key}_line": s["line"]})
    return out


def perplexity(mean_nll: float, *, finite: bool = False) -> float:
    """exp(mean negative log-likelihood per token, in nats); inf instead of an overflow.

    finite: cap the exponent at 50 (exp(50) ~ 5e21), so that a diverged run still logs a number that JSON
    can hold (the validation metrics of the Trainer).
    """
    if finite:
        mean_nll = min(mean_nll, 50.0)
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


# -- caption metrics -------------------------------------------------------------------------------

_CLITIC_NT = re.compile(r"(\w)(n't)\b")
_CLITIC = re.compile(r"(\w)('(?:s|re|ve|ll|d|m))\b")
_TOKEN = re.compile(r"\w+(?:[-'.]\w+)*|'(?:s|re|ve|ll|d|m)\b|\S")


def caption_tokens(text: str) -> list[str]:
    """Lowercased PTB-like tokens without punctuation: "A dog's toy, isn't it." -> a dog 's toy is n't it."""
    text = text.lower().replace("\u2019", "'")
    text = _CLITIC_NT.sub(r"\1 \2", text)
    text = _CLITIC.sub(r"\1 \2", text)
    return [t for t in _TOKEN.findall(text) if any(ch.isalnum() for ch in t)]


def _check_caption_inputs(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(hyps) != len(refs):
        raise SeqgenError(f"{len(hyps)} captions but references for {len(refs)} images")
    if not hyps:
        raise SeqgenError("no captions to score")
    for i, r in enumerate(refs):
        if isinstance(r, str) or len(r) == 0:
            raise SeqgenError(f"image {i}: references must be a non-empty list of captions")


def caption_bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU-1..4 of one caption per image against that image's references (any number each).

    hyps[i]: the caption of image i; refs[i]: its references. Tokenized with `caption_tokens`; sacrebleu
    BLEU with tokenize="none", no smoothing (as coco-caption), brevity penalty from the closest
    reference length per caption. Missing references (images with fewer than the most) are passed to
    sacrebleu as None, which it drops per segment, so they neither count as matches nor as lengths.
    Returns {"bleu1".."bleu4": float 0..100, "signature": str}.
    """
    from sacrebleu.metrics import BLEU
    _check_caption_inputs(hyps, refs)
    hyp_text = [" ".join(caption_tokens(h)) for h in hyps]
    depth = max(len(r) for r in refs)
    streams = [[" ".join(caption_tokens(r[k])) if k < len(r) else None for r in refs] for k in range(depth)]
    metric = BLEU(tokenize="none", smooth_method="none", max_ngram_order=4)
    score = metric.corpus_score(hyp_text, streams)
    out: dict = {}
    for n in range(1, 5):
        # BLEU-n from the same counts: geometric mean of p1..pn times the shared brevity penalty
        sub = BLEU.compute_bleu(correct=score.counts[:n], total=score.totals[:n], sys_len=score.sys_len,
                                ref_len=score.ref_len, smooth_method="none", max_ngram_order=n)
        out[f"bleu{n}"] = sub.score
    out["signature"] = str(metric.get_signature()) + "|tok:coco-ptb-like"
    return out


def _ngrams(tokens: list[str], n_max: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1))


class SentenceBleu:
    """Smoothed BLEU-4 of one caption against its image's references, 0..1 (a self-critical reward, where a
    corpus BLEU does not exist): n-gram precisions clipped by the largest count in any reference, add-one
    smoothing of the orders >= 2 (Lin & Och 2004's BLEU+1; sacrebleu's smooth_method="add-k"), the brevity
    penalty from the closest reference length (the shorter on a tie). Tokens: `caption_tokens`.

    The n-grams are counted here so that each image's references are counted once (`references`), not on
    every call as sacrebleu's sentence_score does; the formula is sacrebleu's (`BLEU.compute_bleu`, as in
    `caption_bleu`).
    """

    def __init__(self, n: int = 4):
        from sacrebleu.metrics import BLEU
        self.n, self._compute = n, BLEU.compute_bleu

    def references(self, refs: Sequence[str]) -> tuple[Counter, list[int]]:
        """One image's references, counted once: (each n-gram's largest count in a reference, their lengths)."""
        most: Counter = Counter()
        lengths = []
        for r in refs:
            tokens = caption_tokens(r)
            lengths.append(len(tokens))
            most |= _ngrams(tokens, self.n)
        return most, lengths

    def score(self, hyp: str, ref: tuple[Counter, list[int]]) -> float:
        tokens = caption_tokens(hyp)
        most, lengths = ref
        correct, total = [0] * self.n, [0] * self.n
        for gram, count in _ngrams(tokens, self.n).items():
            total[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, most.get(gram, 0))
        c = len(tokens)
        r = min(lengths, key=lambda length: (abs(length - c), length))
        return self._compute(correct, total, c, r, smooth_method="add-k", smooth_value=1,
                             max_ngram_order=self.n).score / 100


class CiderD:
    """CIDEr-D (Vedantam et al. 2015, as in coco-caption's Cider scorer) with its document frequencies fixed.

    For n-gram orders 1..n, every sentence becomes a tf-idf vector (idf from the document frequency of
    n-grams over the images' reference sets); the score of order k is the mean over references of the
    cosine similarity with the hypothesis' tf-idf clipped to the reference's (min(h, r) * r / (|h||r|)),
    times a Gaussian penalty exp(-(len_h - len_r)^2 / (2 sigma^2)); the image score is the mean over
    orders, x10. `tokenize=False` takes the strings as already tokenized (split on whitespace).

    corpus: the reference sets the idf comes from. Evaluation uses the scored images' own references (as
    coco-caption does); self-critical training scores a batch against the idf of the whole training set, built
    once here, so a reward does not depend on which images share its batch.
    """

    def __init__(self, corpus: Sequence[Sequence[str]], sigma: float = 6.0, n: int = 4, tokenize: bool = True):
        self.sigma, self.n = sigma, n
        self.split = caption_tokens if tokenize else str.split
        self.df: Counter = Counter()
        for rs in corpus:
            self.df.update(set().union(*(_ngrams(self.split(r), n) for r in rs)))
        self.log_n_images = math.log(float(max(1, len(corpus))))

    def _vectorise(self, counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = tf * (self.log_n_images - math.log(max(1.0, self.df[gram])))
            vec[k][gram] = w
            norm[k] += w * w
        # coco-caption measures length by the number of bigrams; the difference of two lengths (all the
        # penalty uses) equals the difference in words for any two sentences of >= 1 word.
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    def references(self, refs: Sequence[str]) -> list[tuple[list[dict], list[float], int]]:
        """One image's references as vectors (what `scores` takes as `ref_vectors`, to vectorise them once)."""
        return [self._vectorise(_ngrams(self.split(r), self.n)) for r in refs]

    def score(self, hyp: str, ref_vectors: list[tuple[list[dict], list[float], int]]) -> float:
        vh, nh, lh = self._vectorise(_ngrams(self.split(hyp), self.n))
        total = 0.0
        for vr, nr, lr in ref_vectors:
            penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total += val * penalty
        return total / self.n / len(ref_vectors) * 10.0

    def scores(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> list[float]:
        _check_caption_inputs(hyps, refs)
        return [self.score(h, self.references(rs)) for h, rs in zip(hyps, refs)]


def cider_d_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]], sigma: float = 6.0, n: int = 4,
                   tokenize: bool = True) -> list[float]:
    """CIDEr-D of each image, the idf taken over these images' references (see `CiderD`)."""
    _check_caption_inputs(hyps, refs)
    return CiderD(refs, sigma=sigma, n=n, tokenize=tokenize).scores(hyps, refs)


def cider_d(hyps: Sequence[str], refs: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_scores` over images (refs[i]: the references of image i)."""
    scores = cider_d_scores(hyps, refs, sigma=sigma)
    return sum(scores) / len(scores)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of token lists a and b (dynamic programming, one row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> list[float]:
    """ROUGE-L of each image as coco-caption computes it: P = max over references of LCS / caption length,
    R = max over references of LCS / reference length (each maximised on its own), F = (1 + beta^2) P R /
    (R + beta^2 P), 0 when P or R is 0 (an empty caption scores 0). Tokens: `caption_tokens`."""
    _check_caption_inputs(hyps, refs)
    out = []
    for h, rs in zip(hyps, refs):
        cand = caption_tokens(h)
        p = r = 0.0
        for ref in rs:
            toks = caption_tokens(ref)
            lcs = _lcs(cand, toks)
            p, r = max(p, lcs / max(len(cand), 1)), max(r, lcs / max(len(toks), 1))
        out.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p > 0 and r > 0 else 0.0)
    return out


def caption_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """The caption metrics, one caption per image against all its references: BLEU-1..4 (0..100), ROUGE-L and
    CIDEr-D (as coco-caption: CIDEr-D's idf over these images' references). Keys bleu1..bleu4, rouge_l, cider.
    Training-time validation and `seqgen evaluate` both call this, so the same captions get the same numbers.
    (METEOR and SPICE are not computed: their reference implementations run on Java.)"""
    bleu = caption_bleu(hyps, refs)
    rouge = rouge_l_scores(hyps, refs)
    return {"cider": cider_d(hyps, refs), **{f"bleu{n}": bleu[f"bleu{n}"] for n in range(1, 5)},
            "rouge_l": sum(rouge) / len(rouge)}


def max_ngram_repeats(text: str, n: int = 3) -> int:
    """How often the most frequent word n-gram of `text` occurs (split on whitespace, lowercased); 0 if the
    text has fewer than n words. "a man in a red hat and a red hat" -> 2 for n = 3 ("a red hat")."""
    words = text.lower().split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return max(grams.values(), default=0)
