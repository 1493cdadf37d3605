"""The prepared-data cache: a corpus tokenized once (on every core) into flat token-id arrays on disk,
memory-mapped by every later run, --resume included.

This module holds what every kind of cache shares (the header, the checksums, the atomic temporary folder,
the removal of orphans: `read_header`, `open_arrays`, `ArrayWriter`, `build_folder`) and the parallel-pairs
kind; seqgen.data.prepared_stream holds the language-model kind (one token stream, PREPARED_DIR/stream-KEY),
seqgen.data.prepared_captions the captioning kind (training caption token lists, PREPARED_DIR/captions-KEY).

One pairs cache is a folder PREPARED_DIR/pairs-KEY, KEY a digest of what its content depends on: the format
version, each input file (size, mtime, and sha256 as seqgen.data.text.file_digest takes it) and the two
codecs (tokenizer model bytes and vocabulary). A changed file or vocabulary gives another KEY, so a cache is
never read for other data. The folder holds

    src.ids, tgt.ids          the token ids of every kept pair (stripped, no empty side), without <bos>/<eos>:
                              one flat array, uint16 when the vocabulary has at most 65,536 ids, else uint32
    src.offsets, tgt.offsets  int64 [pairs + 1]: pair i is ids[offsets[i]:offsets[i + 1]]
    header.json               version, key, inputs, counts (lines, pairs, skipped pairs, tokens), dtype, and
                              the size and sha256 of every array file

Every kind is written in a temporary folder `.tmp-KIND-PID-XXXX` next to it and renamed into place when complete,
so a kill leaves no folder a run would read; a later build removes the temporary folders of processes that are
gone. Opening checks the header, the sizes and the checksums: a cache that fails is rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

import numpy as np

from seqgen.atomic import atomic_write, fsync_dir
from seqgen.data.line_chunks import Sources, check_pairs, default_workers, map_chunks
from seqgen.data.text import file_digest
from seqgen.data.token_lists import TokenLists
from seqgen.errors import SeqgenError
from seqgen.log import warning
from seqgen.tokenizers import TextCodec

FORMAT_VERSION = 1
T = TypeVar("T")
HEADER = "header.json"
_SIDES = ("src", "tgt")


def codec_digest(codec: TextCodec) -> str:
    """sha256 over what a codec maps text to ids with: its level, tokenizer model bytes and vocabulary."""
    h = hashlib.sha256(codec.level.encode())
    h.update(getattr(codec.tokenizer, "model_proto", b""))
    h.update(json.dumps(codec.vocab.to_list()).encode())
    return h.hexdigest()


def input_digests(sources: Sources) -> dict[str, dict]:
    """{path: file_digest} of every input file; SeqgenError naming a file that is not a readable regular file."""
    out = {}
    for path in sources.paths:
        digest = file_digest(path)
        if digest is None:
            raise SeqgenError(f"{path}: not a readable regular file")
        out[path] = digest
    return out


def cache_key(inputs: dict[str, dict], src: TextCodec, tgt: TextCodec) -> str:
    """The digest naming the cache of these inputs and codecs (see the module docstring)."""
    files = [[d["size"], d["mtime"], d["sha256"]] for d in inputs.values()]
    text = json.dumps({"version": FORMAT_VERSION, "files": files, "src": codec_digest(src), "tgt": codec_digest(tgt)})
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class PreparedPairs:
    """An open cache: the kept pairs as memory-mapped token lists and the header's counts."""

    folder: str
    header: dict
    src: TokenLists
    tgt: TokenLists

    def __len__(self) -> int:
        return len(self.src)

    @property
    def skipped_empty(self) -> int:
        return self.header["skipped"]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# -- what every kind of cache shares ----------------------------------------------------------------------
