"""Parallel corpora: aligned files, TSV, bad input, length filtering."""
import pytest

from seqgen.data.parallel import ParallelCorpus, filter_by_length, read_parallel, read_tsv
from seqgen.errors import SeqgenError


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_read_parallel(tmp_path):
    src = write(tmp_path / "train.de", "ein Haus\nzwei Häuser\n".encode())
    tgt = write(tmp_path / "train.en", b"a house\ntwo houses\n")
    corpus = read_parallel(src, tgt)
    assert corpus == ParallelCorpus(src=["ein Haus", "zwei Häuser"], tgt=["a house", "two houses"],
                                    skipped_empty=0)
    assert len(corpus) == 2


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    src = write(tmp_path / "train.de", b"a\nb\nc\n")
    tgt = write(tmp_path / "train.en", b"a\nb\n")
    with pytest.raises(SeqgenError) as e:
        read_parallel(src, tgt)
    msg = str(e.value)
    assert f"{src} has 3 lines but {tgt} has 2" in msg
    assert "aligned line by line" in msg and "\n" not in msg


def test_invalid_utf8_names_file_and_line(tmp_path):
    src = write(tmp_path / "train.de", b"gut\nkaputt \xff hier\n")
    tgt = write(tmp_path / "train.en", b"good\nbroken here\n")
    with pytest.raises(SeqgenError, match="invalid UTF-8") as e:
        read_parallel(src, tgt)
    assert f"{src}:2:8" in str(e.value)
    bad_tsv = write(tmp_path / "bad.tsv", b"a\tb\nc\t\xc3\n")
    with pytest.raises(SeqgenError, match=f"{bad_tsv}:2:"):
        read_tsv(bad_tsv)


def test_empty_lines_skipped_and_counted(tmp_path):
    src = write(tmp_path / "s", b"eins\n\nzwei\n   \ndrei\n")
    tgt = write(tmp_path / "t", b"one\nlost\n\nlost too\nthree\n")
    corpus = read_parallel(src, tgt)
    assert corpus.src == ["eins", "drei"] and corpus.tgt == ["one", "three"]
    assert corpus.skipped_empty == 3


def test_empty_file(tmp_path):
    src = write(tmp_path / "s", b"")
    tgt = write(tmp_path / "t", b"")
    with pytest.raises(SeqgenError, match="empty"):
        read_parallel(src, tgt)


def test_crlf_and_bom(tmp_path):
    src = write(tmp_path / "s", "\ufeffein Haus\r\nzwei\r\n".encode())
    tgt = write(tmp_path / "t", b"a house\ntwo")          # no final newline
    corpus = read_parallel(src, tgt)
    assert corpus.src == ["ein Haus", "zwei"] and corpus.tgt == ["a house", "two"]
    tsv = write(tmp_path / "c.tsv", "\ufeffein Haus\ta house\r\nzwei\ttwo\r\n".encode())
    corpus = read_tsv(tsv)
    assert corpus.src == ["ein Haus", "zwei"] and corpus.tgt == ["a house", "two"]


def test_tsv(tmp_path):
    tsv = write(tmp_path / "c.tsv", "ein Haus\ta house\n\nzwei \t two\nnur\t\n\tonly\nvier\tfour\n".encode())
    corpus = read_tsv(tsv)
    assert corpus.src == ["ein Haus", "zwei", "vier"]
    assert corpus.tgt == ["a house", "two", "four"]
    assert corpus.skipped_empty == 3


@pytest.mark.parametrize("line", [b"no tab here", b"a\tb\tc"])
def test_bad_tsv_line_names_path_and_line(tmp_path, line):
    tsv = write(tmp_path / "c.tsv", b"a\tb\n" + line + b"\n")
    with pytest.raises(SeqgenError, match="exactly one tab") as e:
        read_tsv(tsv)
    assert str(e.value).startswith(f"{tsv}:2:")


def test_filter_by_length():
    src = [[1] * 3, [1] * 6, [1] * 5, [1]]
    tgt = [[1] * 4, [1] * 2, [1] * 6, [1] * 5]
    assert filter_by_length(src, tgt, 5) == ([0, 3], 2)
    assert filter_by_length(src, tgt, 6) == ([0, 1, 2, 3], 0)
    with pytest.raises(ValueError):
        filter_by_length(src, tgt[:2], 5)
