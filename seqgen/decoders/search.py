"""Search: greedy, sampling (temperature, top-k, top-p) and batched beam search.

The algorithms know nothing about models. They drive any `step(tokens [N], state, enc) -> (log_probs [N, V],
new_state)`, a plain function or an object with a `.step` method (e.g. `RNNDecoder`), where `state` and `enc`
are batch-first pytrees (tensors, dataclasses, tuples, lists, dicts) that `select_batch` can reorder.

Conventions shared by all three:
- the first token fed is `bos`; `prefix` ([P] shared or [B, P] per input) is forced after it and neither its
  tokens nor its log-probs are part of a hypothesis;
- `max_len` / `min_len` count generated tokens only (eos included): eos is forbidden while fewer than
  `min_len` tokens have been generated, and a sequence still open after `max_len` tokens is finished as is;
- `no_repeat_ngram=n` forbids any token that would complete an n-gram already present in bos + prefix +
  generated tokens;
- if those constraints forbid every token of a row, eos is allowed again so that the row ends instead of
  emitting a token the model gave probability zero;
- `stream(i, tokens)`, when given, is called whenever the part of input i's output that can no longer change
  grows: every generated token for greedy and sampling; for beam search the longest prefix shared by every
  open beam and every finished hypothesis of the input (whatever wins, it starts with that prefix);
- when the state returned by `step` has an `attn` tensor [N, S], each hypothesis carries the attention of
  each generated step, [n_steps, S], so an attention map needs no second pass through the model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from seqgen.decoders.state import repeat_batch, select_batch
from seqgen.errors import SeqgenError

StepFn = Callable[[Tensor, Any, Any], tuple[Tensor, Any]]


class Stepper(Protocol):
    def step(self, tokens: Tensor, state: Any, enc: Any) -> tuple[Tensor, Any]: ...


@dataclass
class Hypothesis:
    """One generated sequence.

    tokens:    generated ids, without bos, without the forced prefix, without the final eos.
    score:     ranking score = log_prob / length_penalty_term(length, alpha) (== log_prob for greedy and sampling).
    log_prob:  sum of the model's log-probs of the generated tokens, including eos when eos was produced.
    attention: [n_steps, S] attention of each generated step (the eos step included), or None.
    """

    tokens: list[int]
    score: float
    log_prob: float
    attention: Tensor | None = None


# -- small pure pieces ---------------------------------------------------------------------------------

def length_penalty_term(length: int | Tensor, alpha: float) -> float | Tensor:
    """GNMT length normalisation ((5 + length) / 6) ** alpha; 1 when alpha == 0 (scores are raw log-probs)."""
    if alpha == 0:
        return torch.ones_like(length, dtype=torch.float) if isinstance(length, Tensor) else 1.0
    return ((5 + length) / 6) ** alpha


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row, set the others to -inf.

    logits: [..., V].  Returns a new tensor of the same shape (the input itself when k <= 0 or k >= V).
    Exactly k survive even when values tie, so top_k=1 is greedy.
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    values, index = logits.topk(k, dim=-1)
    return torch.full_like(logits, -math.inf).scatter(-1, index, values)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches p.

    logits: [..., V].  Returns a new tensor with the other logits set to -inf (the input itself when p >= 1).
    The most likely token always survives, so a tiny p is greedy.
    """
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


# -- shared plumbing -----------------------------------------------------------------------------------

def _resolve(step: StepFn | Stepper) -> StepFn:
    return step.step if hasattr(step, "step") else step


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    elif isinstance(obj, (tuple, list)):
        children = iter(obj)
    elif isinstance(obj, dict):
        children = iter(obj.values())
    else:
        return None
    for child in children:
        found = _first_tensor(child)
        if found is not None:
            return found
    return None