def ids_dtype(vocab_size: int) -> type:
    """The smallest array dtype for token ids below `vocab_size`: uint16 up to 65,536 ids, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def read_header(folder: str, key: str) -> dict:
    """The header.json of the cache in `folder` made for `key`; SeqgenError saying why it cannot be trusted
    (absent, unreadable, another key or format)."""
    try:
        with open(os.path.join(folder, HEADER), encoding="utf-8") as f:
            header = json.load(f)
    except FileNotFoundError:
        raise SeqgenError(f"{folder}: no prepared data here") from None
    except (OSError, ValueError) as e:
        raise SeqgenError(f"{folder}/{HEADER}: unreadable ({e})") from None
    if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION or header.get("key") != key:
        raise SeqgenError(f"{folder}/{HEADER}: not the header of this data's cache (format {FORMAT_VERSION})")
    return header


def open_arrays(folder: str, header: dict) -> dict[str, np.ndarray]:
    """{file name: read-only memory map} of every array file the header lists, each checked against the
    header's size and sha256 ("*.offsets" and "*.rows" int64, the others header["dtype"]); SeqgenError naming the file that
    fails (a corrupt or incomplete cache)."""
    arrays = {}
    try:
        dtype = np.dtype(header["dtype"])
        for name, (size, digest) in header["files"].items():
            path = os.path.join(folder, name)
            if os.path.getsize(path) != size or _sha256(path) != digest:
                raise SeqgenError(f"{path}: size or checksum differs from {HEADER} (a corrupt cache)")
            file_dtype = np.int64 if name.endswith((".offsets", ".rows")) else dtype
            # numpy cannot map an empty file
            arrays[name] = np.memmap(path, dtype=file_dtype, mode="r") if size else np.zeros(0, file_dtype)
    except SeqgenError:
        raise
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise SeqgenError(f"{folder}: an incomplete or corrupt cache ({e})") from None
    return arrays


class ArrayWriter:
    """The array files of a cache being written in `folder`: `put` appends to one and hashes it; `finish`
    syncs them and returns the header's {name: [size, sha256]}."""

    def __init__(self, folder: str, names: list[str]):
        self.folder = folder
        self.files = {}
        try:
            for name in names:
                self.files[name] = open(os.path.join(folder, name), "wb")
        except OSError:
            self.close()
            raise
        self.hashes = {name: hashlib.sha256() for name in names}

    def put(self, name: str, array: np.ndarray) -> None:
        data = array.tobytes()
        self.files[name].write(data)
        self.hashes[name].update(data)

    def finish(self) -> dict[str, list]:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        self.close()
        return {name: [os.path.getsize(os.path.join(self.folder, name)), self.hashes[name].hexdigest()]
                for name in self.files}

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def unwritable(prepared_dir: str, e: OSError) -> SeqgenError:
    """The one-line error for a prepared-data folder that cannot be written (read-only, full)."""
    return SeqgenError(f"--prepared-dir {prepared_dir}: cannot write the prepared data ({e.strerror or e}); "
                       f"free space there or choose another --prepared-dir")


