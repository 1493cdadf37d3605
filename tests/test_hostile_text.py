"""Hostile text input: no file can crash seqgen with a traceback, and every failure says what to fix.

Property tests feed arbitrary bytes (biased to invalid UTF-8, NUL, BOMs, CR/CRLF mixes, whitespace-only and very
long lines) to the file readers and arbitrary unicode to the tokenizers: each either handles the input as documented
or raises one `SeqgenError` line naming the file (and the line for a decoding error). The CLI cases then check the
whole path: exit status 2, one `seqgen: error:` line on stderr (after any warnings), no traceback, nothing written.
"""
import builtins
import os
import re
import subprocess
import sys
from itertools import count

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqgen.cli import main
from seqgen.data.parallel import read_parallel, read_tsv
from seqgen.data.text import read_lines, read_text
from seqgen.errors import SeqgenError
from seqgen.tokenizers import CharTokenizer, SubwordTokenizer, TextCodec, WordTokenizer
from seqgen.vocab import SPECIALS, UNK, Vocab

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BOM8 = b"\xef\xbb\xbf"
# Byte pieces a hostile file is made of: line ends of every kind, NUL, BOMs (UTF-8 and UTF-16), whitespace, stray or
# truncated multi-byte sequences, an encoded surrogate, a code point above U+10FFFF, an overlong "/", and valid text
# including the characters Python's str.splitlines() (but not seqgen) treats as line breaks.
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]
VALID_BYTES = [b"\n", b"\r\n", b"\r", b"\x00", BOM8, b"\t", b" ", b"   ", b"\v\f", b"\x1c", "é".encode(),
               "e\u0301".encode(), "😀".encode(), "\u2028".encode(), "\x85".encode(), "\u2581".encode(), b"a",
               b"word", b"<unk>"]
VALID_CHUNK = st.one_of(st.sampled_from(VALID_BYTES), st.text(max_size=6).map(str.encode))
CHUNK = st.one_of(VALID_CHUNK, st.sampled_from(INVALID_UTF8 + [b"\xff\xfe", b"\xfe\xff"]), st.binary(max_size=6))


@st.composite
def file_bytes(draw) -> bytes:
    """Arbitrary file content: random bytes, hostile pieces, or valid UTF-8 pieces; now and then a BOM in front and
    one very long line somewhere."""
    prefix = draw(st.sampled_from([b"", b"", BOM8, b"\xff\xfe", b"\xfe\xff"]))
    body = draw(st.one_of(st.binary(max_size=200), st.lists(CHUNK, max_size=40).map(b"".join),
                          st.lists(VALID_CHUNK, max_size=40).map(b"".join)))
    if draw(st.integers(0, 7)) == 0:
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + b"y" * draw(st.integers(10_000, 200_000)) + body[cut:]
    return prefix + body


# Text of one line (no "\n"), for files that are valid and aligned: the awkward characters often.
LINE_PIECES = [" ", "  ", "\t", "\x00", "\r", "\u2028", "\x85", "\ufeff", "é", "e\u0301", "😀", "\u2581", "a",
               "word"]
LINE = st.lists(st.one_of(st.sampled_from(LINE_PIECES), st.characters(exclude_characters="\n",
                                                                       exclude_categories=("Cs",))),
                max_size=8).map("".join)


def render(draw, lines: list[str]) -> bytes:
    """`lines` as a UTF-8 file with a mix of LF and CRLF ends, sometimes a BOM, sometimes no final line end."""
    ends = [draw(st.sampled_from(["\n", "\r\n"])) for _ in lines]
    text = "".join(line + end for line, end in zip(lines, ends))
    if lines and lines[-1] and draw(st.booleans()):
        text = text[:-len(ends[-1])]
    return (BOM8 if draw(st.booleans()) else b"") + text.encode()


