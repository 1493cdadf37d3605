"""The captions file of `seqgen caption`: its records, how a rerun finds what is done, and the part files.

    output_format("captions.csv") -> "csv";  read_done("captions.jsonl") -> the images already captioned

A record is {"image", "caption", "score"}: a JSONL line, or a CSV row under the header image,caption,score.
The image is named as it was listed (`image_key`); the file is valid UTF-8 and one record per line whatever
the file name: JSON escapes what it must (an undecodable byte of a name as \\udcff, read back as the same
name), and CSV cells escape control characters (`record_key`) and begin with a quote where a spreadsheet
would run a formula (`seqgen.outputs.spreadsheet_cell`), which reading the file back undoes. A rerun compares
images by their resolved folder (`Resolved`), so it may spell the folder another way. Records are appended
and flushed per batch (seqgen.tasks.caption_folder); a record cut off by a kill is cut from the file on resume.
Under torchrun each process appends to its own part file, which process 0 merges at the end (`merge_parts`).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from seqgen.atomic import atomic_write, remove_partial_writes
from seqgen.errors import SeqgenError
from seqgen.log import printable
from seqgen.outputs import spreadsheet_cell, unspreadsheet_cell

if TYPE_CHECKING:
    from seqgen.inference.captioning import Caption

CSV_HEADER = ["image", "caption", "score"]


def output_format(path: str) -> str:
    """"jsonl" or "csv" from the extension of `path`."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if ext == ".csv":
        return "csv"
    raise SeqgenError(f"--out {path}: unknown output format {ext or '(no extension)'}; use .jsonl or .csv")


def image_key(path: str) -> str:
    """How an image is named in the output (and recognised again on resume): its path as listed, normalised."""
    return os.path.normpath(path)


def record_key(path: str, fmt: str) -> str:
    """The image's name as a record of format `fmt` holds it: `image_key`; in CSV, which has no escapes, with
    control characters and undecodable bytes escaped (`printable`), so that every record stays one valid line."""
    return image_key(path) if fmt == "jsonl" else printable(image_key(path))


class Resolved:
    """A record key with its folder resolved (absolute, symlinks followed), so that `photos/x.jpg`,
    `./photos/x.jpg` and `/home/me/photos/x.jpg` are one image on resume; one realpath per folder."""

    def __init__(self):
        self.folders: dict[str, str] = {}

    def __call__(self, key: str) -> str:
        folder, name = os.path.split(key)
        real = self.folders.get(folder)
        if real is None:
            real = self.folders[folder] = os.path.realpath(folder or os.curdir)
        return os.path.join(real, name)