def _remove_orphans(prepared_dir: str) -> None:
    """Delete the temporary folders (`.tmp-KIND-PID-XXXX`, any kind) that builds killed on the way left (their
    process is gone)."""
    for name in os.listdir(prepared_dir):
        if not name.startswith(".tmp-"):
            continue
        try:
            pid = int(name.split("-")[2])
            os.kill(pid, 0)
            continue                      # its builder is still at work
        except ProcessLookupError:
            shutil.rmtree(os.path.join(prepared_dir, name), ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def changed_input(inputs: dict[str, dict]) -> str | None:
    """The first input file whose digest now differs from `inputs` (input_digests' answer), or None."""
    for path, digest in inputs.items():
        if file_digest(path) != digest:
            return path
    return None


def build_folder(prepared_dir: str, folder: str, kind: str, header: dict, write: Callable[[str], dict]) -> None:
    """Make the cache `folder` in `prepared_dir` atomically: `write(tmp)` fills a temporary folder
    `.tmp-KIND-PID-XXXX` and returns the header's counts and files, which join `header` (version, key,
    inputs) in header.json; the folder is then renamed into place (replacing a refused one). On any failure
    the temporary folder goes, and `prepared_dir` too when this call made it and it is empty.

    SeqgenError when an input of header["inputs"] changed while it was written, or (via `unwritable`) when
    `prepared_dir` cannot be written."""
    made = not os.path.isdir(prepared_dir)
    tmp = None
    try:
        try:
            os.makedirs(prepared_dir, exist_ok=True)
            _remove_orphans(prepared_dir)
            tmp = tempfile.mkdtemp(prefix=f".tmp-{kind}-{os.getpid()}-", dir=prepared_dir)
            header = {"version": FORMAT_VERSION, **header, **write(tmp)}
            changed = changed_input(header["inputs"])
            if changed:
                raise SeqgenError(f"{changed}: changed while it was being prepared; run again once it is complete")
            atomic_write(os.path.join(tmp, HEADER), lambda f: json.dump(header, f, indent=1), mode="w",
                         encoding="utf-8")
            fsync_dir(tmp)
            if os.path.exists(folder):
                shutil.rmtree(folder)      # a corrupt or incomplete one: it was just refused
            os.rename(tmp, folder)
            tmp = None
            fsync_dir(prepared_dir)
        except OSError as e:
            raise unwritable(prepared_dir, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if made:
                try:
                    os.rmdir(prepared_dir)     # only if empty: a failed first run leaves nothing behind
                except OSError:
                    pass


# -- the pairs kind ---------------------------------------------------------------------------------------
def open_prepared(folder: str, key: str) -> PreparedPairs:
    """Open the pairs cache in `folder` made for `key`; SeqgenError saying why it cannot be trusted (absent,
    another key or format, a file of the wrong size or checksum)."""
    header = read_header(folder, key)
    arrays = open_arrays(folder, header)
    try:
        lists = {side: TokenLists(arrays[f"{side}.ids"], arrays[f"{side}.offsets"]) for side in _SIDES}
        consistent = all(len(lists[s]) == header["pairs"] and lists[s].offsets[-1] == len(lists[s].ids)
                         for s in _SIDES)
    except (KeyError, TypeError, ValueError) as e:
        raise SeqgenError(f"{folder}: an incomplete or corrupt cache ({e})") from None
    if not consistent:
        raise SeqgenError(f"{folder}: its arrays do not match the counts in {HEADER} (a corrupt cache)")
    return PreparedPairs(folder, header, lists["src"], lists["tgt"])


def _write_arrays(tmp: str, sources: Sources, src: TextCodec, tgt: TextCodec, workers: int | None) -> dict:
    """Tokenize the corpus into the array files of `tmp`; returns the header's counts and files."""
    dtype = ids_dtype(max(len(src.vocab), len(tgt.vocab)))
    job = {"kind": "encode", "src": src.to_dict(), "tgt": tgt.to_dict()}
    out = ArrayWriter(tmp, [f"{side}.{kind}" for side in _SIDES for kind in ("ids", "offsets")])
    stats, totals = [0, 0, 0, 0], {side: 0 for side in _SIDES}
    try:
        for side in _SIDES:
            out.put(f"{side}.offsets", np.zeros(1, dtype=np.int64))
        for part_stats, *sides in map_chunks(sources, job, workers=workers):
            stats = [a + b for a, b in zip(stats, part_stats)]
            for side, (ids, lengths) in zip(_SIDES, sides):
                out.put(f"{side}.ids", ids.astype(dtype))
                out.put(f"{side}.offsets", totals[side] + np.cumsum(lengths))
                totals[side] += int(lengths.sum())
        files = out.finish()
    finally:
        out.close()
    check_pairs(sources, stats)
    lines, skipped = stats[0], stats[1]
    return {"lines": lines, "pairs": lines - skipped, "skipped": skipped, "dtype": np.dtype(dtype).name,
            "tokens": totals, "files": files}


def open_existing(folder: str, opener: Callable[[], T], name: str, log: Callable[[str], None]) -> T | None:
    """`opener()`'s cache when `folder` holds one that can be trusted; None when there is none, or (after a
    warning to `log` naming the data `name`) when it fails its checks and is to be rebuilt."""
    if os.path.isdir(folder):
        try:
            return opener()
        except SeqgenError as e:
            log(warning(f"rebuilding the prepared data of {name}: {e}"))
    return None


def prepare_pairs(sources: Sources, src: TextCodec, tgt: TextCodec, prepared_dir: str, *,
                  workers: int | None = None, log: Callable[[str], None] = lambda line: None) -> PreparedPairs:
    """The cache of `sources` tokenized by `src`/`tgt` in `prepared_dir`: opened when one matches, else built
    with `workers` processes (default every core). `log` gets a line when a cache is built or found corrupt.

    SeqgenError (one line) when an input cannot be read (as read_parallel/read_tsv say it), changes while it
    is being prepared, or when `prepared_dir` cannot be written (read-only, full).
    """
    inputs = input_digests(sources)
    key = cache_key(inputs, src, tgt)
    folder = os.path.join(prepared_dir, f"pairs-{key[:24]}")
    found = open_existing(folder, lambda: open_prepared(folder, key), sources.name, log)
    if found is not None:
        return found
    t0 = time.perf_counter()
    workers = default_workers() if workers is None else workers
    build_folder(prepared_dir, folder, "pairs", {"key": key, "inputs": inputs},
                 lambda tmp: _write_arrays(tmp, sources, src, tgt, workers))
    header = read_header(folder, key)
    log(f"{sources.name}: tokenized {header['pairs']:,} pairs ({header['tokens']['src']:,} source / "
        f"{header['tokens']['tgt']:,} target tokens) into {folder} in {time.perf_counter() - t0:.1f}s "
        f"({workers} process(es))")
    return open_prepared(folder, key)


# -- the vocabularies fitted to a corpus -------------------------------------------------------------------
def cached_codecs(prepared_dir: str, key: dict, fit: Callable[[], tuple[TextCodec, TextCodec]], *,
                  log: Callable[[str], None] = lambda line: None) -> tuple[TextCodec, TextCodec, bool]:
    """The (source, target) codecs saved under `key` (what they were fitted to: input digests and settings) in
    `prepared_dir`, else `fit()`'s, then saved there (atomically; a checkpoint-safe file, read without pickle).
    Returns them and whether they were fitted now. A file that cannot be read is refitted, with a warning."""
    digest = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, **key}, sort_keys=True).encode()).hexdigest()
    path = os.path.join(prepared_dir, f"vocab-{digest[:24]}.pt")
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") != digest:
                raise ValueError("another key")
            return TextCodec.from_dict(saved["src"]), TextCodec.from_dict(saved["tgt"]), False
        except Exception as e:        # any damage: the file is refitted, never trusted
            log(warning(f"{path}: unreadable vocabulary cache ({str(e).splitlines()[0] if str(e) else e!r}); "
                        f"fitting the vocabulary again"))
    src, tgt = fit()
    made = not os.path.isdir(prepared_dir)
    try:
        atomic_write(path, lambda f: torch.save({"key": digest, "src": src.to_dict(), "tgt": tgt.to_dict()}, f))
    except OSError as e:
        if made:
            try:
                os.rmdir(prepared_dir)
            except OSError:
                pass
        raise unwritable(prepared_dir, e) from None
    return src, tgt, True