@st.composite
def parallel_files(draw) -> tuple[bytes, bytes]:
    """Two files, mostly aligned line by line; sometimes one loses a line or is replaced by arbitrary bytes."""
    pairs = draw(st.lists(st.tuples(LINE, LINE), max_size=12))
    src, tgt = render(draw, [s for s, _ in pairs]), render(draw, [t for _, t in pairs])
    change = draw(st.sampled_from(["none", "none", "none", "drop", "garbage_src", "garbage_tgt"]))
    if change == "drop":
        tgt = render(draw, [t for _, t in pairs][:-1])
    elif change == "garbage_src":
        src = draw(file_bytes())
    elif change == "garbage_tgt":
        tgt = draw(file_bytes())
    return src, tgt


@st.composite
def tsv_file(draw) -> bytes:
    """`source<TAB>target` lines (a line may hold extra tabs or none), blank lines, or arbitrary bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(file_bytes())
    rows = draw(st.lists(st.one_of(st.tuples(LINE, LINE).map("\t".join), LINE), max_size=12))
    return render(draw, rows)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder and a counter: hypothesis runs many examples per test, each writes fresh files here."""
    return tmp_path_factory.mktemp("hostile"), count()


def write(scratch, data: bytes, name: str = "f") -> str:
    folder, counter = scratch
    path = folder / f"{next(counter)}-{name}.txt"
    path.write_bytes(data)
    return str(path)


def expected_text(data: bytes) -> str | None:
    """What read_text returns for `data`, worked out from the bytes: one leading BOM dropped, CRLF -> LF; None when
    the file is not UTF-8. (A CR LF pair can never be part of a multi-byte sequence, so bytes-level is exact.)"""
    body = data.removeprefix(BOM8)
    try:
        return body.replace(b"\r\n", b"\n").decode("utf-8")
    except UnicodeDecodeError:
        return None


def assert_one_line(error: SeqgenError, path: str) -> str:
    """The error is a plain SeqgenError of one line that names `path`; returns its message."""
    message = str(error)
    assert type(error) is SeqgenError, repr(error)
    assert len(message.splitlines()) == 1 and path in message, message
    return message


def assert_names_first_bad_byte(message: str, path: str, data: bytes) -> None:
    """The message is `path:LINE:COL: invalid UTF-8 ...` and LINE:COL really is the first byte that is not UTF-8:
    checked against the raw lines, not against the reader's own arithmetic."""
    found = re.match(re.escape(path) + r":(\d+):(\d+): invalid UTF-8", message)
    assert found, message
    line, col = int(found.group(1)), int(found.group(2))
    lines = data.split(b"\n")
    for ok in lines[:line - 1]:
        ok.decode("utf-8")                         # every earlier line is valid
    bad = lines[line - 1]
    bad[:col - 1].decode("utf-8")                  # the line is valid up to the column ...
    with pytest.raises(UnicodeDecodeError) as e:   # ... and an invalid sequence starts right there
        bad[col - 1:].decode("utf-8")
    assert e.value.start == 0
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        assert "UTF-16" in message


# ---------------------------------------------------------------- file readers: property tests

@FAST
@given(data=file_bytes(), allow_empty=st.booleans())
def test_read_text_and_read_lines_on_arbitrary_bytes(scratch, data, allow_empty):
    path = write(scratch, data)
    text = expected_text(data)
    if text is None:
        for reader in (read_text, read_lines):
            with pytest.raises(SeqgenError) as e:
                reader(path, allow_empty=allow_empty)
            assert_names_first_bad_byte(assert_one_line(e.value, path), path, data)
        return
    if not text.strip() and not allow_empty:           # empty, BOM only, or whitespace only
        for reader in (read_text, read_lines):
            with pytest.raises(SeqgenError) as e:
                reader(path)
            assert "empty" in assert_one_line(e.value, path)
        return
    assert read_text(path, allow_empty=allow_empty) == text
    lines = read_lines(path, allow_empty=allow_empty)
    assert all("\n" not in line for line in lines)
    # as many lines as line ends, plus a last line without one; whitespace-only lines are kept
    assert len(lines) == text.count("\n") + (0 if text == "" or text.endswith("\n") else 1)
    assert "".join(line + "\n" for line in lines) == (text if text == "" or text.endswith("\n") else text + "\n")


