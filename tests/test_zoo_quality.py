"""Slow tier: the shipped models meet their cards' quality targets on the real test data (../shared/data)."""
import pytest

from seqgen import zoo
from seqgen.metrics import max_ngram_repeats
from seqgen.cards import captioning_figures, lm_figures, translation_figures

pytestmark = pytest.mark.slow


def shipped(name):
    model = zoo.get(name)
    if not model.installed:
        pytest.fail(f"{name} is registered but not installed")
    return model.path


def test_translation_model_quality(shared_data):
    f = translation_figures(shipped("multi30k-de-en"), shared_data, timing=False)
    assert f["BLEU test_2016_flickr (beam 5)"] >= 40.0


def test_captioner_quality_and_no_loops(shared_data):
    f = captioning_figures(shipped("flickr8k-captioner"), shared_data, timing=False)
    assert f["BLEU-4 Flickr8k test"] >= 21.5 and f["CIDEr-D Flickr8k test"] >= 0.52
    assert f["captions with a trigram 3 times"] == 0
    repeating = int(f["captions repeating a word trigram"].split(" / ")[0])
    assert repeating <= 10                      # of 500; 5% (25) before the default no-repeat rule
    assert all(max_ngram_repeats(e.split(": ", 1)[1], 3) < 3 for e in f["_examples"])


def test_char_model_quality(shared_data):
    f = lm_figures(shipped("shakespeare-char"), shared_data, timing=False)
    assert f["validation nats/char (last 10%)"] <= 1.45
