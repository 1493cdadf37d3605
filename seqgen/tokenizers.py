"""Tokenizers map text <-> token strings; a `Vocab` maps token strings <-> ids; a `TextCodec` is both.

Three levels, chosen with `--level`:

- char:    one token per Unicode code point. Exact round trip on any text.
- word:    words, single punctuation characters and whitespace runs, with a single space before a token folded
           into it as a "▁" prefix. Exact round trip on any text (see `WordTokenizer`).
- subword: a sentencepiece model trained on the training text. Round trip is exact for text made of characters
           seen in training, except: a literal "▁" (U+2581) reads back as a space (sentencepiece's own whitespace
           marker), and NUL and U+001F are never learned, so they become <unk>. Line breaks ("\n", "\r") are
           tokens handled outside sentencepiece, so they always survive (CRLF text included). A lone surrogate
           (only a command-line argument can hold one) reads as U+FFFD.

A tokenizer travels inside checkpoints as `tokenizer_to_dict(tok)`: only str and a uint8 tensor, so
`torch.load(weights_only=True)` can read it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, Protocol

import numpy as np
import torch

from seqgen.errors import SeqgenError
from seqgen.vocab import BOS, EOS, PAD, SPECIALS, UNK, Vocab

LEVELS: tuple[str, ...] = ("char", "word", "subword")
SPACE_MARK = "\u2581"  # "▁": marks a single space folded into the following token (sentencepiece's convention)
# sentencepiece sees one line at a time and drops a trailing "\r" while training, so both line-break characters
# are kept out of it and become tokens of their own.
_SPM_LINE_BREAKS: tuple[str, ...] = ("\n", "\r")
_LINE_SPLIT = re.compile(r"([\n\r])")
# sentencepiece refuses a str holding a lone surrogate; files never hold one, but a command-line argument with
# undecodable bytes does (Python's surrogateescape), so the subword tokenizer reads it as U+FFFD.
_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer(Protocol):
    """Anything that maps text to a list of token strings and back."""

    level: str

    def tokenize(self, text: str) -> list[str]: ...

    def detokenize(self, tokens: Sequence[str]) -> str: ...


class CharTokenizer:
    """One token per Unicode code point (combining marks, emoji parts and control characters included)."""

    level = "char"

    def tokenize(self, text: str) -> list[str]:
        """Returns the code points of `text` as one-character strings."""
        return list(text)

    def detokenize(self, tokens: Sequence[str]) -> str:
        """Returns the tokens concatenated."""
        return "".join(tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer)

    def __hash__(self) -> int:
        return hash(self.level)

    def __repr__(self) -> str:
        return "CharTokenizer()"


# Every character of any text falls into exactly one alternative, so joining the matches gives the text back.
_WORD_SPLIT = re.compile(r"\n|[^\S\n]+|\w+|[^\w\s]")


class WordTokenizer:
    """Words, single punctuation characters and whitespace, with exact round trip on any text.

    Text is split into "\\n" | runs of other whitespace | \\w+ | one [^\\w\\s] character. A single space " "
    right before a word or punctuation token is folded into it as a "▁" prefix, so ordinary prose needs no
    space tokens: "the cat." -> ["the", "▁cat", "."]. Any other whitespace ("\\n", "  ", "\\t", " " before a
    newline or at the end) stays a token of its own.

    A literal "▁" (U+2581) in the text is not a word character, so it is always a one-character token of its
    own, while a folded space always gives a token of two or more characters; `detokenize` therefore turns a
    leading "▁" back into a space only in tokens longer than one character, and even text containing "▁"
    round-trips exactly.
    """

    level = "word"

    def tokenize(self, text: str) -> list[str]:
        """Returns the tokens of `text`; `detokenize(tokenize(text)) == text` for every str."""
        parts = _WORD_SPLIT.findall(text)
        tokens: list[str] = []
        fold = False  # the previous part was a lone " " waiting to be folded into the next word/punct token
        for part in parts:
            is_space = part[0].isspace()
            if fold and not is_space:
                tokens.append(SPACE_MARK + part)
            else:
                if fold:
                    tokens.append(" ")
                if part == " ":
                    fold = True
                    continue
                tokens.append(part)
            fold = False
        if fold:
            tokens.append(" ")
        return tokens

    def detokenize(self, tokens: Sequence[str]) -> str:
        """Returns the text of `tokens`: a "▁" prefix on a token of 2+ characters becomes a space."""
        return "".join(" " + t[1:] if len(t) > 1 and t[0] == SPACE_MARK else t for t in tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer)

    def __hash__(self) -> int:
        return hash(self.level)

    def __repr__(self) -> str:
        return "WordTokenizer()"


def _sentencepiece() -> Any:
    """Returns the sentencepiece module; SeqgenError if it is not installed."""
    try:
        import sentencepiece
    except ImportError as e:
        raise SeqgenError("subword tokenization needs sentencepiece: pip install 'seqgen[subword]'") from e
    return sentencepiece


_TOO_HIGH = "Vocabulary size too high"
_TOO_SMALL = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


class SubwordTokenizer:
    """A sentencepiece model (unigram or BPE); line breaks are kept as "\\n" / "\\r" tokens outside sentencepiece.

    sentencepiece treats each line as one sentence, so text is split at "\\n" and "\\r", each line is encoded on
    its own and the line-break character goes between lines as a token. Characters never seen in training come
    back as their surface string, which is not in the vocabulary and so becomes <unk>.
    """

    level = "subword"

    def __init__(self, model_proto: bytes):
        """model_proto: a serialized sentencepiece model. Raises SeqgenError if it cannot be parsed."""
        spm = _sentencepiece()
        self.model_proto = bytes(model_proto)
        corrupt = (f"the sentencepiece model ({len(self.model_proto)} bytes) is corrupt and cannot be loaded: "
                   "retrain the tokenizer or use an intact checkpoint")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except (RuntimeError, TypeError, OSError) as e:
            raise SeqgenError(corrupt) from e
        if self._sp.get_piece_size() == 0:  # an empty protobuf message parses without error
            raise SeqgenError(corrupt)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, model_type: str = "unigram",
              character_coverage: float = 1.0, normalization: str = "identity") -> SubwordTokenizer:
        """Train a sentencepiece model in memory on the lines of `texts`; returns the tokenizer.

        vocab_size counts sentencepiece's pieces including its own <unk>; if the text is too small to fill it,
        the model gets as many pieces as the text supports instead (never an error). Same input, same model:
        training runs on one thread because the learned pieces depend on the thread count.
        """
        spm = _sentencepiece()
        if model_type not in ("unigram", "bpe", "char", "word"):
            raise SeqgenError(f"unknown sentencepiece model_type {model_type!r}: use unigram, bpe, char or word")
        if vocab_size < 2:
            raise SeqgenError(f"--vocab-size must be at least 2, got {vocab_size}")
        lines = [line for text in texts for line in _LINE_SPLIT.split(_SURROGATE.sub("\ufffd", text))[0::2] if line]
        if not lines:
            raise SeqgenError("cannot train a subword tokenizer on empty text: the training text has no characters")
        options = dict(
            vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
            normalization_rule_name=normalization,
            remove_extra_whitespaces=False,  # keep runs of spaces and leading/trailing spaces: exact round trip
            bos_id=-1, eos_id=-1,  # the Vocab has its own <bos>/<eos>; only sentencepiece's <unk> (id 0) stays
            num_threads=1,  # the result depends on the thread count; one thread gives the same model everywhere
            # sentencepiece skips longer sentences by default; a language-model corpus can have long lines
            max_sentence_length=max(4192, max(len(line.encode("utf-8")) for line in lines)),
            minloglevel=2,  # training progress goes to stderr otherwise
        )
        try:
            try:
                proto = cls._train_proto(spm, lines, options)
            except RuntimeError as e:
                if _TOO_HIGH not in str(e):
                    raise
                # The text supports fewer pieces than asked for: take what it has rather than fail.
                proto = cls._train_proto(spm, lines, {**options, "hard_vocab_limit": False})
        except RuntimeError as e:
            small = _TOO_SMALL.search(str(e))
            if small:
                need = small.group(2)
                raise SeqgenError(f"--vocab-size {vocab_size} is too small: the training text needs {need} pieces "
                                  f"(one per distinct character, plus <unk>); use --vocab-size >= {need}") from e
            raise SeqgenError(f"sentencepiece training failed: {str(e).splitlines()[0] if str(e) else e!r}") from e
        return cls(proto)

    @staticmethod
    def _train_proto(spm: Any, lines: list[str], options: dict[str, Any]) -> bytes:
        """Returns the serialized model trained on `lines` with sentencepiece trainer `options`."""
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, **options)
        return out.getvalue()

    def tokenize(self, text: str) -> list[str]:
        """Returns the sentencepiece pieces of each line of `text`, with the "\\n" / "\\r" tokens between lines."""
        parts = _LINE_SPLIT.split(_SURROGATE.sub("\ufffd", text))  # line, break, line, break, ..., line
        breaks = parts[1::2]
        tokens: list[str] = []
        for i, pieces in enumerate(self._sp.encode(parts[0::2], out_type=str)):
            if i:
                tokens.append(breaks[i - 1])
            tokens.extend(pieces)
        return tokens

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[str]]:
        """`[tokenize(t) for t in texts]`, with the texts that hold no line break in one sentencepiece call."""
        plain = [i for i, t in enumerate(texts) if not _LINE_SPLIT.search(t)]
        out: list[list[str]] = [[] for _ in texts]
        for i, pieces in zip(plain, self._sp.encode([_SURROGATE.sub("\ufffd", texts[i]) for i in plain],
                                                    out_type=str)):
            out[i] = pieces
        for i in set(range(len(texts))).difference(plain):
            out[i] = self.tokenize(texts[i])
        return out

    def known_ids(self, texts: Sequence[str]) -> list[list[int] | None]:
        """sentencepiece's own ids of each text, where they say all there is: None for a text holding a line
        break (tokenized around it) or a piece sentencepiece does not know (its surface string is what the
        vocabulary looks up). Several times faster than `tokenize_batch` (no Python string per piece)."""
        joined = "".join(texts)     # one scan of the whole batch: most batches have no break or surrogate
        if _LINE_SPLIT.search(joined) or _SURROGATE.search(joined):
            plain = [i for i, t in enumerate(texts) if not _LINE_SPLIT.search(t)]
            inputs = [_SURROGATE.sub("\ufffd", texts[i]) for i in plain]
        else:
            plain, inputs = range(len(texts)), texts
        out: list[list[int] | None] = [None] * len(texts)
        unk = self._sp.unk_id()
        # one thread: the callers that send many texts (seqgen.data.line_chunks) run one process per core
        for i, ids in zip(plain, self._sp.encode(inputs, out_type=int, num_threads=1)):
            if unk not in ids:
                out[i] = ids
        return out

    def detokenize(self, tokens: Sequence[str]) -> str:
        """Returns the text of `tokens`; pieces unknown to the model (e.g. "<unk>") read as " ⁇ "."""
        out: list[str] = []
        line: list[str] = []
        for t in tokens:
            if t in _SPM_LINE_BREAKS:
                out.append(self._sp.decode_pieces(line) if line else "")
                out.append(t)
                line = []
            else:
                line.append(t)
        out.append(self._sp.decode_pieces(line) if line else "")
        return "".join(out)

    def pieces(self) -> list[str]:
        """Returns the vocabulary pieces: "\\n", "\\r", then the model's pieces without its <unk>/control pieces."""
        sp = self._sp
        return [*_SPM_LINE_BREAKS] + [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordTokenizer) and self.model_proto == other.model_proto

    def __hash__(self) -> int:
        return hash(self.model_proto)

    def __repr__(self) -> str:
        return f"SubwordTokenizer(pieces={self._sp.get_piece_size()}, model_bytes={len(self.model_proto)})"