def _batch_size(state: Any) -> tuple[int, torch.device]:
    """Batch size N and device of a batch-first state: those of the first tensor found in it."""
    first = _first_tensor(state)
    if first is None or first.dim() == 0:
        raise SeqgenError(f"search needs a batch-first decoder state with at least one tensor "
                          f"(got {type(state).__name__}); build it with the decoder's init_state()")
    return first.size(0), first.device


def _prefix_matrix(prefix: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """prefix [P] or [B, P] -> LongTensor [B, P] on `device` (None stays None)."""
    if prefix is None:
        return None
    prefix = torch.as_tensor(prefix)
    if prefix.dim() == 1:
        prefix = prefix.unsqueeze(0).expand(n, -1)
    elif prefix.dim() != 2 or prefix.size(0) != n:
        raise SeqgenError(f"prefix must have shape [P] or [B, P] with B = {n} inputs "
                          f"(got {tuple(prefix.shape)})")
    return prefix.to(device=device, dtype=torch.long)


def _attention(state: Any, rows: int) -> Tensor | None:
    attn = getattr(state, "attn", None)
    if isinstance(attn, Tensor) and attn.dim() >= 1 and attn.size(0) == rows:
        return attn
    return None


def _prime(fn: StepFn, state: Any, enc: Any, bos: int, prefix: Tensor | None, n: int,
           device: torch.device) -> tuple[Tensor, Tensor, Any]:
    """Feed bos and the forced prefix to all n rows.

    Returns the history [n, 1 + P] (bos + prefix), the log-probs [n, V] for the first generated token and the
    state after the last forced token.
    """
    bos_col = torch.full((n, 1), bos, dtype=torch.long, device=device)
    history = bos_col if prefix is None else torch.cat([bos_col, prefix], dim=1)
    log_probs = None
    for j in range(history.size(1)):
        log_probs, state = fn(history[:, j], state, enc)
    if not isinstance(log_probs, Tensor) or log_probs.dim() != 2 or log_probs.size(0) != n:
        shape = tuple(log_probs.shape) if isinstance(log_probs, Tensor) else type(log_probs).__name__
        raise SeqgenError(f"step() must return log-probs of shape [N, V] with N = {n} rows (got {shape})")
    return history, log_probs, state


def _extend(attn_history: Tensor | None, attn: Tensor | None, rows: Tensor | None = None) -> Tensor | None:
    """Append this step's attention [R, S] to the history [R, t, S] of `rows` (all rows when None)."""
    if attn is None:
        return None
    if rows is not None:
        attn, attn_history = attn[rows], (attn_history[rows] if attn_history is not None else None)
    step = attn.unsqueeze(1)
    return step if attn_history is None else torch.cat([attn_history, step], dim=1)


StreamFn = Callable[[int, list[int]], None]


class _Streamer:
    """Calls stream(i, tokens) when input i's settled tokens grow (see the module docstring)."""

    def __init__(self, fn: StreamFn, eos: int):
        self.fn, self.eos, self.sent = fn, eos, {}

    def settled(self, i: int, tokens: list[int]) -> None:
        if tokens and tokens[-1] == self.eos:
            tokens = tokens[:-1]
        if len(tokens) > self.sent.get(i, 0):
            self.sent[i] = len(tokens)
            self.fn(i, tokens)

    def shared(self, i: int, sequences: list[list[int]]) -> None:
        """The longest common prefix of `sequences` is settled."""
        if not sequences:
            return
        first, n = sequences[0], min(len(s) for s in sequences)
        for s in sequences[1:]:
            n = next((j for j in range(n) if s[j] != first[j]), n)
        self.settled(i, first[:n])


def _ban_repeated_ngrams(log_probs: Tensor, history: Tensor, n: int) -> None:
    """In place: -inf for every token that would complete an n-gram already in `history` [R, T]."""
    t = history.size(1)
    if t < n:
        return
    windows = history.unfold(1, n, 1)                               # [R, T-n+1, n]: every n-gram so far
    last = history[:, t - n + 1:].unsqueeze(1)                       # [R, 1, n-1]: what the next n-gram starts with
    match = (windows[:, :, :-1] == last).all(dim=-1)                 # [R, T-n+1]
    rows, cols = match.nonzero(as_tuple=True)
    log_probs[rows, windows[rows, cols, -1]] = -math.inf


def _constrain(log_probs: Tensor, history: Tensor, n_generated: int, *, eos: int, min_len: int,
               no_repeat_ngram: int) -> Tensor:
    """log_probs [R, V] with min_len / no-repeat constraints applied (float32; the input is not modified)."""
    log_probs = log_probs.float()
    ban_eos = n_generated < min_len
    if not ban_eos and no_repeat_ngram <= 0:
        return log_probs
    out = log_probs.clone()
    if ban_eos:
        out[:, eos] = -math.inf
    if no_repeat_ngram > 0:
        _ban_repeated_ngrams(out, history, no_repeat_ngram)
    # A row with nothing left to say ends rather than emit a token the constraints (or the model) ruled out.
    stuck = torch.isneginf(out).all(dim=-1)
    out[:, eos] = torch.where(stuck, log_probs[:, eos], out[:, eos])
    return out


def _check_lengths(max_len: int, min_len: int, no_repeat_ngram: int) -> None:
    if max_len < 0 or min_len < 0:
        raise SeqgenError(f"--max-len and --min-len must be >= 0 (got max_len={max_len}, min_len={min_len})")
    if no_repeat_ngram < 0:
        raise SeqgenError(f"--no-repeat-ngram must be >= 0 (got {no_repeat_ngram}); 0 turns it off")


# -- greedy and sampling: one hypothesis per input -----------------------------------------------------

def _decode_one_each(fn: StepFn, state: Any, enc: Any, choose: Callable[[Tensor], Tensor], *, bos: int,
                     eos: int, max_len: int, min_len: int, prefix: Tensor | None,
                     no_repeat_ngram: int, stream: StreamFn | None = None) -> list[Hypothesis]:
    """Left-to-right decoding where `choose(log_probs [R, V]) -> tokens [R]` picks each row's next token."""
    _check_lengths(max_len, min_len, no_repeat_ngram)
    n, device = _batch_size(state)
    if max_len == 0:
        return [Hypothesis([], 0.0, 0.0, None) for _ in range(n)]
    history, log_probs, state = _prime(fn, state, enc, bos, _prefix_matrix(prefix, n, device), n, device)
    context = history.size(1)
    results: list[Hypothesis | None] = [None] * n
    inputs = torch.arange(n, device=device)             # input index of each working row
    streamer = _Streamer(stream, eos) if stream is not None else None
    total = torch.zeros(n, device=device)
    attn_history: Tensor | None = None                  # [R, t, S]
    for t in range(max_len):
        attn = _attention(state, history.size(0))
        allowed = _constrain(log_probs, history, t, eos=eos, min_len=min_len, no_repeat_ngram=no_repeat_ngram)
        tokens = choose(allowed)
        # The model's own log-prob, not the filtered / tempered one the sampler drew from.
        total = total + log_probs.float().gather(1, tokens.unsqueeze(1)).squeeze(1)
        history = torch.cat([history, tokens.unsqueeze(1)], dim=1)
        attn_history = _extend(attn_history, attn)
        if stream is not None:
            for i, seq in zip(inputs.tolist(), history[:, context:].tolist()):
                streamer.settled(i, seq)
        ended = tokens == eos
        done = torch.ones_like(ended) if t == max_len - 1 else ended
        if done.any():
            rows = done.nonzero().squeeze(1)
            attn_rows = attn_history[rows].unbind(0) if attn_history is not None else [None] * len(rows)
            for i, seq, eos_end, lp, att in zip(inputs[rows].tolist(), history[rows, context:].tolist(),
                                                ended[rows].tolist(), total[rows].tolist(), attn_rows):
                results[i] = Hypothesis(seq[:-1] if eos_end else seq, lp, lp, att)
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            # Finished rows leave the batch so they cost no further model compute.
            state, enc = select_batch(state, keep), select_batch(enc, keep)
            history, total, inputs, tokens = history[keep], total[keep], inputs[keep], tokens[keep]
            attn_history = attn_history[keep] if attn_history is not None else None
        log_probs, state = fn(tokens, state, enc)
    return results  # type: ignore[return-value]


@torch.no_grad()
def greedy(step: StepFn | Stepper, state: Any, enc: Any = None, *, bos: int, eos: int, max_len: int = 100,
           min_len: int = 0, prefix: Tensor | None = None, no_repeat_ngram: int = 0,
           stream: StreamFn | None = None) -> list[Hypothesis]:
    """Always take the most likely allowed token.

    state: batch-first pytree for N inputs; enc: batch-first pytree or None; prefix: [P] or [N, P].
    Returns one Hypothesis per input (score == log_prob).
    """
    return _decode_one_each(_resolve(step), state, enc, lambda lp: lp.argmax(dim=-1), bos=bos, eos=eos,
                            max_len=max_len, min_len=min_len, prefix=prefix, no_repeat_ngram=no_repeat_ngram,
                            stream=stream)


@torch.no_grad()
def sample(step: StepFn | Stepper, state: Any, enc: Any = None, *, bos: int, eos: int, max_len: int = 100,
           min_len: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           prefix: Tensor | None = None, no_repeat_ngram: int = 0,
           generator: torch.Generator | None = None, stream: StreamFn | None = None) -> list[Hypothesis]:
    """Draw each token from softmax(log_probs / temperature), restricted by top_k then top_p.

    state: batch-first pytree for N inputs; enc: batch-first pytree or None; prefix: [P] or [N, P].
    temperature 0 is greedy.  Returns one Hypothesis per input; log_prob (== score) sums the model's
    unfiltered log-probs of the drawn tokens.
    """
    if temperature < 0:
        raise SeqgenError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy decoding")
    if temperature == 0:
        return greedy(step, state, enc, bos=bos, eos=eos, max_len=max_len, min_len=min_len, prefix=prefix,
                      no_repeat_ngram=no_repeat_ngram, stream=stream)

    def choose(log_probs: Tensor) -> Tensor:
        logits = top_p_filter(top_k_filter(log_probs / temperature, top_k), top_p)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

    return _decode_one_each(_resolve(step), state, enc, choose, bos=bos, eos=eos, max_len=max_len,
                            min_len=min_len, prefix=prefix, no_repeat_ngram=no_repeat_ngram, stream=stream)


# -- beam search ---------------------------------------------------------------------------------------

@torch.no_grad()
def beam_search(step: StepFn | Stepper, state: Any, enc: Any = None, *, bos: int, eos: int, beam: int = 5,
                max_len: int = 100, min_len: int = 0, length_penalty: float = 1.0, n_best: int = 1,
                no_repeat_ngram: int = 0, prefix: Tensor | None = None,
                stream: StreamFn | None = None) -> list[list[Hypothesis]]:
    """Beam search over all inputs and beams at once (one working batch of inputs * beam rows).

    state: batch-first pytree for B inputs; enc: batch-first pytree or None (repeated once per beam with
    `repeat_batch`, never reordered; an `EncoderOutput` shares its memory between the beams); prefix: [P] or
    [B, P].  length_penalty: GNMT alpha, score = log_prob / ((5 + len) / 6) ** alpha with len counting eos.
    An input stops after `max_len` tokens, or once it has `beam` finished hypotheses (the best found so far) and
    none of its open beams, ended at the next step, would beat the worst of them.
    Returns, per input, its `n_best` best hypotheses sorted by score, best first (fewer only when the
    constraints leave fewer possible sequences).
    """
    if beam < 1 or not 1 <= n_best <= beam:
        raise SeqgenError(f"--n-best must be between 1 and --beam (got n_best={n_best}, beam={beam})")
    _check_lengths(max_len, min_len, no_repeat_ngram)
    fn = _resolve(step)
    n_inputs, device = _batch_size(state)
    if max_len == 0:
        return [[Hypothesis([], 0.0, 0.0, None)] for _ in range(n_inputs)]
    k = beam
    history, log_probs, state = _prime(fn, state, enc, bos, _prefix_matrix(prefix, n_inputs, device),
                                       n_inputs, device)
    context = history.size(1)
    # bos and the prefix are the same for every beam, so they ran once per input; beams start here.
    # Input i owns rows i*k .. i*k+k-1, and beams never leave their block, so the expanded enc stays valid.
    state, enc = repeat_batch(state, k), repeat_batch(enc, k)
    history, log_probs = history.repeat_interleave(k, dim=0), log_probs.repeat_interleave(k, dim=0)
    vocab = log_probs.size(1)
    n_cand = min(2 * k, k * vocab)  # 2k: even if k of them are eos, k live candidates remain
    alive = torch.full((n_inputs, k), -math.inf, device=device)
    alive[:, 0] = 0.0  # the beams of an input are identical at first: let only one of them propose
    live: list[int] = list(range(n_inputs))  # input index of each working block
    done: set[int] = set()                   # working blocks whose input has its k hypotheses (see below)
    finished: list[list[Hypothesis]] = [[] for _ in range(n_inputs)]
    attn_history: Tensor | None = None
    rank = torch.arange(n_cand, device=device)
    beam_offsets = torch.arange(k, device=device)
    streamer = _Streamer(stream, eos) if stream is not None else None

    for t in range(max_len):
        blocks = len(live)
        attn = _attention(state, blocks * k)
        allowed = _constrain(log_probs, history, t, eos=eos, min_len=min_len, no_repeat_ngram=no_repeat_ngram)
        cand = (alive.view(-1, 1) + allowed).view(blocks, k * vocab)
        top_val, top_idx = cand.topk(n_cand, dim=1)                  # [blocks, 2k], best first
        top_beam, top_tok = top_idx // vocab, top_idx % vocab
        is_eos = top_tok == eos
        block_rows = torch.arange(blocks, device=device).unsqueeze(1) * k

        # eos among the k best candidates of an input ends a hypothesis; an input keeps its k best.
        ending = is_eos[:, :k] & torch.isfinite(top_val[:, :k])
        if ending.any():
            b_idx, c_idx = ending.nonzero(as_tuple=True)             # row-major: best first within an input
            parents = block_rows.squeeze(1)[b_idx] + top_beam[b_idx, c_idx]
            att = _extend(attn_history, attn, parents)
            attn_rows = att.unbind(0) if att is not None else [None] * len(parents)
            norm = length_penalty_term(t + 1, length_penalty)
            for b, seq, lp, a in zip(b_idx.tolist(), history[parents, context:].tolist(),
                                     top_val[b_idx, c_idx].tolist(), attn_rows):
                _keep_best(finished[live[b]], Hypothesis(seq, lp / norm, lp, a), k)

        # The k best non-eos candidates go on: rank eos candidates after all others and take the first k.
        pick = (rank + is_eos.long() * n_cand).topk(k, dim=1, largest=False).indices
        new_val, new_tok = top_val.gather(1, pick), top_tok.gather(1, pick)
        new_val = new_val.masked_fill(new_tok == eos, -math.inf)  # only when fewer than k non-eos candidates exist
        parent = (block_rows + top_beam.gather(1, pick)).view(-1)

        # An input is done once it has k hypotheses and its best open beam, ended at the next step, would score
        # no better than the worst of them. Stopping at k hypotheses alone (fairseq's rule) fails confident
        # models: each step's eos candidate of the one good beam is among the k best candidates (the other beams
        # being far worse), so k truncations of the right answer end the input before it is complete.
        full = [b for b in range(blocks) if b not in done and len(finished[live[b]]) == k]
        newly_done: list[int] = []
        if full:
            best_open = (new_val.max(dim=1).values / length_penalty_term(t + 2, length_penalty)).tolist()
            newly_done = [b for b in full if best_open[b] <= min(h.score for h in finished[live[b]])]
        done.update(newly_done)
        if t == max_len - 1:
            history = torch.cat([history[parent], new_tok.view(-1, 1)], dim=1)
            attn_history = _extend(attn_history, attn, parent)
            _finish_open(finished, live, done, new_val, history[:, context:], attn_history,
                         length_penalty, t + 1, k)
            break
        if len(done) == blocks:
            break
        if newly_done:
            # A finished input's beams die (-inf: they propose nothing more) but stay in the working batch until
            # a quarter of it is finished: leaving copies the encoder memory, [rows, S, H] for every row kept,
            # which for image grids costs more than a few steps of the dead rows.
            new_val[torch.tensor(newly_done, device=device)] = -math.inf
        if 4 * len(done) >= blocks:
            keep_blocks = [b for b in range(blocks) if b not in done]
            keep = torch.tensor(keep_blocks, device=device)
            live = [live[b] for b in keep_blocks]
            enc = select_batch(enc, (keep.unsqueeze(1) * k + beam_offsets).view(-1))
            parent = parent.view(blocks, k)[keep].view(-1)
            new_val, new_tok = new_val[keep], new_tok[keep]
            done = set()

        history = torch.cat([history[parent], new_tok.view(-1, 1)], dim=1)
        attn_history = _extend(attn_history, attn, parent)
        if stream is not None:
            _stream_beams(streamer, live, new_val, history[:, context:], finished, k)
        state = select_batch(state, parent)
        alive = new_val
        log_probs, state = fn(new_tok.view(-1), state, enc)

    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in finished]