@FAST
@given(files=parallel_files())
def test_read_parallel_on_arbitrary_pairs(scratch, files):
    src, tgt = write(scratch, files[0], "src"), write(scratch, files[1], "tgt")
    sides = []
    for path in (src, tgt):
        try:
            sides.append(read_lines(path))
        except SeqgenError as expected:            # the reader's own verdict on that file (tested above)
            with pytest.raises(SeqgenError) as e:
                read_parallel(src, tgt)
            assert assert_one_line(e.value, path) == str(expected)
            return
    src_lines, tgt_lines = sides
    if len(src_lines) != len(tgt_lines):
        with pytest.raises(SeqgenError) as e:
            read_parallel(src, tgt)
        message = assert_one_line(e.value, src)
        assert f"{src} has {len(src_lines)} lines but {tgt} has {len(tgt_lines)}" in message
        return
    corpus = read_parallel(src, tgt)
    kept = [(s.strip(), t.strip()) for s, t in zip(src_lines, tgt_lines) if s.strip() and t.strip()]
    assert list(zip(corpus.src, corpus.tgt)) == kept
    assert len(corpus) + corpus.skipped_empty == len(src_lines)


@FAST
@given(data=tsv_file())
def test_read_tsv_on_arbitrary_bytes(scratch, data):
    path = write(scratch, data, "tsv")
    try:
        lines = read_lines(path)
    except SeqgenError as expected:
        with pytest.raises(SeqgenError) as e:
            read_tsv(path)
        assert assert_one_line(e.value, path) == str(expected)
        return
    kept, skipped = [], 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            skipped += 1
        elif line.count("\t") != 1:
            with pytest.raises(SeqgenError) as e:
                read_tsv(path)
            assert assert_one_line(e.value, path).startswith(f"{path}:{lineno}: expected 'source<TAB>target'")
            return
        else:
            s, t = (part.strip() for part in line.split("\t"))
            if s and t:
                kept.append((s, t))
            else:
                skipped += 1
    corpus = read_tsv(path)
    assert list(zip(corpus.src, corpus.tgt)) == kept and corpus.skipped_empty == skipped


def test_a_file_name_no_system_can_open_is_one_clear_line():
    """A NUL in a path (possible from a YAML config: text: "a\\0b") is not a missing file but an invalid name."""
    with pytest.raises(SeqgenError) as e:
        read_text("train\x00.txt")
    assert str(e.value) == "'train\\x00.txt': not a valid file name"


# ---------------------------------------------------------------- tokenizers: property tests

# Arbitrary unicode with the awkward characters often: NUL and other controls, line breaks of every kind, combining
# marks, whitespace runs, U+2581, text spelled like the specials, and lone surrogates (a command-line argument with
# undecodable bytes holds them; files never do).
AWKWARD = ["\n", "\r", "\r\n", "\t", " ", "   ", "\x00", "\x1f", "\x7f", "\u0301", "\u200b", "\u2028", "\x85", "\ufeff",
           "\u2581", "\u00a0", "😀", "👩\u200d💻", "<unk>", "<eos>", "<pad>", ".", "a", "word"]
SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
ANY_TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(AWKWARD), SURROGATE), max_size=40).map("".join)


@FAST
@given(text=ANY_TEXT)
def test_char_and_word_tokenizers_round_trip_exactly(text):
    for tok in (CharTokenizer(), WordTokenizer()):
        tokens = tok.tokenize(text)
        assert all(tokens) and tok.detokenize(tokens) == text


@FAST
@given(level=st.sampled_from(["char", "word"]), seen=ANY_TEXT, text=ANY_TEXT)
def test_char_and_word_encode_never_raises_and_unknowns_become_unk(level, seen, text):
    codec = TextCodec.build(level, [seen])
    ids = codec.encode(text, bos=True, eos=True)
    vocab, tokens = codec.vocab, codec.tokenizer.tokenize(text)
    assert ids[1:-1] == [vocab.lookup([t])[0] if t in vocab else vocab.unk for t in tokens]
    assert all(vocab.unk <= i < len(vocab) for i in ids[1:-1])    # text never becomes <pad>/<bos>/<eos>
    assert codec.decode(ids) == codec.tokenizer.detokenize([t if t in vocab else UNK for t in tokens])
    assert codec.unknown(text) == list(dict.fromkeys(t for t in tokens if t not in vocab))