def tokenizer_to_dict(tok: Tokenizer) -> dict[str, Any]:
    """Returns a checkpoint-safe dict (str and a uint8 tensor only): {"level": ...} plus "model" for subword."""
    if isinstance(tok, SubwordTokenizer):
        return {"level": tok.level, "model": torch.frombuffer(bytearray(tok.model_proto), dtype=torch.uint8)}
    if isinstance(tok, (CharTokenizer, WordTokenizer)):
        return {"level": tok.level}
    raise SeqgenError(f"cannot save tokenizer of type {type(tok).__name__}: expected a char, word or subword tokenizer")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Returns the tokenizer saved by `tokenizer_to_dict`; SeqgenError on an unknown level or a corrupt model."""
    level = d.get("level") if isinstance(d, dict) else None
    if level == "char":
        return CharTokenizer()
    if level == "word":
        return WordTokenizer()
    if level == "subword":
        model = d.get("model")
        if isinstance(model, torch.Tensor):
            if model.dtype != torch.uint8 or model.dim() != 1:
                raise SeqgenError(f"the saved sentencepiece model must be a 1-D uint8 tensor, got {model.dtype} "
                                  f"with shape {tuple(model.shape)} — the checkpoint is corrupt")
            proto = model.cpu().contiguous().numpy().tobytes()
        elif isinstance(model, (bytes, bytearray)):
            proto = bytes(model)
        else:
            raise SeqgenError("the saved subword tokenizer has no sentencepiece model — the checkpoint is corrupt")
        return SubwordTokenizer(proto)
    raise SeqgenError(f"unknown tokenizer level {level!r} in the checkpoint: expected one of {', '.join(LEVELS)}")


def make_tokenizer(level: str) -> CharTokenizer | WordTokenizer:
    """Returns the tokenizer for a level that needs no training ("char" or "word")."""
    if level == "char":
        return CharTokenizer()
    if level == "word":
        return WordTokenizer()
    raise SeqgenError(f"--level {level!r} needs training or is unknown: use one of {', '.join(LEVELS)}")


class TextCodec:
    """A tokenizer plus its vocabulary: text <-> ids."""

    def __init__(self, tokenizer: Tokenizer, vocab: Vocab):
        self.tokenizer = tokenizer
        self.vocab = vocab
        self._piece_table: np.ndarray | None = None     # subword: sentencepiece id -> vocabulary id (encode_flat)

    @property
    def level(self) -> str:
        """Returns "char", "word" or "subword"."""
        return self.tokenizer.level

    @classmethod
    def build(cls, level: str, texts: Sequence[str], *, min_freq: int = 1, max_size: int | None = None,
              vocab_size: int = 8000, model_type: str = "unigram") -> TextCodec:
        """Returns a codec fitted to `texts`.

        char/word: the vocabulary keeps tokens seen >= min_freq times, at most max_size ids including the specials.
        subword: sentencepiece is trained with vocab_size/model_type and the vocabulary is the specials plus its
        pieces (min_freq/max_size do not apply).
        """
        if level not in LEVELS:
            raise SeqgenError(f"unknown --level {level!r}: use one of {', '.join(LEVELS)}")
        if isinstance(texts, str):
            texts = [texts]  # a lone str would otherwise be read as a sequence of one-character texts
        if level == "subword":
            sub = SubwordTokenizer.train(texts, vocab_size=vocab_size, model_type=model_type)
            # A piece spelled like a special (say the text contains "<eos>") would clash with it: the special wins.
            return cls(sub, Vocab([*SPECIALS, *(p for p in sub.pieces() if p not in SPECIALS)]))
        tok = make_tokenizer(level)
        return cls(tok, Vocab.build((tok.tokenize(t) for t in texts), min_freq=min_freq, max_size=max_size))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Returns the ids of `text`, optionally with <bos> first and <eos> last; unknown tokens get <unk>."""
        ids = self.vocab.lookup(self.tokenizer.tokenize(text))
        if bos:
            ids.insert(0, self.vocab.bos)
        if eos:
            ids.append(self.vocab.eos)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, faster for subword (one sentencepiece call for many texts)."""
        tok = self.tokenizer
        tokens = (tok.tokenize_batch(texts) if isinstance(tok, SubwordTokenizer)
                  else [tok.tokenize(t) for t in texts])
        return [self.vocab.lookup(t) for t in tokens]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`encode_batch(texts)` as one flat array of ids [total] int64 and the lengths [len(texts)] int64.

        For subword, sentencepiece writes the ids itself and one table maps them to this vocabulary's (the same
        ids as looking up each piece's string); texts it cannot say everything about (`known_ids`) take the
        `encode_batch` path. This is what tokenizing a large corpus spends its time in (seqgen.data.line_chunks).
        """
        tok = self.tokenizer
        known = tok.known_ids(texts) if isinstance(tok, SubwordTokenizer) else [None] * len(texts)
        rest = [i for i, ids in enumerate(known) if ids is None]
        for i, ids in zip(rest, self.encode_batch([texts[i] for i in rest])):
            known[i] = ids
        lengths = np.fromiter(map(len, known), dtype=np.int64, count=len(known))
        flat = np.fromiter(chain.from_iterable(known), dtype=np.int64, count=int(lengths.sum()))
        if len(rest) < len(texts):
            if self._piece_table is None:
                sp = tok._sp
                self._piece_table = np.asarray(self.vocab.lookup(sp.id_to_piece(i) for i in range(sp.get_piece_size())),
                                               dtype=np.int64)
            mapped = np.ones(len(texts), dtype=bool)
            mapped[rest] = False
            on = np.repeat(mapped, lengths)                  # [total] True where the id is sentencepiece's
            flat[on] = self._piece_table[flat[on]]
        return flat, lengths

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`: stops at the first <eos>, skips <pad>/<bos>.

        <unk> reads "<unk>" for char/word and " ⁇ " (sentencepiece's unknown mark) for subword.
        """
        keep: list[int] = []
        pad, bos, eos = self.vocab.pad, self.vocab.bos, self.vocab.eos
        for i in ids:
            i = int(i)
            if i == eos:
                break
            if i != pad and i != bos:
                keep.append(i)
        return self.tokenizer.detokenize(self.vocab.tokens(keep))

    def unknown(self, text: str) -> list[str]:
        """Returns the distinct tokens of `text` that are not in the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(t for t in self.tokenizer.tokenize(text) if t not in self.vocab))

    def to_dict(self) -> dict[str, Any]:
        """Returns {"tokenizer": tokenizer_to_dict(...), "vocab": [str, ...]}: readable with weights_only=True."""
        return {"tokenizer": tokenizer_to_dict(self.tokenizer), "vocab": self.vocab.to_list()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextCodec:
        """Returns the codec saved by `to_dict`; SeqgenError if the dict is malformed."""
        if not isinstance(d, dict) or "tokenizer" not in d or "vocab" not in d:
            raise SeqgenError("a saved text codec needs 'tokenizer' and 'vocab' entries — the checkpoint is corrupt")
        return cls(tokenizer_from_dict(d["tokenizer"]), Vocab(d["vocab"]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TextCodec):
            return NotImplemented
        return self.tokenizer == other.tokenizer and self.vocab == other.vocab

    def __hash__(self) -> int:
        return hash((self.level, self.vocab))

    def __repr__(self) -> str:
        return f"TextCodec(level={self.level!r}, vocab_size={len(self.vocab)})"


__all__ = ["BOS", "EOS", "PAD", "UNK", "LEVELS", "CharTokenizer", "WordTokenizer", "SubwordTokenizer", "TextCodec",
           "Tokenizer", "make_tokenizer", "tokenizer_from_dict", "tokenizer_to_dict"]
