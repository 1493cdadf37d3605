import io
import random
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqgen.errors import SeqgenError
from seqgen.tokenizers import (CharTokenizer, SubwordTokenizer, TextCodec, WordTokenizer, tokenizer_from_dict,
                               tokenizer_to_dict)
from seqgen.vocab import SPECIALS, UNK, Vocab

# Arbitrary unicode, with the awkward characters mixed in often: newline, CR, tab, space runs, NUL,
# a combining accent, emoji (one with a ZWJ sequence), and U+2581, the character WordTokenizer uses as its mark.
AWKWARD = ["\n", "\r", "\t", " ", "  ", "\x00", "\u0301", "😀", "👩\u200d💻", "\u2581", "\u00a0", ".", "a", "_"]
TEXT = st.one_of(st.text(), st.lists(st.one_of(st.characters(), st.sampled_from(AWKWARD)), max_size=30).map("".join))
PROPERTY = settings(max_examples=150, deadline=None)


def save_load(obj):
    """torch.save then torch.load(weights_only=True): what a checkpoint does."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- char and word: property tests

@PROPERTY
@given(text=TEXT)
def test_char_tokenizer_round_trip(text):
    tok = CharTokenizer()
    assert tok.tokenize(text) == list(text)
    assert tok.detokenize(tok.tokenize(text)) == text


@PROPERTY
@given(text=TEXT)
def test_word_tokenizer_round_trip(text):
    tok = WordTokenizer()
    tokens = tok.tokenize(text)
    assert tok.detokenize(tokens) == text
    assert all(tokens)  # no empty tokens
    assert " " not in tokens or all(a != " " or b[0].isspace() for a, b in zip(tokens, tokens[1:]))


@PROPERTY
@given(level=st.sampled_from(["char", "word"]), text=TEXT)
def test_codec_round_trip_on_its_own_text(level, text):
    codec = TextCodec.build(level, [text])
    ids = codec.encode(text, bos=True, eos=True)
    assert ids[0] == codec.vocab.bos and ids[-1] == codec.vocab.eos
    assert codec.vocab.unk not in ids
    assert codec.decode(ids) == text
    assert codec.unknown(text) == []


@PROPERTY
@given(level=st.sampled_from(["char", "word"]), seen=TEXT, new=TEXT)
def test_unseen_tokens_become_unk_and_are_listed(level, seen, new):
    codec = TextCodec.build(level, [seen])
    tokens = codec.tokenizer.tokenize(new)
    unseen = [t for t in tokens if t not in codec.tokenizer.tokenize(seen)]
    ids = codec.encode(new)
    assert [t for t, i in zip(tokens, ids) if i == codec.vocab.unk] == unseen
    assert codec.unknown(new) == list(dict.fromkeys(unseen))
    assert codec.decode(ids) == codec.tokenizer.detokenize([UNK if t in unseen else t for t in tokens])


# ---------------------------------------------------------------- word tokenizer: documented examples

@pytest.mark.parametrize("text, tokens", [
    ("Hello, world!\n  two  spaces", ["Hello", ",", "▁world", "!", "\n", "  ", "two", "  ", "spaces"]),
    ("the cat.", ["the", "▁cat", "."]),
    (" lead and trail ", ["▁lead", "▁and", "▁trail", " "]),
    ("a \nb\t c", ["a", " ", "\n", "b", "\t ", "c"]),
    ("x - y", ["x", "▁-", "▁y"]),
    ("don't", ["don", "'", "t"]),
    ("", []),
    ("\u2581x \u2581", ["\u2581", "x", "\u2581\u2581"]),  # a literal U+2581 stays one character: still exact
])
def test_word_tokenizer_examples(text, tokens):
    tok = WordTokenizer()
    assert tok.tokenize(text) == tokens
    assert tok.detokenize(tokens) == text


def test_word_codec_example_and_unk():
    text = "Hello, world!\n  two  spaces"
    codec = TextCodec.build("word", [text])
    assert codec.decode(codec.encode(text)) == text
    assert codec.unknown("Hello, moon!") == ["▁moon"]
    assert codec.decode(codec.encode("Hello, moon!")) == "Hello,<unk>!"


def test_decode_stops_at_eos_and_skips_pad_and_bos():
    codec = TextCodec.build("char", ["abc"])
    a, b, c = codec.encode("abc")
    v = codec.vocab
    assert codec.decode([v.bos, a, v.pad, b, v.eos, c]) == "ab"
    assert codec.decode(torch.tensor([v.bos, c, v.unk, a])) == "c<unk>a"
    assert codec.decode([]) == ""


def test_char_codec_respects_min_freq_and_max_size():
    codec = TextCodec.build("char", ["aaabbc"], min_freq=2)
    assert codec.vocab.to_list()[4:] == ["a", "b"] and codec.unknown("abcd") == ["c", "d"]
    assert len(TextCodec.build("char", ["aaabbc"], max_size=5).vocab) == 5


def test_unknown_level_names_the_flag():
    with pytest.raises(SeqgenError, match="--level"):
        TextCodec.build("byte", ["abc"])


@pytest.mark.parametrize("d", [{"level": "bytes"}, {}, {"level": "subword"},
                               {"level": "subword", "model": torch.tensor([1, 2, 3], dtype=torch.uint8)},
                               {"level": "subword", "model": torch.zeros(0, dtype=torch.uint8)},
                               {"level": "subword", "model": torch.zeros(3, dtype=torch.float32)}])
def test_tokenizer_from_dict_rejects_bad_input(d):
    with pytest.raises(SeqgenError):
        tokenizer_from_dict(d)


def test_codec_from_dict_rejects_bad_input():
    with pytest.raises(SeqgenError):
        TextCodec.from_dict({"vocab": list(SPECIALS)})
    with pytest.raises(SeqgenError):
        TextCodec.from_dict({"tokenizer": {"level": "char"}, "vocab": ["a", "b"]})


# ---------------------------------------------------------------- subword (sentencepiece)

def make_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Sentences over made-up words built from syllables, so subwords are worth learning."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mu", "sen", "po", "la", "gi", "ve", "qua", "ist", "orn", "ble", "th", "er"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".!?,")).capitalize()
            for _ in range(n)]


SENTENCES = make_sentences()
CORPUS = "\n".join(SENTENCES)


@pytest.fixture(scope="module")
def subword() -> SubwordTokenizer:
    pytest.importorskip("sentencepiece")
    return SubwordTokenizer.train([CORPUS], vocab_size=150)


@pytest.mark.parametrize("text", [
    SENTENCES[0],
    SENTENCES[1] + "\n" + SENTENCES[2] + "\n",
    "\n\nKato  rimu   sen.\n\n",
    "  Kato ve qua ist gi  ",  # leading and trailing space runs
    " \n ",
    "",
    "Qua, ble! Orn? " * 5,
    SENTENCES[3] + "\r\n" + SENTENCES[4] + "\r\n\r",  # CRLF: sentencepiece alone would lose the "\r"
])
def test_subword_round_trip(subword, text):
    tokens = subword.tokenize(text)
    assert subword.detokenize(tokens) == text
    codec = TextCodec(subword, Vocab([*SPECIALS, *subword.pieces()]))
    assert codec.unknown(text) == []
    assert codec.decode(codec.encode(text, bos=True, eos=True)) == text


def test_subword_pieces_and_codec_vocab(subword):
    pieces = subword.pieces()
    assert "\n" in pieces and "\r" in pieces and "<unk>" not in pieces and len(set(pieces)) == len(pieces)
    assert len(pieces) == 151  # 149 sentencepiece pieces (150 less its <unk>) + "\n" + "\r"


def test_subword_unseen_characters_become_unk(subword):
    codec = TextCodec(subword, Vocab([*SPECIALS, *subword.pieces()]))
    ids = codec.encode("kato 😀 rimu")
    assert codec.vocab.unk in ids
    assert any("😀" in t for t in codec.unknown("kato 😀 rimu"))
    assert "⁇" in codec.decode(ids) and codec.decode(ids).startswith("kato")


def test_subword_training_is_deterministic(subword):
    again = SubwordTokenizer.train([CORPUS], vocab_size=150)
    assert again.model_proto == subword.model_proto and again == subword
    bpe = [SubwordTokenizer.train(SENTENCES, vocab_size=120, model_type="bpe").model_proto for _ in range(2)]
    assert bpe[0] == bpe[1]


def test_subword_small_corpus_never_fails_for_a_large_vocab_size():
    pytest.importorskip("sentencepiece")
    tok = SubwordTokenizer.train(SENTENCES[:50], vocab_size=8000)
    assert 10 < len(tok.pieces()) < 8000
    assert tok.detokenize(tok.tokenize(SENTENCES[3])) == SENTENCES[3]


def test_subword_bad_arguments_raise():
    pytest.importorskip("sentencepiece")
    with pytest.raises(SeqgenError, match="--vocab-size"):
        SubwordTokenizer.train(SENTENCES[:50], vocab_size=5)
    with pytest.raises(SeqgenError, match="empty"):
        SubwordTokenizer.train(["", "\n\n"])
    with pytest.raises(SeqgenError, match="model_type"):
        SubwordTokenizer.train(SENTENCES, model_type="wordpiece")
    with pytest.raises(SeqgenError, match="corrupt"):
        SubwordTokenizer(b"not a sentencepiece model")


def test_subword_checkpoint_round_trip(subword):
    d = save_load(tokenizer_to_dict(subword))
    assert d["level"] == "subword" and d["model"].dtype == torch.uint8
    back = tokenizer_from_dict(d)
    assert back.model_proto == subword.model_proto
    for text in SENTENCES[:20] + ["Kato\n\n  rimu  "]:
        assert back.tokenize(text) == subword.tokenize(text)


def test_subword_corrupt_model_in_checkpoint_raises(subword):
    d = tokenizer_to_dict(subword)
    d["model"] = d["model"][: len(d["model"]) // 3].clone()
    with pytest.raises(SeqgenError, match="corrupt"):
        tokenizer_from_dict(d)


def test_missing_sentencepiece_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` raise ImportError
    with pytest.raises(SeqgenError, match=r"pip install 'seqgen\[subword\]'"):
        SubwordTokenizer.train(SENTENCES)
    with pytest.raises(SeqgenError, match="sentencepiece"):
        SubwordTokenizer(b"")


# ---------------------------------------------------------------- checkpoints for all three levels

@pytest.mark.parametrize("level", ["char", "word", "subword"])
def test_codec_survives_weights_only_load(level):
    if level == "subword":
        pytest.importorskip("sentencepiece")
    texts = [CORPUS, "Tabs\tand  spaces, émoji 😀\n"]
    codec = TextCodec.build(level, texts, vocab_size=150)
    back = TextCodec.from_dict(save_load(codec.to_dict()))
    assert back == codec and back.level == level
    for text in texts + ["Kato rimu, unseen Ω\n"]:
        assert back.encode(text, bos=True, eos=True) == codec.encode(text, bos=True, eos=True)
        assert back.decode(back.encode(text)) == codec.decode(codec.encode(text))
    assert back.decode(back.encode(texts[1])) == texts[1]


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=sorted(set(CORPUS) | {" ", "\n", "\r"}), max_size=60))
def test_subword_round_trip_on_text_of_seen_characters(subword, text):
    codec = TextCodec(subword, Vocab([*SPECIALS, *subword.pieces()]))
    assert codec.unknown(text) == []
    assert codec.decode(codec.encode(text)) == text


@pytest.mark.parametrize("level", ["char", "word", "subword"])
def test_encode_flat_equals_encode_batch(subword, level):
    """The fast path (sentencepiece's own ids through one table) gives exactly the ids of looking up each piece:
    plain sentences, line breaks, characters sentencepiece does not know, surrogates, specials spelled out."""
    from itertools import chain

    import numpy as np
    texts = SENTENCES[:50] + ["", " ", "Kato\nrimu", "sen\r\npo", "Ωμέγα 中文 🙂 kato", "<eos> <pad> ka",
                              "\ud800qua", "ÄÖÜ ß", "\t", SENTENCES[5] + " zzz"]
    codec = (TextCodec(subword, Vocab([*SPECIALS, *(p for p in subword.pieces() if p not in SPECIALS)]))
             if level == "subword" else TextCodec.build(level, SENTENCES[:100]))
    flat, lengths = codec.encode_flat(texts)
    want = codec.encode_batch(texts)
    assert flat.dtype == lengths.dtype == np.int64
    assert lengths.tolist() == [len(x) for x in want] and flat.tolist() == list(chain.from_iterable(want))
    assert codec.vocab.unk in flat.tolist()               # the unknown characters took the lookup path