HOSTILE_CORPUS = "\n".join(["Kato rimu sen.", "  two  spaces\tand a tab", "nul\x00 and \x1f controls",
                            "é e\u0301 😀", "line\u2028separator \x85 next", "<unk> <eos> spelled out",
                            "\u2581 mark"] * 20)


@pytest.fixture(scope="module")
def subword_codec() -> TextCodec:
    pytest.importorskip("sentencepiece")
    sub = SubwordTokenizer.train([HOSTILE_CORPUS], vocab_size=80)
    return TextCodec(sub, Vocab([*SPECIALS, *(p for p in sub.pieces() if p not in SPECIALS)]))


@FAST
@given(text=ANY_TEXT)
def test_subword_never_raises_and_keeps_line_breaks(subword_codec, text):
    ids = subword_codec.encode(text, bos=True, eos=True)
    assert all(0 <= i < len(subword_codec.vocab) for i in ids)
    out = subword_codec.decode(ids)
    assert out.count("\n") == text.count("\n") and out.count("\r") == text.count("\r")


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(ANY_TEXT, min_size=1, max_size=3),
       vocab_size=st.integers(2, 60), model_type=st.sampled_from(["unigram", "bpe"]))
def test_subword_training_on_hostile_text_is_a_model_or_one_clear_line(texts, vocab_size, model_type):
    pytest.importorskip("sentencepiece")
    try:
        codec = TextCodec.build("subword", texts, vocab_size=vocab_size, model_type=model_type)
    except SeqgenError as e:
        assert len(str(e).splitlines()) == 1
        return
    for text in texts:
        assert codec.decode(codec.encode(text)).count("\n") == text.count("\n")


# ---------------------------------------------------------------- the CLI: explicit cases

TINY_LM = ["--level", "char", "--hidden", 8, "--emb", 8, "--layers", 1, "--seq-len", 16, "--batch-size", 4,
           "--max-steps", 2, "--eval-every", 2, "--valid-fraction", "0.01", "--progress", "false"]
TINY_MT = ["--level", "word", "--enc-emb", 8, "--enc-hidden", 8, "--emb", 8, "--hidden", 8, "--batch-size", 8,
           "--max-steps", 2, "--eval-every", 2, "--eval-max-len", 4, "--progress", "false"]
