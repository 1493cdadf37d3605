"""Translating files of any size, and pipes line by line: what `seqgen translate` runs.

`translate_stream` answers each input line as soon as it arrives (a terminal, a co-process, a chat window):
read a line, translate it, write and flush the answer.

`translate_file` reads the input in chunks (bounded memory whatever its size), translates a chunk (sorted by
length inside, as `translate_nbest` does), and appends its lines to the output, flushed and fsynced per chunk.
A rerun with the same output continues after the last complete chunk — a chunk cut off by a kill is cut from
the file and translated again — and ends with the file an uninterrupted run writes. A sidecar file
`OUT.resume.json` records the input, the model and the decoding options; a rerun with other ones is refused
(`overwrite=True` starts over). It is deleted when the output is complete.

Under torchrun the processes take every world-th chunk, each appending `{"i": chunk, "text": ...}` records to
its part file (`caption_folder`'s part naming), and process 0 merges the parts into the output in input
order when all are done; a rerun with any number of processes skips chunks found in the output or any part.
"""
from __future__ import annotations

import heapq
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Callable, Iterable, Iterator

from seqgen.data import text
from seqgen.distributed import Distributed
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.inference.translation import DEFAULT_MAX_SRC_LEN, Translation, translate_nbest
from seqgen.log import Log, to_stderr
from seqgen.tasks.caption_folder import find_parts, part_path

if TYPE_CHECKING:
    from seqgen.model import Seq2Seq

CHUNK_LINES = 2048      # lines per chunk: what a kill can cost, and the unit of sharding


def format_result(number: int, hyps: list[Translation], n_best: int) -> str:
    """The output lines of input line `number` (1-based): the translation, or with n-best
    `number<TAB>score<TAB>translation` per hypothesis."""
    if n_best > 1:
        return "".join(f"{number}\t{h.score:.4f}\t{h.text}\n" for h in hyps)
    return hyps[0].text + "\n"


def translate_stream(model: Seq2Seq, lines: Iterable[str], out: IO[str], gen: GenerationConfig, *,
                     max_src_len: int = DEFAULT_MAX_SRC_LEN, seed: int = 1, warn: Log = to_stderr) -> int:
    """Answer each line of `lines` as soon as it is read (flushing each answer); returns how many."""
    n = 0
    for n, line in enumerate(lines, 1):
        hyps = translate_nbest(model, [line.rstrip("\r\n")], gen, batch_size=1, max_src_len=max_src_len,
                               seed=seed, warn=warn)[0]
        out.write(format_result(n, hyps, gen.n_best))
        out.flush()
    return n


def read_chunks(path: str, chunk_lines: int = CHUNK_LINES) -> Iterator[list[str]]:
    """The lines of a UTF-8 file (or stdin for "-"), `chunk_lines` at a time, without line ends; invalid UTF-8
    is one error naming the line and column."""
    try:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
    except PermissionError:
        raise SeqgenError(f"{path}: permission denied") from None
    except OSError as e:
        raise SeqgenError(f"{path}: cannot read ({e.strerror or e})") from None
    name = "<stdin>" if path == "-" else path
    try:
        lineno, total = 0, 0
        while True:
            lines = []
            for _ in range(chunk_lines):
                raw = f.readline(text.MAX_LINE_BYTES + 1)
                if not raw:
                    break
                lineno += 1
                total += len(raw)
                if len(raw) > text.MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise SeqgenError(f"{name}:{lineno}: a line longer than {text.human_size(text.MAX_LINE_BYTES)}, "
                                      f"the longest line seqgen reads (is this a text file?)")
                if path == "-" and total > text.MAX_FILE_BYTES:   # a file is streamed whole; a pipe may never end
                    raise SeqgenError(f"{name}: larger than {text.human_size(text.MAX_FILE_BYTES)}, the most seqgen "
                                      f"reads from one input; translate a file instead")
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    lines.append(raw.decode("utf-8").rstrip("\n").rstrip("\r"))
                except UnicodeDecodeError as e:
                    raise SeqgenError(f"{name}:{lineno}:{e.start + 1}: invalid UTF-8 (byte 0x{raw[e.start]:02x}); "
                                      f"convert the file to UTF-8") from None
            if not lines:
                return
            yield lines
    finally:
        if f is not sys.stdin.buffer:
            f.close()