def read_records(path: str, fmt: str, *, repair: bool) -> list[tuple[str, str]]:
    """(image key, record text) of every complete record of the captions file `path`; [] when it is missing.

    A last record cut off by a kill (the bytes after the last newline) is left out and, with `repair`, cut
    from the file (only the one process that appends to it may do that; its image is captioned again).
    Anything that is not a seqgen captions file raises SeqgenError rather than being overwritten.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SeqgenError(f"{path}: cannot read the earlier output ({e.strerror or e})") from None
    end = data.rfind(b"\n") + 1          # everything after the last newline is an interrupted write
    # surrogateescape: a file written before names were escaped may hold a name's undecodable bytes raw
    text = data[:end].decode("utf-8", errors="surrogateescape")
    records: list[tuple[str, str]] = []
    if fmt == "jsonl":
        lines = text.split("\n")[:-1]
        for lineno, line in enumerate(lines, 1):
            try:
                records.append((json.loads(line)["image"], line + "\n"))
            except (ValueError, KeyError, TypeError):
                raise SeqgenError(f"{path}:{lineno}: not a captions record ({{\"image\", \"caption\", "
                                  f"\"score\"}}); choose another --out or --overwrite") from None
    else:
        rows = list(csv.reader(io.StringIO(text)))
        if rows and rows[0] != CSV_HEADER:
            raise SeqgenError(f"{path}: not a captions CSV (header {','.join(CSV_HEADER)}); choose another "
                              f"--out or --overwrite")
        for lineno, row in enumerate(rows[1:], 2):
            if len(row) != 3:
                raise SeqgenError(f"{path}:{lineno}: expected 3 columns (image,caption,score), found {len(row)}")
            records.append((unspreadsheet_cell(row[0]), _csv_rows([row])))
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return records


def read_done(out_path: str) -> set[str]:
    """Images already captioned in `out_path` (a JSONL or CSV file from an earlier run).

    A last record cut off by a kill is removed from the file (its image is captioned again); anything else
    that is not a seqgen captions file raises SeqgenError rather than being overwritten.
    """
    return {key for key, _ in read_records(out_path, output_format(out_path), repair=True)}


# Sharded runs (torchrun): process r of W appends to OUT's part file r-of-W; process 0 merges them at the end.
_PART_NAME = re.compile(r"\.part-(\d+)-of-(\d+)$")


def part_path(out_path: str, rank: int, world: int) -> str:
    """The file process `rank` of `world` writes while a folder is captioned under torchrun, next to the
    output and in its format: captions.jsonl -> captions.part-0-of-2.jsonl."""
    stem, ext = os.path.splitext(out_path)
    return f"{stem}.part-{rank}-of-{world}{ext}"


def find_parts(out_path: str) -> list[str]:
    """The part files of `out_path` that sharded runs left (any rank, any number of processes), in
    (processes, rank) order."""
    stem, ext = os.path.splitext(out_path)
    found = []
    for path in glob.glob(glob.escape(stem) + ".part-*-of-*" + glob.escape(ext)):
        match = _PART_NAME.search(path[:len(path) - len(ext)] if ext else path)
        if match and os.path.isfile(path):
            found.append(((int(match[2]), int(match[1])), path))
    return [path for _, path in sorted(found)]


def merge_parts(out_path: str, parts: Sequence[str], position: Callable[[str], int | None]) -> int:
    """Fold the part files into `out_path` and delete them; returns the number of records added.

    The merged file holds the records `out_path` had, then those of the parts whose image is not among them,
    ordered by `position(image key)` (the image's place in the listing; images it does not know come last,
    as found): the file one process appending in listing order writes. It is written to a temp file renamed
    over `out_path`, so a kill leaves the old file and the parts, and the next run merges them again.
    """
    fmt = output_format(out_path)
    remove_partial_writes(out_path)      # the temp file of a merge that was killed
    old = read_records(out_path, fmt, repair=False)
    have = {key for key, _ in old}
    new: dict[str, tuple[tuple[int, int, int], str]] = {}
    for p, part in enumerate(parts):
        for r, (key, text) in enumerate(read_records(part, fmt, repair=False)):
            if key not in have and key not in new:
                pos = position(key)
                new[key] = ((0, pos, 0) if pos is not None else (1, p, r), text)

    def write(f) -> None:
        if fmt == "csv":
            f.write(",".join(CSV_HEADER) + "\n")
        f.writelines(text for _, text in old)
        f.writelines(text for _, text in sorted(new.values(), key=lambda item: item[0]))
    try:
        atomic_write(out_path, write, mode="w", encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as e:
        raise SeqgenError(f"{out_path}: cannot write the merged captions ({e.strerror or e}); the part files "
                          f"are kept: run the same command again to merge them") from None
    for part in parts:       # after the rename: a kill in between leaves parts whose records are all in out_path
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
    return len(new)


def _csv_rows(rows: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def cell(text: str) -> str:
    """A text cell of a CSV or TSV file a spreadsheet may open: one line, no formula (seqgen.outputs)."""
    return spreadsheet_cell(printable(text))


_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_line(record: dict) -> str:
    """One JSONL line, valid UTF-8 whatever the file name: the undecodable bytes of a name (lone surrogates)
    are written as JSON escapes ("\\udcff"), which json.loads reads back as the same name."""
    text = json.dumps(record, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text) + "\n"


def batch_records(fmt: str, paths: Sequence[str], captions: Sequence[Caption]) -> str:
    """The output lines of one batch: JSONL {"image", "caption", "score"} or CSV rows (text cells by `cell`;
    the score is a number seqgen formats)."""
    if fmt == "csv":
        return _csv_rows([cell(record_key(p, fmt)), cell(c.text), f"{c.score:.6f}"] for p, c in zip(paths, captions))
    return "".join(_json_line({"image": record_key(p, fmt), "caption": c.text, "score": round(c.score, 6)})
                   for p, c in zip(paths, captions))


__all__ = ["CSV_HEADER", "Resolved", "batch_records", "cell", "find_parts", "image_key", "merge_parts", "output_format",
           "part_path", "read_done", "read_records", "record_key"]
