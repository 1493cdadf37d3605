"""Metrics: sacrebleu wrappers, caption BLEU-1..4 and CIDEr-D against coco-caption reference values."""
import math

import pytest

from seqgen.errors import SeqgenError
from seqgen.metrics import (caption_bleu, caption_scores, caption_tokens, cider_d, cider_d_scores, corpus_bleu,
                            corpus_chrf, corpus_scores, perplexity, rouge_l_scores)

# Five images with 3, 5, 2, 4 and 1 references (already lowercase, no punctuation, so every tokenizer agrees).
EXAMPLES = [
    ("a dog runs on the grass",
     ["a dog is running on the grass", "a brown dog runs across a field", "the dog plays outside"]),
    ("two children play in the water",
     ["two kids are playing in the water", "children splash in a pool", "two young children swim",
      "kids playing in a swimming pool", "two children in the water"]),
    ("a man rides a bike", ["a man is riding a bicycle down the street", "a cyclist on a road"]),
    ("a woman sits on a bench",
     ["a woman is sitting on a park bench", "a lady sits on a bench reading", "a woman rests on a wooden bench",
      "a person sitting outside"]),
    ("a red circle left of a blue square", ["a red circle left of a blue square"]),
]
HYPS = [h for h, _ in EXAMPLES]
REFS = [r for _, r in EXAMPLES]

# Reference values measured with pycocoevalcap 1.2 (the PyPI package of coco-caption), running its pure-Python
# scorers on EXAMPLES: pycocoevalcap.cider.cider_scorer.CiderScorer(n=4, sigma=6.0).compute_score() and
# pycocoevalcap.bleu.bleu_scorer.BleuScorer(n=4).compute_score(option="closest"). (Its Java PTB tokenizer
# was not involved: the captions are already in tokenized form.)
COCO_CIDER_D = 3.3283443086915603
COCO_CIDER_D_PER_IMAGE = [2.0626533597919594, 2.006437610121129, 0.4303218571198151, 2.1423087164248975, 10.0]
COCO_BLEU_1_4 = [0.8467931547629644, 0.7616742899519582, 0.6374313705808947, 0.5493234538514636]
# Same tool: pycocoevalcap.rouge.rouge.Rouge().compute_score() (beta 1.2) on EXAMPLES.
COCO_ROUGE_L = 0.7809892997612626
COCO_ROUGE_L_PER_IMAGE = [0.7587064676616916, 0.9242424242424241, 0.46329113924050636, 0.7587064676616916, 1.0]
# Same tool: identical captions score 10 each, and a third image with one of two references matched 5.6999...
COCO_IDENTICAL3 = [10.0, 10.0, 5.6999162455680406]


def test_cider_d_matches_coco_caption():
    assert cider_d(HYPS, REFS) == pytest.approx(COCO_CIDER_D, abs=1e-9)
    assert cider_d_scores(HYPS, REFS) == pytest.approx(COCO_CIDER_D_PER_IMAGE, abs=1e-9)


def test_cider_d_identical_captions():
    hyps = ["a cat on a mat", "a dog in the park", "the sky is blue today"]
    refs = [["a cat on a mat"], ["a dog in the park"], ["the sky is blue today", "a clear blue sky"]]
    assert cider_d_scores(hyps, refs) == pytest.approx(COCO_IDENTICAL3, abs=1e-9)
    assert cider_d(hyps[:2], refs[:2]) == pytest.approx(10.0)


def test_cider_d_tokenizes_like_coco():
    # case and punctuation do not matter, as with coco-caption's PTB tokenizer + punctuation removal
    loud = [h.upper() + " ." for h in HYPS]
    assert cider_d(loud, REFS) == pytest.approx(COCO_CIDER_D, abs=1e-9)
    assert cider_d(["nothing matches here", "zzz"], [["a dog"], ["a cat"]]) == 0.0


def test_caption_bleu_matches_coco_caption():
    out = caption_bleu(HYPS, REFS)
    for n, ref in enumerate(COCO_BLEU_1_4, 1):
        assert out[f"bleu{n}"] == pytest.approx(100 * ref, abs=1e-6)
    assert "nrefs:var" in out["signature"]


