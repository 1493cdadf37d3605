"""Vocab: token strings <-> ids, with the four specials <pad> <bos> <eos> <unk> always at ids 0..3.

A Vocab is an ordered list of distinct token strings; it knows nothing about how text becomes tokens
(that is the tokenizer's job, see `seqgen.tokenizers`). It travels inside checkpoints as a plain list of
str (`to_list()`), so loading one never needs pickled code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from seqgen.errors import SeqgenError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)


class Vocab:
    """An immutable, ordered set of token strings; specials first at ids 0 (pad), 1 (bos), 2 (eos), 3 (unk)."""

    def __init__(self, tokens: Sequence[str]):
        """tokens: the full list, `SPECIALS` first in that order. SeqgenError on duplicates or missing specials."""
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise SeqgenError(f"a vocabulary must start with the specials {list(SPECIALS)}, got "
                              f"{tokens[:len(SPECIALS)]} — the checkpoint or token list is not a seqgen vocabulary")
        not_str = [t for t in tokens if not isinstance(t, str)]
        if not_str:
            raise SeqgenError(f"vocabulary tokens must be strings, got {not_str[0]!r} ({type(not_str[0]).__name__})")
        index = {token: i for i, token in enumerate(tokens)}
        if len(index) != len(tokens):
            dupes = [t for t, n in Counter(tokens).items() if n > 1]
            raise SeqgenError(f"vocabulary has {len(dupes)} duplicate token(s), e.g. {dupes[:5]!r} — "
                              "tokens must be distinct")
        self._tokens: tuple[str, ...] = tuple(tokens)
        self._index: dict[str, int] = index

    @classmethod
    def build(cls, sequences: Iterable[Iterable[str]], min_freq: int = 1, max_size: int | None = None) -> Vocab:
        """Count the tokens of `sequences`; returns a Vocab of the specials plus every token seen >= min_freq times.

        Most frequent first, ties broken by the token string, so the same input always gives the same ids.
        max_size caps the total size including the 4 specials (None = no cap). Tokens equal to a special string
        are not counted again (they already have an id).
        """
        counts: Counter[str] = Counter()
        for seq in sequences:
            counts.update(seq)
        return cls.from_counts(counts, min_freq=min_freq, max_size=max_size)

    @classmethod
    def from_counts(cls, counts: Counter[str], min_freq: int = 1, max_size: int | None = None) -> Vocab:
        """The Vocab `build` makes from token counts (counted elsewhere, e.g. in parallel over parts of a corpus:
        the order of counting does not matter)."""
        if min_freq < 1:
            raise SeqgenError(f"min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < len(SPECIALS):
            raise SeqgenError(f"max_size must be at least {len(SPECIALS)} (the specials {', '.join(SPECIALS)}), "
                              f"got {max_size}")
        counts = Counter(counts)
        for special in SPECIALS:
            counts.pop(special, None)
        kept = sorted((t for t, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max_size - len(SPECIALS)]
        return cls([*SPECIALS, *kept])

    @property
    def pad(self) -> int:
        """Returns the id of <pad> (0)."""
        return 0

    @property
    def bos(self) -> int:
        """Returns the id of <bos> (1)."""
        return 1

    @property
    def eos(self) -> int:
        """Returns the id of <eos> (2)."""
        return 2

    @property
    def unk(self) -> int:
        """Returns the id of <unk> (3)."""
        return 3

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._tokens)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self._tokens == other._tokens

    def __hash__(self) -> int:
        return hash(self._tokens)

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in self._tokens[len(SPECIALS): len(SPECIALS) + 5])
        return f"Vocab(size={len(self)}, first=[{head}{', ...' if len(self) > len(SPECIALS) + 5 else ''}])"

    def lookup(self, tokens: Iterable[str]) -> list[int]:
        """Returns the id of each token; tokens not in the vocabulary get the <unk> id."""
        get, unk = self._index.get, self.unk
        return [get(t, unk) for t in tokens]

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """Returns the token string of each id (ints or 0-d tensors). Raises SeqgenError on an id outside [0, len)."""
        out = []
        size = len(self._tokens)
        for i in ids:
            i = int(i)
            if not 0 <= i < size:
                raise SeqgenError(f"token id {i} is outside the vocabulary (size {size}) — "
                                  "the model and its vocabulary do not match")
            out.append(self._tokens[i])
        return out

    def to_list(self) -> list[str]:
        """Returns the tokens in id order as a plain list (for checkpoints); `Vocab(v.to_list()) == v`."""
        return list(self._tokens)