MEGABYTE_LINE = ("lorem ipsum dolor sit amet " * 40_000)[:1 << 20]    # one line, no line end, 1 MiB


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `seqgen ARGS` in this process (no interpreter start per case); returns (status, stdout, stderr).

    Only SeqgenError is turned into an error line by main(): any other exception fails the test with its traceback.
    """
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_rejected(capsys, args, *names, not_written=()):
    """Exit 2; stderr ends with the one `seqgen: error:` line, which names each of `names` (any line before it is a
    warning); and nothing in `not_written` exists."""
    status, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert status == 2 and lines and lines[-1].startswith("seqgen: error: "), err
    assert all("warning" in line for line in lines[:-1]) and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[-1], (name, lines[-1])
    for path in not_written:
        assert not os.path.exists(path), f"{path} was written although the input was rejected"
    return lines[-1]


def make_unreadable(monkeypatch, path):
    """Opening `path` fails with PermissionError, as after `chmod 000` for a user who is not root (tests run as root
    here, where chmod does not stop reads)."""
    target = os.path.abspath(path)

    def refuses(opener):
        def guarded(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == target:
                raise PermissionError(13, "Permission denied", str(file))
            return opener(file, *args, **kwargs)
        return guarded

    monkeypatch.setattr(builtins, "open", refuses(builtins.open))
    monkeypatch.setattr(os, "open", refuses(os.open))


@pytest.fixture
def files(tmp_path):
    """The hostile files every CLI case draws from."""
    f = {"dir": tmp_path / "a_folder", "missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt",
         "blank": tmp_path / "blank.txt", "latin1": tmp_path / "latin1.txt", "utf16": tmp_path / "utf16.txt",
         "text": tmp_path / "text.txt", "short": tmp_path / "short.txt", "locked": tmp_path / "locked.txt"}
    f["dir"].mkdir()
    f["empty"].write_bytes(b"")
    f["blank"].write_bytes(BOM8 + b"  \r\n\t\n\n \x0b\n")
    f["latin1"].write_bytes("one line\nzwei Häuser\n".encode("latin-1"))
    f["utf16"].write_bytes("one line\n".encode("utf-16"))
    f["text"].write_text("ab cd ef\n" * 40, encoding="utf-8")
    f["short"].write_text("ab\ncd\n", encoding="utf-8")
    f["locked"].write_text("ab cd ef\n" * 40, encoding="utf-8")
    return f


@pytest.fixture
def lm_bad_inputs(files, monkeypatch):
    make_unreadable(monkeypatch, files["locked"])
    return [(files["dir"], ["is a directory"]), (files["missing"], ["no such file"]), (files["empty"], ["is empty"]),
            (files["blank"], ["is empty (only whitespace)"]), (files["latin1"], [":2:7: invalid UTF-8"]),
            (files["utf16"], [":1:1: invalid UTF-8", "UTF-16"]), (files["locked"], ["permission denied"]),
            (files["short"], ["training tokens, fewer than --seq-len 16 + 1"])]


def test_train_lm_rejects_each_bad_text_in_one_line_and_writes_nothing(capsys, tmp_path, lm_bad_inputs):
    for path, messages in lm_bad_inputs:
        out = tmp_path / "run"
        assert_rejected(capsys, ["train", "lm", "--text", path, "--out", out, *TINY_LM], path, *messages,
                        not_written=[out])


def test_a_file_name_with_a_line_break_still_gives_one_error_line(capsys, tmp_path):
    missing = tmp_path / "two\nlines\u2028.txt"
    line = assert_rejected(capsys, ["train", "lm", "--text", missing, "--out", tmp_path / "run", *TINY_LM],
                           "no such file", not_written=[tmp_path / "run"])
    assert "two\\nlines\\u2028.txt" in line


def test_train_lm_on_a_megabyte_line(capsys, tmp_path):
    text = tmp_path / "one_line.txt"
    text.write_text(MEGABYTE_LINE, encoding="utf-8")
    status, out, err = cli(capsys, "train", "lm", "--text", text, "--out", tmp_path / "run", *TINY_LM)
    assert status == 0 and "done: 2 steps" in out, err
    assert (tmp_path / "run" / "best.pt").exists()


def test_train_lm_normalises_bom_and_crlf_and_keeps_nul(capsys, tmp_path):
    from seqgen.model import load_model
    text = tmp_path / "odd.txt"
    text.write_bytes(BOM8 + b"ab\x00c\r\n  \r\n\tx y\r\n" * 50)
    status, _, err = cli(capsys, "train", "lm", "--text", text, "--out", tmp_path / "run", *TINY_LM)
    assert status == 0, err
    vocab = load_model(str(tmp_path / "run" / "best.pt"), task="lm").tgt.vocab
    assert "\x00" in vocab and "\n" in vocab and "\ufeff" not in vocab and "\r" not in vocab


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    """A tiny valid parallel corpus to put one hostile file into at a time."""
    pairs = ["a b", "b c", "c d", "d a"] * 5
    return {"src": write_lines(tmp_path / "train.src", pairs), "tgt": write_lines(tmp_path / "train.tgt", pairs),
            "vsrc": write_lines(tmp_path / "valid.src", pairs[:3]),
            "vtgt": write_lines(tmp_path / "valid.tgt", pairs[:3])}


def train_mt(corpus, out, **swap):
    """`seqgen train translation` arguments with some of the corpus files swapped for others."""
    f = {**corpus, **swap}
    return ["train", "translation", "--src-train", f["src"], "--tgt-train", f["tgt"], "--src-valid", f["vsrc"],
            "--tgt-valid", f["vtgt"], "--out", out, *TINY_MT]


def test_train_translation_rejects_each_bad_file_in_one_line_and_writes_nothing(capsys, tmp_path, files, corpus,
                                                                                 monkeypatch):
    out = tmp_path / "run"
    make_unreadable(monkeypatch, files["locked"])
    short = write_lines(tmp_path / "short.tgt", ["a b"] * 3)
    blank_pairs_src = write_lines(tmp_path / "bs", ["a", "  ", ""])
    blank_pairs_tgt = write_lines(tmp_path / "bt", ["\t", "b", "c"])
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("a\tb\nno tab on this line\n", encoding="utf-8")
    for swap, names in [
        ({"src": files["dir"]}, [files["dir"], "is a directory"]),
        ({"tgt": files["missing"]}, [files["missing"], "no such file"]),
        ({"tgt": short}, [f"{corpus['src']} has 20 lines but {short} has 3", "aligned line by line"]),
        ({"src": files["blank"], "tgt": files["blank"]}, [files["blank"], "only whitespace"]),
        ({"tgt": files["latin1"]}, [f"{files['latin1']}:2:7: invalid UTF-8"]),
        ({"vsrc": files["locked"]}, [files["locked"], "permission denied"]),
        ({"vtgt": files["empty"]}, [files["empty"], "is empty"]),
        ({"vtgt": files["dir"]}, [files["dir"], "is a directory"]),
        ({"src": blank_pairs_src, "tgt": blank_pairs_tgt}, [blank_pairs_src, "no sentence pairs left"]),
    ]:
        assert_rejected(capsys, train_mt(corpus, out, **swap), *names, not_written=[out])
    tsv_args = ["train", "translation", "--train-tsv", bad_tsv, "--src-valid", corpus["vsrc"], "--tgt-valid",
                corpus["vtgt"], "--out", out, *TINY_MT]
    assert_rejected(capsys, tsv_args, f"{bad_tsv}:2: expected 'source<TAB>target'", not_written=[out])
    tsv_args[3] = files["dir"]
    assert_rejected(capsys, tsv_args, files["dir"], "is a directory", not_written=[out])


def test_train_translation_filters_a_megabyte_line_with_a_count(capsys, tmp_path, corpus):
    for side in ("src", "tgt"):
        lines = corpus[side].read_text(encoding="utf-8").splitlines()
        write_lines(corpus[side], lines[:7] + [MEGABYTE_LINE] + lines[7:])
    status, out, err = cli(capsys, *train_mt(corpus, tmp_path / "run"))
    assert status == 0 and "done: 2 steps" in out, err
    assert "filtered 1 of 21 pair(s) longer than --max-len 100 tokens" in err


@pytest.fixture(scope="module")
def mt_checkpoint(tmp_path_factory):
    """An untrained word-level translation model with attention (so --attention-png is accepted): decoding needs no
    quality, only the input path."""
    from seqgen.checkpoint import save_checkpoint
    from seqgen.decoders.rnn import DecoderConfig
    from seqgen.encoders.rnn import RNNEncoderConfig
    from seqgen.model import ModelConfig, Seq2Seq
    codec = TextCodec.build("word", ["lorem ipsum dolor sit amet a b c d"])
    model = Seq2Seq(ModelConfig(task="translation", decoder=DecoderConfig(emb=8, hidden=8, attention="bahdanau"),
                                text_encoder=RNNEncoderConfig(emb=8, hidden=8)), tgt=codec, src=codec)
    path = tmp_path_factory.mktemp("mt") / "mt.pt"
    save_checkpoint(str(path), model.to_payload())
    return path


def test_translate_and_evaluate_reject_bad_files_in_one_line_and_write_nothing(capsys, tmp_path, files,
                                                                               mt_checkpoint, monkeypatch):
    make_unreadable(monkeypatch, files["locked"])
    out, att = tmp_path / "hyp.txt", tmp_path / "attention"
    for path, message in [(files["dir"], "is a directory"), (files["missing"], "no such file"),
                          (files["locked"], "permission denied"), (files["latin1"], ":2:7: invalid UTF-8")]:
        assert_rejected(capsys, ["translate", mt_checkpoint, path, "--out", out, "--attention-png", att, "--greedy"],
                        path, message, not_written=[out, att])
    evaluate = ["evaluate", mt_checkpoint, "--greedy", "--out", out]
    for src, ref, names in [
        (files["text"], files["dir"], [files["dir"], "is a directory"]),
        (files["missing"], files["text"], [files["missing"], "no such file"]),
        (files["dir"], files["text"], [files["dir"], "is a directory"]),
        (files["text"], files["locked"], [files["locked"], "permission denied"]),
        (files["blank"], files["blank"], [files["blank"], "only whitespace"]),
        (files["text"], files["short"], [f"{files['text']} has 40 lines but {files['short']} has 2"]),
    ]:
        assert_rejected(capsys, [*evaluate, "--src", src, "--ref", ref], *names, not_written=[out])


def test_translate_handles_empty_blank_and_megabyte_inputs(capsys, tmp_path, files, mt_checkpoint):
    options = ["--greedy", "--max-len", 3]
    status, out, err = cli(capsys, "translate", mt_checkpoint, files["empty"], *options)
    assert status == 0 and out == "" and err == ""
    status, out, err = cli(capsys, "translate", mt_checkpoint, files["blank"], *options)   # 4 whitespace lines
    assert status == 0 and out == "\n" * 4 and "4 empty line(s) left empty" in err
    big = tmp_path / "big.txt"
    big.write_text(MEGABYTE_LINE + "\nlorem ipsum\n", encoding="utf-8")
    status, out, err = cli(capsys, "translate", mt_checkpoint, big, *options)
    assert status == 0 and len(out.split("\n")) == 3, err
    assert "1 sentence(s) longer than 256 tokens were truncated (lines 1)" in err


def test_the_real_entry_point_prints_no_traceback(tmp_path, files, mt_checkpoint):
    """Two cases through `python -m seqgen.cli` itself (the in-process cases above cover the rest)."""
    proc = run_cli("train", "lm", "--text", files["dir"], "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2 and proc.stderr == f"seqgen: error: {files['dir']}: is a directory, expected a " \
                                                   f"text file\n"
    assert not os.path.exists(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "seqgen.cli", "translate", str(mt_checkpoint), "--greedy"],
                          input=b"lorem ipsum\n\xff\xfe bad\n", capture_output=True, timeout=120, check=False,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode() == "seqgen: error: <stdin>:2:1: invalid UTF-8 (byte 0xff); convert the file to UTF-8\n"
    if os.geteuid() != 0:                       # a real chmod 000 where it stops reads (not for root)
        files["locked"].chmod(0)
        try:
            proc = run_cli("train", "lm", "--text", files["locked"], "--out", tmp_path / "run", check=False)
        finally:
            files["locked"].chmod(0o644)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr == f"seqgen: error: {files['locked']}: permission denied; make the file readable\n"


@pytest.mark.parametrize("brk", ["\n", "\r", "\u2028", "\x0b"])
def test_translations_never_contain_line_breaks(brk):
    """A vocabulary can hold line-break characters (learned from a lone CR in the training text); a
    translation must still be one line of the output file."""
    from types import SimpleNamespace

    from seqgen.decoders.search import Hypothesis
    from seqgen.inference.translation import _to_translation
    codec = TextCodec.build("char", [f"ab{brk}cd"])
    ids = codec.encode(f"ab{brk}cd")
    t = _to_translation(SimpleNamespace(tgt=codec), Hypothesis(ids, -1.0, -1.0), ["x"])
    assert t.text == "ab cd" and len(t.text.splitlines()) == 1


def test_out_that_is_a_file_is_one_clear_line(capsys, tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("hello world\n" * 50)
    out = tmp_path / "run"
    out.write_text("not a folder")
    assert main(["train", "lm", "--text", str(text), "--out", str(out), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"seqgen: error: --out {out}: exists and is not a folder; choose another --out"
    assert out.read_text() == "not a folder"
