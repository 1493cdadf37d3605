import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqgen.errors import SeqgenError
from seqgen.vocab import BOS, EOS, PAD, SPECIALS, UNK, Vocab


def test_specials_have_fixed_ids():
    v = Vocab.build([["b", "a"]])
    assert v.to_list()[:4] == [PAD, BOS, EOS, UNK] == list(SPECIALS)
    assert (v.pad, v.bos, v.eos, v.unk) == (0, 1, 2, 3)
    assert v.lookup([PAD, BOS, EOS, UNK]) == [0, 1, 2, 3]
    assert len(Vocab(list(SPECIALS))) == 4


def test_build_orders_by_frequency_then_token():
    v = Vocab.build([["c", "b", "a", "b"], ["d", "c", "b"]])
    # b:3, c:2, then a and d tie at 1 and are ordered by the string.
    assert v.to_list()[4:] == ["b", "c", "a", "d"]


def test_build_is_deterministic_whatever_the_input_order():
    seqs = [["x", "y", "z", "y"], ["z", "w"], ["q"]]
    assert Vocab.build(seqs) == Vocab.build(reversed(seqs)) == Vocab.build([list(reversed(s)) for s in seqs])


def test_min_freq_drops_rare_tokens():
    v = Vocab.build([["a", "a", "b", "c", "c", "c"]], min_freq=2)
    assert v.to_list()[4:] == ["c", "a"]
    assert "b" not in v and "a" in v


def test_max_size_includes_the_specials():
    v = Vocab.build([list("aaabbc")], max_size=6)
    assert len(v) == 6 and v.to_list()[4:] == ["a", "b"]
    assert len(Vocab.build([list("abc")], max_size=4)) == 4
    assert len(Vocab.build([list("abc")], max_size=100)) == 7


def test_special_strings_in_the_data_are_not_duplicated():
    v = Vocab.build([[UNK, "a", PAD, EOS]])
    assert v.to_list() == [*SPECIALS, "a"]


def test_unknown_tokens_map_to_unk():
    v = Vocab.build([["a", "b"]])
    assert v.lookup(["a", "zzz", "b", ""]) == [v.lookup(["a"])[0], v.unk, v.lookup(["b"])[0], v.unk]


def test_tokens_inverts_lookup_and_checks_range():
    v = Vocab.build([["hello", "world"]])
    assert v.tokens(v.lookup(["world", "hello"])) == ["world", "hello"]
    with pytest.raises(SeqgenError, match="outside the vocabulary"):
        v.tokens([len(v)])
    with pytest.raises(SeqgenError):
        v.tokens([-1])


def test_to_list_round_trip_and_equality():
    v = Vocab.build([["a", "b", "b"]])
    assert Vocab(v.to_list()) == v
    assert v != Vocab.build([["a", "b"]])  # same tokens, different order
    assert len({v, Vocab(v.to_list())}) == 1


@pytest.mark.parametrize("tokens, match", [
    ([*SPECIALS, "a", "b", "a"], "duplicate"),
    ([*SPECIALS, UNK], "duplicate"),
    (["a", *SPECIALS], "specials"),
    ([PAD, BOS, UNK, EOS, "a"], "specials"),
    ([], "specials"),
    ([*SPECIALS, 5], "strings"),
])
def test_invalid_token_lists_raise(tokens, match):
    with pytest.raises(SeqgenError, match=match):
        Vocab(tokens)


def test_invalid_build_arguments_raise():
    with pytest.raises(SeqgenError, match="max_size"):
        Vocab.build([["a"]], max_size=3)
    with pytest.raises(SeqgenError, match="min_freq"):
        Vocab.build([["a"]], min_freq=0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.text(max_size=3), max_size=8), max_size=6), st.integers(1, 3),
       st.one_of(st.none(), st.integers(4, 12)))
def test_build_properties(seqs, min_freq, max_size):
    v = Vocab.build(seqs, min_freq=min_freq, max_size=max_size)
    assert v.to_list()[:4] == list(SPECIALS) and Vocab(v.to_list()) == v
    if max_size is not None:
        assert len(v) <= max_size
    counts = {}
    for s in seqs:
        for t in s:
            counts[t] = counts.get(t, 0) + 1
    kept = v.to_list()[4:]
    assert all(counts[t] >= min_freq for t in kept)
    assert [counts[t] for t in kept] == sorted((counts[t] for t in kept), reverse=True)
    for s in seqs:
        ids = v.lookup(s)
        assert v.tokens(ids) == [t if t in v else UNK for t in s]