@dataclass
class FileSummary:
    out_path: str
    lines: int = 0              # input lines translated by this run
    already_done: int = 0       # input lines found translated in the output from an earlier run
    seconds: float = 0.0


def _sidecar(out_path: str) -> str:
    return out_path + ".resume.json"


def _settings(input_path: str, model_name: str, gen: GenerationConfig, max_src_len: int, seed: int) -> dict:
    try:
        st = os.stat(input_path)
        source = {"input": os.path.realpath(input_path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError as e:
        raise SeqgenError(f"{input_path}: cannot read ({e.strerror or e})") from None
    return {**source, "model": model_name, "gen": vars(gen), "max_src_len": max_src_len, "seed": seed,
            "chunk_lines": CHUNK_LINES}


def _complete_output(out_path: str, n_best: int, repair: bool) -> tuple[int, int]:
    """(input lines done, byte length of that prefix) of an earlier output: whole chunks only.

    A chunk's lines are written in one go, so an output holds whole chunks and possibly the start of one
    more; that tail is cut (with `repair`) and translated again. A chunk is known complete when the next
    chunk's first sentence follows it, or (one line per sentence) when it holds CHUNK_LINES lines.
    """
    try:
        f = open(out_path, "rb")
    except FileNotFoundError:
        return 0, 0
    except OSError as e:
        raise SeqgenError(f"{out_path}: cannot read the earlier output ({e.strerror or e})") from None
    number, offset, good_offset, good_done = 0, 0, 0, 0
    with f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            if n_best > 1:
                try:
                    current = int(raw.split(b"\t", 1)[0])
                except ValueError:
                    raise SeqgenError(f"{out_path}: not an n-best output of seqgen translate (line "
                                      f"{raw[:40]!r}); choose another --out or --overwrite") from None
            else:
                current = number + 1
            if current != number and current > 1 and (current - 1) % CHUNK_LINES == 0:
                good_offset, good_done = offset, current - 1       # the chunk before this line is whole
            number = current
            offset += len(raw)
    if n_best == 1 and number % CHUNK_LINES == 0:
        good_offset, good_done = offset, number
    if repair and good_offset < os.path.getsize(out_path):
        with open(out_path, "r+b") as g:
            g.truncate(good_offset)
    return good_done, good_offset


def translate_file(model: Seq2Seq, input_path: str, out_path: str, gen: GenerationConfig, *,
                   model_name: str = "", batch_size: int = 64, max_src_len: int = DEFAULT_MAX_SRC_LEN,
                   seed: int = 1, overwrite: bool = False, dist: Distributed | None = None,
                   progress: bool = True, warn: Log = to_stderr, log: Log = to_stderr,
                   on_chunk: Callable[[int, list[str], list[list[Translation]]], None] | None = None
                   ) -> FileSummary:
    """Translate `input_path` into `out_path`, resumably (see the module docstring).

    on_chunk(first line number, sources, results): called per translated chunk (attention maps).
    """
    dist = dist or Distributed()
    summary = FileSummary(out_path)
    settings = _settings(input_path, model_name, gen, max_src_len, seed)
    sidecar = _sidecar(out_path)
    if overwrite and dist.is_main:
        for path in [out_path, sidecar, *find_parts(out_path)]:
            if os.path.exists(path):
                os.unlink(path)
    dist.barrier()
    if os.path.exists(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
        if saved != settings:
            changed = [k for k in settings if not isinstance(saved, dict) or saved.get(k) != settings[k]]
            raise SeqgenError(f"{out_path} was started from other settings ({', '.join(changed) or 'unreadable '}"
                              f"{sidecar}); rerun with those, or pass --overwrite to start over")
    elif os.path.exists(out_path) and os.path.getsize(out_path) > 0:
        raise SeqgenError(f"{out_path} exists and was not written by an unfinished seqgen translate; pass "
                          f"--overwrite to replace it")
    elif dist.is_main:
        from seqgen.atomic import atomic_write
        atomic_write(sidecar, lambda f: f.write(json.dumps(settings)), mode="w", encoding="utf-8")
    dist.barrier()

    done_lines, _ = _complete_output(out_path, gen.n_best, repair=dist.is_main)
    done_chunks = set(range(done_lines // CHUNK_LINES))
    parts = find_parts(out_path)
    for part in parts:
        done_chunks.update(i for i, _ in _read_part(part))
    summary.already_done = done_lines
    mine = part_path(out_path, dist.rank, dist.world) if dist.world > 1 else None
    if mine is not None:
        _repair_tail(mine)
    t0 = time.perf_counter()
    out_file = open(out_path if mine is None else mine, "a", encoding="utf-8")
    try:
        _translate_chunks(model, input_path, gen, out_file, mine is not None, done_chunks, dist, summary,
                          batch_size, max_src_len, seed, warn, log, progress, done_lines, on_chunk)
    except SeqgenError:
        out_file.close()
        if dist.world == 1 and done_lines == 0 and summary.lines == 0 and os.path.getsize(out_path) == 0:
            for path in (out_path, sidecar):     # failed before writing anything: leave no trace to resume
                os.unlink(path)
        raise
    finally:
        out_file.close()
    summary.seconds = time.perf_counter() - t0
    dist.barrier()
    if dist.is_main:
        parts = find_parts(out_path)
        if parts:
            _merge_parts(out_path, parts)
        if os.path.exists(sidecar):
            os.unlink(sidecar)
    return summary


def _translate_chunks(model, input_path, gen, out_file, as_part, done_chunks, dist, summary, batch_size,
                      max_src_len, seed, warn, log, progress, done_lines, on_chunk) -> None:
    """The chunks of `input_path` this process translates, appended to `out_file` (see translate_file)."""
    t0, total_written = time.perf_counter(), 0
    for c, chunk in enumerate(read_chunks(input_path)):
        if c in done_chunks or c % dist.world != dist.rank:
            continue
        results = translate_nbest(model, chunk, gen, batch_size=batch_size, max_src_len=max_src_len,
                                  seed=seed + c, warn=warn)
        first = c * CHUNK_LINES + 1
        text = "".join(format_result(first + j, hyps, gen.n_best) for j, hyps in enumerate(results))
        record = json.dumps({"i": c, "text": text}) + "\n" if as_part else text
        try:
            out_file.write(record)
            out_file.flush()
            os.fsync(out_file.fileno())
        except OSError as e:
            raise SeqgenError(f"{out_file.name}: cannot write the translations ({e.strerror or e}); the "
                              f"finished chunks are kept: run the same command again to continue") from None
        if on_chunk is not None:
            on_chunk(first, chunk, results)
        summary.lines += len(chunk)
        total_written += len(chunk)
        if progress and dist.is_main:
            log(f"seqgen: {done_lines + total_written * dist.world:,} lines translated "
                f"({total_written / max(time.perf_counter() - t0, 1e-9):.1f} lines/s)")


def _read_part(path: str) -> Iterator[tuple[int, str]]:
    """(chunk index, text) of every complete record of a part file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return
            try:
                record = json.loads(line)
                yield int(record["i"]), record["text"]
            except (ValueError, KeyError, TypeError):
                raise SeqgenError(f"{path}: not a part file of seqgen translate; delete it or pass "
                                  f"--overwrite") from None


def _repair_tail(path: str) -> None:
    """Cut a record that a kill left half-written at the end of a part file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


def _merge_parts(out_path: str, parts: list[str]) -> None:
    """Append the parts' chunks to the output in chunk order (each part is in ascending order; streamed, so
    memory stays bounded), then delete the parts. A kill before the deletion is repaired by the next run:
    chunks already in the output are skipped."""
    done_lines, _ = _complete_output(out_path, 1, repair=True)
    first_missing = done_lines // CHUNK_LINES
    with open(out_path, "a", encoding="utf-8") as out:
        last = first_missing - 1
        for i, text in heapq.merge(*(_read_part(p) for p in parts)):
            if i <= last:
                continue
            if i != last + 1:
                raise SeqgenError(f"{out_path}: chunk {last + 1} is missing from the part files; run the same "
                                  f"command again to translate it")
            out.write(text)
            last = i
        out.flush()
        os.fsync(out.fileno())
    for part in parts:
        os.unlink(part)