def _stream_beams(streamer: _Streamer, live: list[int], alive: Tensor, generated: Tensor,
                  finished: list[list[Hypothesis]], k: int) -> None:
    """Report, per working input, the prefix shared by its open beams (alive [blocks, k] finite; generated
    [blocks * k, t] tokens) and its finished hypotheses: whichever wins starts with it."""
    open_beams = torch.isfinite(alive).tolist()
    seqs = generated.tolist()
    for b, i in enumerate(live):
        candidates = [seqs[b * k + j] for j in range(k) if open_beams[b][j]] + [h.tokens for h in finished[i]]
        streamer.shared(i, candidates)


def _keep_best(hyps: list[Hypothesis], hyp: Hypothesis, k: int) -> None:
    """Add `hyp` to an input's finished hypotheses, keeping at most the k best-scoring."""
    if len(hyps) < k:
        hyps.append(hyp)
        return
    worst = min(range(k), key=lambda j: hyps[j].score)
    if hyp.score > hyps[worst].score:
        hyps[worst] = hyp


def _finish_open(finished: list[list[Hypothesis]], live: list[int], done: set[int], alive: Tensor,
                 generated: Tensor, attn_history: Tensor | None, alpha: float, length: int, k: int) -> None:
    """At max_len, the open beams of each unfinished input become hypotheses as they are (no eos).

    alive: [blocks, k] scores; generated: [blocks * k, length] tokens; attn_history: [blocks * k, length, S].
    Dead beams (-inf) are skipped unless an input would otherwise end with nothing.
    """
    norm = length_penalty_term(length, alpha)
    scores, seqs = alive.tolist(), generated.tolist()
    for b, i in enumerate(live):
        if b in done:
            continue
        for j in range(k):
            lp = scores[b][j]
            if math.isfinite(lp) or (j == 0 and not finished[i]):
                row = b * k + j
                att = attn_history[row].clone() if attn_history is not None else None
                finished[i].append(Hypothesis(seqs[row], lp / norm, lp, att))


__all__ = ["Hypothesis", "StepFn", "Stepper", "StreamFn", "beam_search", "greedy", "length_penalty_term", "sample",
           "top_k_filter", "top_p_filter"]