def test_rouge_l_matches_coco_caption():
    assert rouge_l_scores(HYPS, REFS) == pytest.approx(COCO_ROUGE_L_PER_IMAGE, abs=1e-12)
    scores = caption_scores(HYPS, REFS)
    assert scores["rouge_l"] == pytest.approx(COCO_ROUGE_L, abs=1e-12)
    assert scores["cider"] == pytest.approx(COCO_CIDER_D, abs=1e-9)
    assert [scores[f"bleu{n}"] for n in range(1, 5)] == pytest.approx([100 * b for b in COCO_BLEU_1_4], abs=1e-6)
    # an empty caption, or one sharing no word with its references, scores 0 (coco-caption divides by zero)
    assert rouge_l_scores(["", "zzz"], [["a dog"], ["a cat"]]) == [0.0, 0.0]
    assert rouge_l_scores(["A Dog, running."], [["a dog running"]]) == [pytest.approx(1.0)]


def test_caption_bleu_perfect_and_case_insensitive():
    out = caption_bleu(["A red circle, left of a blue square."], [["a red circle left of a blue square"]])
    assert all(out[f"bleu{n}"] == pytest.approx(100.0) for n in range(1, 5))


def test_caption_tokens():
    assert caption_tokens("A dog's toy, isn't it? \"Yes\" -- T-shirt (red)...") == \
        ["a", "dog", "'s", "toy", "is", "n't", "it", "yes", "t-shirt", "red"]


def test_caption_metric_input_errors():
    with pytest.raises(SeqgenError):
        caption_bleu(["a"], [["a"], ["b"]])
    with pytest.raises(SeqgenError):
        cider_d(["a"], [[]])
    with pytest.raises(SeqgenError):
        cider_d([], [])


def test_corpus_bleu_and_chrf():
    hyps = ["the cat sat on the mat", "a quick brown fox"]
    out = corpus_bleu(hyps, hyps)
    assert out["bleu"] == pytest.approx(100.0) and out["signature"].startswith("nrefs:1")
    two = corpus_bleu(hyps, [["the cat is on the mat", "a fast brown fox"], hyps])
    assert two["bleu"] == pytest.approx(100.0) and two["signature"].startswith("nrefs:2")
    assert 0 < corpus_bleu(hyps, ["the cat is on the mat", "a fast brown fox"])["bleu"] < 100
    assert corpus_chrf(hyps, hyps)["chrf"] == pytest.approx(100.0)
    with pytest.raises(SeqgenError, match="2 hypotheses"):
        corpus_bleu(hyps, ["only one"])


def test_corpus_scores_are_data():
    """`seqgen evaluate` prints the report lines and puts the signatures in its --json: the signature is
    what sacreBLEU prints before " = ", never parsed back out of the line."""
    hyps = ["the cat sat on the mat", "a quick brown fox"]
    refs = ["the cat is on the mat", "a fast brown fox"]
    out = corpus_scores(hyps, refs)
    assert out["bleu"] == pytest.approx(corpus_bleu(hyps, refs)["bleu"])
    assert out["chrf"] == pytest.approx(corpus_chrf(hyps, refs)["chrf"])
    for key, name in (("bleu", "BLEU"), ("chrf", "chrF2")):
        assert out[f"{key}_signature"] == out[f"{key}_line"].split(" = ")[0]
        assert out[f"{key}_signature"].startswith(f"{name}|nrefs:1|")
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_scores(hyps, refs[:1])


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == math.inf
    assert perplexity(1e6, finite=True) == math.exp(50.0)      # what the validation metrics log holds
    assert math.isnan(perplexity(math.nan, finite=True))


def test_sentence_bleu_is_sacrebleus_add_one_sentence_bleu():
    """The self-critical BLEU reward equals sacrebleu's sentence BLEU with add-one smoothing (on caption tokens),
    over random captions of many lengths (empty, shorter than 4, ties between closest references) and fixed ones."""
    import random
    import warnings
    from sacrebleu.metrics import BLEU
    from seqgen.metrics import SentenceBleu
    reference = BLEU(tokenize="none", smooth_method="add-k", smooth_value=1, effective_order=False)
    ours = SentenceBleu()
    rng = random.Random(0)
    words = "a the dog man runs in on grass red ball two people water".split()
    cases = [("A dog runs on the grass.", ["a dog runs on the grass", "the dog is running"]),
             ("", ["a dog"]), ("dog", ["a dog", "a cat"]), ("zebra zebra", ["a dog runs"])]
    for _ in range(500):
        cases.append((" ".join(rng.choices(words, k=rng.randint(0, 12))),
                      [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for hyp, refs in cases:
            expected = reference.sentence_score(" ".join(caption_tokens(hyp)),
                                                [" ".join(caption_tokens(r)) for r in refs]).score / 100
            assert ours.score(hyp, ours.references(refs)) == pytest.approx(expected, abs=1e-12), (hyp, refs)
    assert ours.score("a dog runs on the grass", ours.references(["a dog runs on the grass"])) == pytest.approx(1.0)
