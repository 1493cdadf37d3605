"""Large parallel corpora streamed in aligned chunks of lines, each chunk handled by a pool of processes (all
cores) with the results in file order; and a bounded, seeded sample of a corpus's pairs.

Lines are read as `seqgen.data.text.read_lines` reads them (UTF-8, a BOM and CRLF accepted, errors naming
file:line:col, a line longer than MAX_LINE_BYTES refused) and paired as `seqgen.data.parallel` pairs them
(stripped; a pair with an empty side skipped and counted), but memory holds a few chunks, never a file.

What a worker does with a chunk is a job: "count" (token counts of each side, for a char/word vocabulary),
"encode" (token ids of each side, for the prepared-data cache) or "stream" (the token ids of a piece of one
long text, for the language-model cache of seqgen.data.prepared_stream, which cuts the pieces itself). A job travels to the workers as plain data
(codecs as `TextCodec.to_dict()`), so the pool starts with "spawn" and no state is shared with the parent.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import Counter, deque
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, Iterator

import numpy as np

from seqgen.data.parallel import pairs, split_tsv
from seqgen.data.text import MAX_LINE_BYTES, decode_utf8, long_line_error, open_binary
from seqgen.errors import SeqgenError
from seqgen.tokenizers import TextCodec, make_tokenizer

CHUNK_LINES = 20_000    # lines per task: big enough to pay for sending it to a worker, small enough to bound memory


@dataclass(frozen=True)
class Sources:
    """The training files of a parallel corpus: two files aligned line by line, or one TSV."""

    src: str = ""
    tgt: str = ""
    tsv: str = ""

    @property
    def paths(self) -> list[str]:
        return [self.tsv] if self.tsv else [self.src, self.tgt]

    @property
    def name(self) -> str:
        """The corpus in messages."""
        return self.tsv or f"{self.src} / {self.tgt}"


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def read_chunks(sources: Sources) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the chunk's first line, [the chunk's raw bytes in each file]) for consecutive chunks of
    CHUNK_LINES lines. SeqgenError when a file cannot be opened, has a line longer than MAX_LINE_BYTES, or when
    two files have different line counts (both files and both counts named)."""
    files = [open_binary(p) for p in sources.paths]
    try:
        first = 1
        while True:
            parts = [list(islice(f, CHUNK_LINES)) for f in files]
            counts = [len(p) for p in parts]
            if len(set(counts)) > 1:
                for path, part in zip(sources.paths, parts):     # a file that is not text says so first
                    _lines(b"".join(part), path, first)
                totals = [first - 1 + c + sum(1 for _ in f) for c, f in zip(counts, files)]
                raise SeqgenError(f"{sources.src} has {totals[0]} lines but {sources.tgt} has {totals[1]} "
                                  f"— the files must be aligned line by line")
            if not counts[0]:
                return
            for path, part in zip(sources.paths, parts):
                longest = max(range(len(part)), key=lambda i: len(part[i]))
                if len(part[longest]) > MAX_LINE_BYTES:
                    raise long_line_error(path, first + longest)
            yield first, [b"".join(p) for p in parts]
            first += counts[0]
    finally:
        for f in files:
            f.close()


def _lines(data: bytes, path: str, first: int) -> list[str]:
    """A chunk's lines without line ends, as read_lines gives them."""
    lines = decode_utf8(data, path, first_line=first).replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def chunk_pairs(sources: Sources, first: int, parts: list[bytes], rows: np.ndarray | None = None
                ) -> tuple[list[str], list[str], list[int]]:
    """The kept (stripped, both sides non-empty) source and target sentences of a chunk (of its lines `rows`,
    default all), and [lines, skipped pairs, lines with text in the source, lines with text in the target]."""
    if sources.tsv:
        src, tgt = split_tsv(_lines(parts[0], sources.tsv, first), sources.tsv, first)
    else:
        src, tgt = _lines(parts[0], sources.src, first), _lines(parts[1], sources.tgt, first)
    if rows is not None:
        src, tgt = [src[i] for i in rows.tolist()], [tgt[i] for i in rows.tolist()]
    stats = [len(src), 0, sum(1 for s in src if s.strip()), sum(1 for t in tgt if t.strip())]
    kept = pairs(src, tgt)
    stats[1] = kept.skipped_empty
    return kept.src, kept.tgt, stats


# -- the workers ------------------------------------------------------------------------------------------
_JOB: dict[str, Any] = {}


def _start(job: dict[str, Any]) -> None:
    """Set up this process for `job`: {"kind": "count", "level": ..., "sources": Sources},
    {"kind": "encode", "src": codec dict, "tgt": codec dict, "sources": Sources} or
    {"kind": "stream", "codec": codec dict}."""
    _JOB.clear()
    _JOB.update(job)
    if job["kind"] == "count":
        _JOB["tokenizer"] = make_tokenizer(job["level"])
    elif job["kind"] == "stream":
        _JOB["codec"] = TextCodec.from_dict(job["codec"])
    else:
        _JOB["codecs"] = (TextCodec.from_dict(job["src"]), TextCodec.from_dict(job["tgt"]))


