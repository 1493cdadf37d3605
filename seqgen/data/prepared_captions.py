"""The captioning kind of the prepared-data cache: the training captions' token ids, written once, memory-mapped
by every later run (--resume included).

One cache is a folder PREPARED_DIR/captions-KEY, KEY a digest of the format version, the training image names
and their captions in order (the text as the run reads it: after --lowercase, for the chosen splits), the codec
and max_len. It holds

    tgt.ids, tgt.offsets   the kept captions' `bos ... eos` ids as one TokenLists (ids uint16 when the vocabulary
                           has at most 65,536 ids, else uint32; offsets int64 [kept + 1])
    image.rows             int64 [kept]: the image row (position among the training names) of each kept caption
    header.json            version, key, captions, kept, dropped (longer than max_len or empty), tokens, dtype,
                           and the size and sha256 of every array file

It is written, checked and rebuilt as every kind is (seqgen.data.prepared): a temporary folder
`.tmp-captions-PID-XXXX` renamed into place, a corrupt file rebuilt, never trusted.

The key is taken from the captions themselves, not from the captions file's fingerprint: a run reads that file
anyway (validation references, the splits), and one file gives different training captions for other splits or
--lowercase. Tokenizing is one process: a captioning corpus is small next to its images (Flickr8k 40k captions,
COCO 600k); what the cache saves is every later run's tokenizing and its per-caption memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Sequence

import numpy as np

from seqgen.data.prepared import (FORMAT_VERSION, ArrayWriter, build_folder, codec_digest, ids_dtype, open_arrays,
                                  open_existing, read_header)
from seqgen.data.token_lists import TokenLists
from seqgen.errors import SeqgenError
from seqgen.tokenizers import TextCodec

CaptionTargets = tuple[TokenLists, np.ndarray, int]   # (targets, image row of each [K] int64, dropped count)


def tokenize_captions(names: Sequence[str], captions: dict[str, list[str]], codec: TextCodec,
                      max_len: int) -> CaptionTargets:
    """The `bos ... eos` ids of every caption of `names` with 1..max_len tokens, the image row of each and how
    many were dropped, in memory (one `TextCodec.encode_flat` call, then array operations)."""
    counts = np.fromiter((len(captions[n]) for n in names), dtype=np.int64, count=len(names))
    texts = [c for n in names for c in captions[n]]
    flat, lengths = codec.encode_flat(texts) if texts else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    kept = (lengths > 0) & (lengths <= max_len)
    image_of = np.repeat(np.arange(len(names), dtype=np.int64), counts)[kept]
    offsets = np.zeros(int(kept.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[kept] + 2, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=ids_dtype(len(codec.vocab)))
    body = np.ones(len(ids), dtype=bool)
    body[offsets[:-1]] = body[offsets[1:] - 1] = False
    ids[offsets[:-1]], ids[offsets[1:] - 1] = codec.vocab.bos, codec.vocab.eos
    ids[body] = flat[np.repeat(kept, lengths)]
    return TokenLists(ids, offsets), image_of, len(texts) - len(image_of)


def captions_key(names: Sequence[str], captions: dict[str, list[str]], codec: TextCodec, max_len: int) -> str:
    """The digest naming the cache of these training captions, codec and max_len (see the module docstring)."""
    h = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "kind": "captions", "codec": codec_digest(codec),
                                   "max_len": max_len}).encode())
    for name in names:
        # one JSON line per image: an unambiguous encoding of the names and captions in order
        h.update(json.dumps([name, captions[name]]).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def open_captions(folder: str, key: str) -> CaptionTargets:
    """Open the captions cache in `folder` made for `key`; SeqgenError saying why it cannot be trusted."""
    header = read_header(folder, key)
    arrays = open_arrays(folder, header)
    try:
        targets = TokenLists(arrays["tgt.ids"], arrays["tgt.offsets"])
        image_of = arrays["image.rows"]
        consistent = (len(targets) == len(image_of) == header["kept"] and targets.offsets[-1] == len(targets.ids)
                      and header["captions"] - header["kept"] == header["dropped"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise SeqgenError(f"{folder}: an incomplete or corrupt cache ({e})") from None
    if not consistent:
        raise SeqgenError(f"{folder}: its arrays do not match the counts in header.json (a corrupt cache)")
    return targets, image_of, int(header["dropped"])


def prepare_captions(names: Sequence[str], captions: dict[str, list[str]], codec: TextCodec, max_len: int,
                     prepared_dir: str, *, what: str = "captions",
                     log: Callable[[str], None] = lambda line: None) -> CaptionTargets:
    """`tokenize_captions`' answer from the captions cache in `prepared_dir`: opened when one matches, else
    written there first. `what` names the data in log lines; `log` gets a line when a cache is built or found
    corrupt. SeqgenError (one line) when `prepared_dir` cannot be written (read-only, full)."""
    key = captions_key(names, captions, codec, max_len)
    folder = os.path.join(prepared_dir, f"captions-{key[:24]}")
    found = open_existing(folder, lambda: open_captions(folder, key), what, log)
    if found is not None:
        return found
    t0 = time.perf_counter()

    def write(tmp: str) -> dict:
        targets, image_of, dropped = tokenize_captions(names, captions, codec, max_len)
        out = ArrayWriter(tmp, ["tgt.ids", "tgt.offsets", "image.rows"])
        try:
            out.put("tgt.ids", targets.ids)
            out.put("tgt.offsets", targets.offsets)
            out.put("image.rows", image_of)
            files = out.finish()
        finally:
            out.close()
        return {"captions": len(image_of) + dropped, "kept": len(image_of), "dropped": dropped,
                "tokens": int(targets.offsets[-1]), "dtype": targets.ids.dtype.name, "files": files}

    build_folder(prepared_dir, folder, "captions", {"key": key, "inputs": {}}, write)
    found = open_captions(folder, key)
    log(f"{what}: tokenized {len(found[1]):,} training captions into {folder} in {time.perf_counter() - t0:.1f}s")
    return found


__all__ = ["CaptionTargets", "captions_key", "open_captions", "prepare_captions", "tokenize_captions"]
