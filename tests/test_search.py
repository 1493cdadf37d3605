"""Search driven by scripted step functions: a search bug cannot hide behind a model.

The scripted "model" returns log-probs that are a fixed function of (input id, tokens fed so far), so every
expected result can be worked out by hand or by replaying a hypothesis token by token.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqgen.decoders.search import (Hypothesis, beam_search, greedy, length_penalty_term, sample,
                                    top_k_filter, top_p_filter)
from seqgen.errors import SeqgenError

V, EOS, BOS = 6, 0, 1
A, B, C, D = 2, 3, 4, 5
S = 4  # attention length

ProbFn = Callable[[int, tuple], Sequence[float]]


@dataclass
class ScriptState:
    ids: torch.Tensor                 # [N] which script each row follows
    hist: torch.Tensor                # [N, t] tokens fed so far, bos first
    attn: torch.Tensor | None = None  # [N, S] attention of the last step


class Scripted:
    """Scripted model: probs(input_id, tokens fed after bos) -> probability vector [V].

    With `attn=True`, each step also emits an attention vector [S] that depends on the history (and on
    enc["mem"] when an enc is given), so attention bookkeeping can be checked by replay.
    """

    def __init__(self, probs: ProbFn, attn: bool = False):
        self.probs, self.attn = probs, attn
        self.fed: list[torch.Tensor] = []   # tokens of every call, to check what the search fed
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def init_state(self, ids: Sequence[int]) -> ScriptState:
        ids = torch.as_tensor(ids, dtype=torch.long)
        return ScriptState(ids, torch.zeros(len(ids), 0, dtype=torch.long))

    def _row(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._cache:
            logp = torch.tensor(self.probs(key[0], key[2:]), dtype=torch.float).log()
            g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
            self._cache[key] = logp, torch.randn(S, generator=g)
        return self._cache[key]

    def step(self, tokens, state: ScriptState, enc):
        if enc is not None:  # enc must stay aligned with the (reordered, shrunk) rows
            assert torch.equal(enc["id"], state.ids)
        self.fed.append(tokens.clone())
        hist = torch.cat([state.hist, tokens[:, None]], 1)
        uniq, inverse = torch.unique(torch.cat([state.ids[:, None], hist], 1), dim=0, return_inverse=True)
        rows = [self._row(tuple(u)) for u in uniq.tolist()]
        logp = torch.stack([r[0] for r in rows])[inverse]
        attn = None
        if self.attn:
            scores = torch.stack([r[1] for r in rows])[inverse]
            attn = (scores + (enc["mem"] if enc is not None else 0)).softmax(-1)
        return logp, ScriptState(state.ids, hist, attn)


def table(entries: dict[tuple, dict[int, float]], default: dict[int, float] | None = None) -> ProbFn:
    """Probabilities keyed by the generated history; unspecified tokens get 0."""
    default = default or {EOS: 1.0}

    def probs(_id: int, hist: tuple) -> list[float]:
        d = entries.get(hist, default)
        return [d.get(v, 0.0) for v in range(V)]
    return probs


def random_table(seed: int, eos_bias: float = 0.0) -> ProbFn:
    """A different random distribution for every (seed, input, history); bos is never predicted."""
    def probs(i: int, hist: tuple) -> list[float]:
        g = torch.Generator().manual_seed(zlib.crc32(repr((seed, i, hist)).encode()))
        logits = torch.randn(V, generator=g) * 1.5
        logits[BOS] = -math.inf
        logits[EOS] += eos_bias + 0.4 * len(hist)  # sequences end, at various lengths
        return logits.softmax(0).tolist()
    return probs


def make_enc(ids: Sequence[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"id": torch.as_tensor(ids, dtype=torch.long), "mem": torch.randn(len(ids), S, generator=g)}


def replay(model: Scripted, i: int, hyp: Hypothesis, *, max_len: int, prefix: Sequence[int] = (),
           mem: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None]:
    """Feed bos + prefix + the hypothesis one token at a time; return its log-prob and attention [n, S]."""
    state = model.init_state([i])
    enc = None if mem is None else {"id": torch.tensor([i]), "mem": mem[None]}
    targets = list(hyp.tokens) + ([EOS] if len(hyp.tokens) < max_len else [])
    logp, state = model.step(torch.tensor([BOS]), state, enc)
    for tok in prefix:
        logp, state = model.step(torch.tensor([tok]), state, enc)
    total, attns = 0.0, []
    for tok in targets:
        total += logp[0, tok].item()
        if state.attn is not None:
            attns.append(state.attn[0])
        logp, state = model.step(torch.tensor([tok]), state, enc)
    return total, (torch.stack(attns) if attns else None)


def ngrams(seq: Sequence[int], n: int) -> list[tuple]:
    return [tuple(seq[j:j + n]) for j in range(len(seq) - n + 1)]


def repeats_made(context: Sequence[int], tokens: Sequence[int], n: int) -> list[tuple]:
    """n-grams completed by a generated token that were already present before it."""
    full = [*context, *tokens]
    return [tuple(full[j - n + 1:j + 1]) for j in range(len(context), len(full))
            if j - n + 1 >= 0 and tuple(full[j - n + 1:j + 1]) in ngrams(full[:j], n)]


# -- 1. beam finds what greedy misses ------------------------------------------------------------------

def test_beam_finds_best_sequence_greedy_misses():
    model = Scripted(table({(): {A: .6, B: .4}, (A,): {EOS: .34, B: .33, C: .33}, (B,): {EOS: .9, A: .1}}))
    g = greedy(model, model.init_state([0]), bos=BOS, eos=EOS, max_len=5)[0]
    assert g.tokens == [A] and g.log_prob == pytest.approx(math.log(.6 * .34), abs=1e-6)
    best = beam_search(model, model.init_state([0]), bos=BOS, eos=EOS, beam=2, max_len=5, length_penalty=0)[0]
    assert best[0].tokens == [B] and best[0].log_prob == pytest.approx(math.log(.4 * .9), abs=1e-6)


# -- 2. beam 1 == greedy --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_beam_one_is_greedy(seed):
    model = Scripted(random_table(seed))
    kw = dict(bos=BOS, eos=EOS, max_len=10, min_len=seed % 3, no_repeat_ngram=[0, 2][seed % 2])
    ids = list(range(4))
    g = greedy(model, model.init_state(ids), **kw)
    b = beam_search(model, model.init_state(ids), beam=1, length_penalty=0, **kw)
    for gh, (bh,) in zip(g, b):
        assert gh.tokens == bh.tokens
        assert gh.log_prob == bh.log_prob and bh.score == bh.log_prob


# -- 3. n-best ------------------------------------------------------------------------------------------

def test_n_best_sorted_and_distinct():
    model = Scripted(random_table(7))
    out = beam_search(model, model.init_state([0, 1, 2]), bos=BOS, eos=EOS, beam=4, n_best=4, max_len=8)
    for hyps in out:
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4
    with pytest.raises(SeqgenError, match="n-best"):
        beam_search(model, model.init_state([0]), bos=BOS, eos=EOS, beam=2, n_best=3)


# -- 4. length penalty -----------------------------------------------------------------------------------

def test_length_penalty_prefers_longer_with_large_alpha():
    # short: B eos (p .55, 2 steps);  long: A A A eos (p .45, 4 steps)
    model = Scripted(table({(): {B: .55, A: .45}, (B,): {EOS: 1}, (A,): {A: 1}, (A, A): {A: 1},
                            (A, A, A): {EOS: 1}}))
    for alpha, winner in [(0.0, [B]), (2.0, [A, A, A])]:
        hyps = beam_search(model, model.init_state([0]), bos=BOS, eos=EOS, beam=2, n_best=2, max_len=10,
                           length_penalty=alpha)[0]
        assert hyps[0].tokens == winner
        for h in hyps:
            assert h.score == pytest.approx(h.log_prob / ((5 + len(h.tokens) + 1) / 6) ** alpha, abs=1e-6)
    assert length_penalty_term(3, 0.0) == 1.0
    assert length_penalty_term(7, 1.0) == pytest.approx(2.0)
    assert torch.allclose(length_penalty_term(torch.tensor([1, 7]), 2.0), torch.tensor([1.0, 4.0]))


# -- 5. min_len / max_len ---------------------------------------------------------------------------------

def _all_hyps(model, ids, **kw):
    yield from greedy(model, model.init_state(ids), **kw)
    yield from sample(model, model.init_state(ids), generator=torch.Generator().manual_seed(0), **kw)
    for hyps in beam_search(model, model.init_state(ids), beam=3, n_best=3, **kw):
        yield from hyps


def test_min_len_suppresses_eos():
    model = Scripted(random_table(3, eos_bias=3.0))  # eos is very likely at once
    ids = list(range(5))
    assert any(len(h.tokens) < 4 for h in _all_hyps(model, ids, bos=BOS, eos=EOS, max_len=10))
    lengths = [len(h.tokens) for h in _all_hyps(model, ids, bos=BOS, eos=EOS, max_len=10, min_len=4)]
    assert min(lengths) >= 4


def test_max_len_caps_length():
    model = Scripted(random_table(4, eos_bias=-6.0))  # eos is unlikely
    lengths = [len(h.tokens) for h in _all_hyps(model, [0, 1, 2], bos=BOS, eos=EOS, max_len=6)]
    assert max(lengths) == 6


# -- 6. no_repeat_ngram -------------------------------------------------------------------------------------

def _loves_abab(_id: int, hist: tuple) -> list[float]:
    nxt = {A: B, B: A}.get(hist[-1] if hist else None, A)
    p = [0.03] * V
    p[BOS], p[nxt] = 0.0, 0.85
    return p


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(n):
    model = Scripted(_loves_abab)
    kw = dict(bos=BOS, eos=EOS, max_len=12)
    free = greedy(model, model.init_state([0]), **kw)[0]
    assert free.tokens[:6] == [A, B, A, B, A, B]
    hyps = [*greedy(model, model.init_state([0, 1]), no_repeat_ngram=n, **kw),
            *[h for hs in beam_search(model, model.init_state([0, 1]), beam=3, n_best=3, no_repeat_ngram=n, **kw)
              for h in hs]]
    for h in hyps:
        grams = ngrams([BOS, *h.tokens], n)
        assert len(grams) == len(set(grams)), (n, h.tokens)


def test_no_repeat_ngram_respects_prefix():
    model = Scripted(_loves_abab)
    out = greedy(model, model.init_state([0]), bos=BOS, eos=EOS, max_len=8, prefix=torch.tensor([A, B]),
                 no_repeat_ngram=2)[0]
    assert not repeats_made([BOS, A, B], out.tokens, 2)
    assert out.tokens[:1] == [A] and out.tokens[:2] != [A, B]  # "b a" is new, but "a b" is in the prompt


# -- 7. sampling limits and the filters ------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(top_k=1), dict(temperature=0.0), dict(temperature=1e-4), dict(top_p=1e-6)])
def test_sampling_limits_are_greedy(kw):
    model = Scripted(random_table(11))
    ids = list(range(6))
    g = greedy(model, model.init_state(ids), bos=BOS, eos=EOS, max_len=10)
    s = sample(model, model.init_state(ids), bos=BOS, eos=EOS, max_len=10,
               generator=torch.Generator().manual_seed(1), **kw)
    assert [h.tokens for h in s] == [h.tokens for h in g]
    assert [h.log_prob for h in s] == pytest.approx([h.log_prob for h in g], abs=1e-6)


def test_negative_temperature_is_an_error():
    model = Scripted(random_table(0))
    with pytest.raises(SeqgenError, match="--temperature must be >= 0"):
        sample(model, model.init_state([0]), bos=BOS, eos=EOS, temperature=-0.5)


def test_top_k_filter():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, 0.5, 0.5, 9.0]])
    before = logits.clone()
    out = top_k_filter(logits, 2)
    inf = -math.inf
    assert torch.equal(out[0], torch.tensor([inf, 3.0, 2.0, inf]))
    assert out[1, 3] == 9.0 and torch.isfinite(out[1]).sum() == 2   # exactly k even with ties
    assert torch.equal(logits, before)
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 4), logits)


def test_top_p_filter():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    before = logits.clone()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    assert kept(0.7) == [[False, True, False, True], [True, True, True, False]]
    assert kept(0.5)[0] == [False, True, False, False]
    assert kept(0.81)[0] == [True, True, False, True]
    assert kept(1e-9) == [[False, True, False, False], [True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    out = top_p_filter(logits, 0.7)
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])  # survivors keep their values
    assert torch.equal(logits, before)


# -- 8. sampling matches the distribution -----------------------------------------------------------------

def chi2_critical_999(df: int) -> float:
    """0.999 quantile of chi-square(df), Wilson-Hilferty approximation (within ~1% for df >= 3)."""
    z = 3.090232
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


FIRST = [0.1, 0.0, 0.15, 0.2, 0.25, 0.3]  # eos, bos, A, B, C, D


@pytest.mark.parametrize("kw, expected", [
    (dict(), FIRST),
    (dict(temperature=0.5), [p * p / sum(q * q for q in FIRST) for p in FIRST]),
    (dict(top_k=3), [0.0, 0.0, 0.0, 0.2 / 0.75, 0.25 / 0.75, 0.3 / 0.75]),
])
def test_sampling_matches_distribution(kw, expected):
    n = 20_000
    model = Scripted(table({(): dict(enumerate(FIRST))}))
    hyps = sample(model, model.init_state([0] * n), bos=BOS, eos=EOS, max_len=1,
                  generator=torch.Generator().manual_seed(123), **kw)
    counts = [0] * V
    for h in hyps:
        counts[h.tokens[0] if h.tokens else EOS] += 1
    support = [v for v in range(V) if expected[v] > 0]
    assert all(counts[v] == 0 for v in range(V) if v not in support)
    chi2 = sum((counts[v] - n * expected[v]) ** 2 / (n * expected[v]) for v in support)
    assert chi2 < chi2_critical_999(len(support) - 1), (counts, chi2)
    # log_prob is the model's, not the tempered / truncated one
    for h in hyps[:50]:
        assert h.log_prob == pytest.approx(math.log(FIRST[h.tokens[0] if h.tokens else EOS]), abs=1e-6)


def test_chi2_critical_value():
    assert chi2_critical_999(5) == pytest.approx(20.515, rel=0.02)
    assert chi2_critical_999(3) == pytest.approx(16.266, rel=0.02)


# -- 9. batched == one input at a time -------------------------------------------------------------------

def test_batched_beam_and_greedy_equal_single_inputs():
    ids = list(range(6))
    model = Scripted(random_table(21), attn=True)
    enc = make_enc(ids)
    kw = dict(bos=BOS, eos=EOS, max_len=12)
    batch_beam = beam_search(model, model.init_state(ids), enc, beam=3, n_best=3, **kw)
    rows_per_call = [len(t) for t in model.fed]
    batch_greedy = greedy(model, model.init_state(ids), enc, **kw)
    assert len({len(hs[0].tokens) for hs in batch_beam}) > 1  # inputs end at different lengths
    assert rows_per_call[-1] < len(ids) * 3                    # finished inputs left the working batch
    # ... a quarter of the working batch at a time (each leaving copies the encoder memory of all rows kept)
    beam_rows = rows_per_call[1:]                              # after bos, fed once per input
    for before, after in zip(beam_rows, beam_rows[1:]):
        assert after <= before and (before - after) % 3 == 0
        assert before == after or 4 * (before - after) >= before
    for i in ids:
        one = {"id": enc["id"][i:i + 1], "mem": enc["mem"][i:i + 1]}
        single = beam_search(model, model.init_state([i]), one, beam=3, n_best=3, **kw)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batch_beam[i]]
        assert [h.score for h in single] == pytest.approx([h.score for h in batch_beam[i]], abs=1e-5)
        g = greedy(model, model.init_state([i]), one, **kw)[0]
        assert g.tokens == batch_greedy[i].tokens
        assert g.log_prob == pytest.approx(batch_greedy[i].log_prob, abs=1e-5)


def test_confident_model_is_not_cut_short_by_its_own_truncations():
    # A confident model: one good token per step (0.97), eos 0.02, the rest 0.01 together. The good beam's eos
    # candidate is then among the k best every step (the other beams are far worse), so stopping as soon as an
    # input has k finished hypotheses returned k truncations of the answer and never the answer itself.
    answer = (A, B, C, D, A, B)

    def confident(_i: int, hist: tuple) -> list[float]:
        if hist == answer:
            d = {EOS: 1.0}
        elif hist == answer[:len(hist)]:
            good = answer[len(hist)]
            d = {good: 0.97, EOS: 0.02, **{v: 0.01 / 3 for v in (A, B, C, D) if v != good}}
        else:
            d = {EOS: 0.9, A: 0.025, B: 0.025, C: 0.025, D: 0.025}
        return [d.get(v, 0.0) for v in range(V)]
    model = Scripted(confident)
    for beam in (2, 3, 5):
        for alpha in (0.0, 1.0):
            hyps = beam_search(model, model.init_state([0]), bos=BOS, eos=EOS, beam=beam, n_best=beam,
                               max_len=20, length_penalty=alpha)[0]
            assert hyps[0].tokens == list(answer), (beam, alpha)
            assert hyps[0].log_prob == pytest.approx(math.log(0.97) * len(answer), abs=1e-4)
            assert len(hyps) == beam and all(len(h.tokens) < len(answer) for h in hyps[1:])


def test_finished_inputs_leave_the_working_batch_a_quarter_at_a_time():
    def staggered(i: int, hist: tuple) -> list[float]:   # input i ends after i + 1 tokens, every beam of it
        d = {EOS: 1.0} if len(hist) >= i + 1 else {A: 0.6, B: 0.4}
        return [d.get(v, 0.0) for v in range(V)]
    ids = list(range(8))
    model = Scripted(staggered)
    out = beam_search(model, model.init_state(ids), None, beam=2, n_best=2, bos=BOS, eos=EOS, max_len=20)
    assert [len(hs[0].tokens) for hs in out] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(len(hs) == 2 for hs in out)
    # rows per call: bos once per input, then 2 beams each; input 0 finishes first but its (dead) rows stay
    # until input 1 has finished too (2 of 8 blocks), then 2 of the 6 left, then one at a time (>= 1/4)
    assert [len(t) for t in model.fed] == [8, 16, 16, 12, 12, 8, 6, 4, 2]


# -- 10. prefix ----------------------------------------------------------------------------------------------

def test_prefix_is_fed_but_not_returned():
    model = Scripted(random_table(5))
    ids, prefix = [0, 1, 2], [C, A, D]
    for search in ("greedy", "beam"):
        model.fed.clear()
        if search == "greedy":
            hyps = greedy(model, model.init_state(ids), bos=BOS, eos=EOS, max_len=8, prefix=torch.tensor(prefix))
        else:
            hyps = [hs[0] for hs in beam_search(model, model.init_state(ids), bos=BOS, eos=EOS, beam=3,
                                                max_len=8, prefix=torch.tensor(prefix))]
        assert [t.tolist() for t in model.fed[:4]] == [[tok] * 3 for tok in [BOS, *prefix]]
        for i, h in zip(ids, hyps):
            lp, _ = replay(model, i, h, max_len=8, prefix=prefix)
            assert h.log_prob == pytest.approx(lp, abs=1e-5)


def test_max_len_counts_only_generated_tokens():
    model = Scripted(random_table(6, eos_bias=-6.0))
    prefix = torch.tensor([A, B, C, D, A])
    h = greedy(model, model.init_state([0]), bos=BOS, eos=EOS, max_len=3, prefix=prefix)[0]
    assert len(h.tokens) == 3
    hs = beam_search(model, model.init_state([0]), bos=BOS, eos=EOS, beam=2, max_len=3, prefix=prefix)[0]
    assert len(hs[0].tokens) == 3


def test_per_input_prefix():
    ids = [0, 1, 2, 3]
    prefixes = torch.tensor([[A, B], [C, C], [D, A], [B, D]])
    model = Scripted(random_table(8))
    kw = dict(bos=BOS, eos=EOS, max_len=8)
    batch = beam_search(model, model.init_state(ids), beam=3, n_best=2, prefix=prefixes, **kw)
    batch_g = greedy(model, model.init_state(ids), prefix=prefixes, **kw)
    for i in ids:
        single = beam_search(model, model.init_state([i]), beam=3, n_best=2, prefix=prefixes[i], **kw)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batch[i]]
        assert [h.score for h in single] == pytest.approx([h.score for h in batch[i]], abs=1e-5)
        assert greedy(model, model.init_state([i]), prefix=prefixes[i], **kw)[0].tokens == batch_g[i].tokens
    with pytest.raises(SeqgenError, match="prefix"):
        greedy(model, model.init_state(ids), prefix=prefixes[:2], **kw)


# -- 11. attention ----------------------------------------------------------------------------------------------

def test_attention_follows_the_hypothesis_path():
    ids = [0, 1, 2]
    model = Scripted(random_table(13), attn=True)
    enc = make_enc(ids, seed=1)
    kw = dict(bos=BOS, eos=EOS, max_len=7)
    hyps = [h for hs in beam_search(model, model.init_state(ids), enc, beam=3, n_best=3, **kw) for h in hs]
    hyps += greedy(model, model.init_state(ids), enc, **kw)
    owners = [i for i in ids for _ in range(3)] + ids
    for i, h in zip(owners, hyps):
        lp, attn = replay(model, i, h, max_len=7, mem=enc["mem"][i])
        n_steps = len(h.tokens) + (len(h.tokens) < 7)
        assert h.attention is not None and h.attention.shape == (n_steps, S)
        assert torch.allclose(h.attention, attn, atol=1e-6)
        assert h.log_prob == pytest.approx(lp, abs=1e-5)
    plain = Scripted(random_table(13))
    assert greedy(plain, plain.init_state(ids), **kw)[0].attention is None


# -- 12. step as object / function, enc None / pytree, any state pytree -------------------------------------

def test_step_object_function_and_enc_variants():
    ids = [0, 1, 2]
    model = Scripted(random_table(17))
    kw = dict(bos=BOS, eos=EOS, max_len=8)
    ref = beam_search(model, model.init_state(ids), beam=3, n_best=2, **kw)
    as_fn = beam_search(lambda t, s, e: model.step(t, s, e), model.init_state(ids), beam=3, n_best=2, **kw)
    with_enc = beam_search(model, model.init_state(ids), make_enc(ids), beam=3, n_best=2, **kw)

    def tuple_step(tokens, state, enc):  # a plain tuple state (ids, hist)
        logp, new = model.step(tokens, ScriptState(*state), enc)
        return logp, (new.ids, new.hist)
    start = model.init_state(ids)
    as_tuple = beam_search(tuple_step, (start.ids, start.hist), beam=3, n_best=2, **kw)
    for other in (as_fn, with_enc, as_tuple):
        assert [[h.tokens for h in hs] for hs in other] == [[h.tokens for h in hs] for hs in ref]
        assert [[h.score for h in hs] for hs in other] == [[h.score for h in hs] for hs in ref]
    g_fn = greedy(lambda t, s, e: model.step(t, s, e), model.init_state(ids), **kw)
    assert [h.tokens for h in g_fn] == [h.tokens for h in greedy(model, model.init_state(ids), **kw)]


def test_state_without_tensor_is_an_error():
    with pytest.raises(SeqgenError, match="state"):
        greedy(lambda t, s, e: None, {"nothing": None}, bos=BOS, eos=EOS)


# -- property: every hypothesis is consistent with a replay ------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), beam=st.integers(1, 4), n_inputs=st.integers(1, 3),
       max_len=st.integers(1, 7), min_len=st.integers(0, 3), no_repeat=st.integers(0, 3),
       alpha=st.sampled_from([0.0, 0.6, 1.5]), prefix=st.lists(st.sampled_from([A, B, C, D]), max_size=2))
def test_beam_hypotheses_are_consistent(seed, beam, n_inputs, max_len, min_len, no_repeat, alpha, prefix):
    model = Scripted(random_table(seed))
    ids = list(range(n_inputs))
    out = beam_search(model, model.init_state(ids), bos=BOS, eos=EOS, beam=beam, n_best=beam, max_len=max_len,
                      min_len=min_len, length_penalty=alpha, no_repeat_ngram=no_repeat,
                      prefix=torch.tensor(prefix, dtype=torch.long) if prefix else None)
    for i, hyps in zip(ids, out):
        assert 1 <= len(hyps) <= beam
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            n = len(h.tokens)
            # only no_repeat_ngram=1 can ban every token (then eos ends the row early)
            assert n <= max_len and (n >= min(min_len, max_len) or no_repeat == 1)
            lp, _ = replay(model, i, h, max_len=max_len, prefix=prefix)
            assert h.log_prob == pytest.approx(lp, abs=1e-4)
            length = n + (n < max_len)
            assert h.score == pytest.approx(h.log_prob / ((5 + length) / 6) ** alpha, abs=1e-5)
            if no_repeat:
                assert not repeats_made([BOS, *prefix], h.tokens, no_repeat)


# -- the real decoder fits the contract ------------------------------------------------------------------------

def test_rnn_decoder_with_attention():
    from seqgen.decoders import DecoderConfig, RNNDecoder
    from seqgen.encoders.base import EncoderOutput

    torch.manual_seed(0)
    vocab, n, src, h = 11, 3, 5, 8
    dec = RNNDecoder(DecoderConfig(emb=8, hidden=12, attention="bahdanau", dropout=0.0), vocab,
                     enc_state_size=h, memory_size=h).eval()
    mask = torch.ones(n, src, dtype=torch.bool)
    mask[1, 3:] = False
    enc = dec.prepare(EncoderOutput(state=torch.randn(n, h), memory=torch.randn(n, src, h), mask=mask))
    kw = dict(bos=BOS, eos=EOS, max_len=6)
    g = greedy(dec, dec.init_state(enc, n), enc, **kw)
    b = beam_search(dec, dec.init_state(enc, n), enc, beam=1, length_penalty=0, **kw)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert [h.log_prob for h in g] == pytest.approx([hs[0].log_prob for hs in b], abs=1e-5)
    best = beam_search(dec, dec.init_state(enc, n), enc, beam=4, n_best=2, **kw)
    for hyps in best:
        for hyp in hyps:
            steps = len(hyp.tokens) + (len(hyp.tokens) < 6)
            assert hyp.attention.shape == (steps, src)
    assert torch.all(best[1][0].attention[:, 3:] == 0)  # padding gets no attention