def _ids(codec: TextCodec, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts`: one flat uint32 array and the lengths [len(texts)] int64."""
    flat, lengths = codec.encode_flat(texts)
    return flat.astype(np.uint32), lengths


def _work(task: tuple[int, list[bytes]] | str) -> tuple | np.ndarray:
    """One chunk through the job: (stats, counts src, counts tgt), (stats, (ids, lengths) src, ... tgt), or
    for "stream" (task: a piece of text) its token ids, one flat uint32 array."""
    if _JOB["kind"] == "stream":
        return _ids(_JOB["codec"], [task])[0]
    src, tgt, stats = chunk_pairs(_JOB["sources"], *task)
    if _JOB["kind"] == "count":
        tok = _JOB["tokenizer"]
        return stats, Counter(t for s in src for t in tok.tokenize(s)), Counter(t for s in tgt for t in tok.tokenize(s))
    src_codec, tgt_codec = _JOB["codecs"]
    return stats, _ids(src_codec, src), _ids(tgt_codec, tgt)


def map_chunks(sources: Sources, job: dict[str, Any], *, workers: int | None = None) -> Iterator[tuple]:
    """`job` applied to every chunk of `sources`, results in file order (see `map_tasks`)."""
    return map_tasks(read_chunks(sources), {**job, "sources": sources}, workers=workers)


def map_tasks(tasks: Iterator, job: dict[str, Any], *, workers: int | None = None) -> Iterator:
    """`job` applied to every task (a chunk of lines, a piece of text), results in order. With more than one
    task and more than one worker, a pool of `workers` processes (default: every core) does the work while
    this process reads ahead, at most two tasks per worker in flight; otherwise this process does it."""
    head = list(islice(tasks, 2))
    workers = default_workers() if workers is None else workers
    if len(head) < 2 or workers <= 1:
        _start(job)
        try:
            for task in chain(head, tasks):
                yield _work(task)
        finally:
            _JOB.clear()
        return
    # leaving the block (done, an error, a kill) terminates the workers
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_start, initargs=(job,)) as pool:
        pending: deque = deque()
        for task in chain(head, tasks):
            pending.append(pool.apply_async(_work, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def check_pairs(sources: Sources, stats: list[int]) -> None:
    """SeqgenError when a file has no text ("file is empty", as read_lines says it) or no pair is left after
    skipping those with an empty side; stats: [lines, skipped pairs, source lines with text, target lines with
    text] of the whole corpus."""
    lines, skipped, with_text = stats[0], stats[1], stats[2:]
    if sources.tsv and not any(with_text) or not sources.tsv and not all(with_text):
        path = sources.tsv or (sources.src if not with_text[0] else sources.tgt)
        raise SeqgenError(f"{path}: file is empty" + (" (only whitespace)" if os.path.getsize(path) else ""))
    if lines == skipped:
        raise SeqgenError(f"{sources.name}: no sentence pairs left after skipping empty lines")


def count_tokens(sources: Sources, level: str, *, workers: int | None = None) -> tuple[Counter, Counter, list[int]]:
    """Token counts of the kept source and target sentences at a char/word `level`, and the corpus stats
    [lines, skipped pairs, source lines with text, target lines with text]; SeqgenError as `check_pairs`."""
    src, tgt, stats = Counter(), Counter(), [0, 0, 0, 0]
    for part_stats, s, t in map_chunks(sources, {"kind": "count", "level": level}, workers=workers):
        src.update(s)
        tgt.update(t)
        stats = [a + b for a, b in zip(stats, part_stats)]
    check_pairs(sources, stats)
    return src, tgt, stats


def count_lines(path: str) -> int:
    """Lines in `path` as read_lines counts them (a last line without a newline counts)."""
    n, last = 0, b"\n"
    with open_binary(path) as f:
        while block := f.read(16 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def sample_pairs(sources: Sources, size: int, *, seed: int = 0) -> tuple[list[str], list[str], int]:
    """At most `size` line pairs chosen at random (seeded; all of them, in file order, when the corpus has no
    more or `size` is 0), stripped, those with an empty side left out; and the number of lines they were
    chosen from. When the sample is the whole corpus, SeqgenError as `check_pairs` for a corpus without pairs."""
    n = count_lines(sources.paths[0])
    chosen = None
    if size and n > size:
        chosen = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    src: list[str] = []
    tgt: list[str] = []
    stats = [0, 0, 0, 0]
    for first, parts in read_chunks(sources):
        if chosen is not None:
            lo, hi = np.searchsorted(chosen, [first - 1, first - 1 + CHUNK_LINES])
            if lo == hi:
                continue
        s, t, part_stats = chunk_pairs(sources, first, parts, None if chosen is None else chosen[lo:hi] - (first - 1))
        src += s
        tgt += t
        stats = [a + b for a, b in zip(stats, part_stats)]
    if chosen is None:
        check_pairs(sources, stats)
    return src, tgt, n
