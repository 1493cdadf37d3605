"""Captioning whole folders: `caption_folder` (what `seqgen caption` runs).

    caption_folder(model, ["photos/"], "captions.jsonl", GenerationConfig(beam=5))

It streams image paths (bounded memory whatever the folder size), decodes images in DataLoader workers (a
bad file becomes a "skipped" line with its reason, never a crash), runs the CNN and the batched beam search
one batch at a time (seqgen.inference.captioning), and appends one record per image to a JSONL or CSV file,
flushed per batch, so a killed run loses at most one batch and a rerun continues where it stopped. Under
torchrun the processes share the batches and write part files that process 0 merges into the one output, in
listing order. The file's records, how a rerun recognises them and the merge: seqgen.tasks.caption_records.
"""
from __future__ import annotations

import operator
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from seqgen.data.images import (IMAGE_EXTENSIONS, ImageFolderDataset, collate_images, default_num_workers,
                                iter_image_paths, loader_generator)
from seqgen.distributed import Distributed
from seqgen.encoders.cnn import build_transform
from seqgen.errors import SeqgenError, report_out_of_memory
from seqgen.generation import GenerationConfig
from seqgen.inference.captioning import Caption, caption_tensor, default_caption_gen, require_captioning
from seqgen.log import Log, printable, to_stderr
from seqgen.outputs import output_lock, refuse_overwriting_inputs
from seqgen.plots import image_attention_map, require_matplotlib
from seqgen.tasks.caption_records import (CSV_HEADER, Resolved, batch_records, cell, find_parts, image_key, merge_parts,
                                          output_format, part_path, read_done, read_records, record_key)

if TYPE_CHECKING:
    from seqgen.model import Seq2Seq


@dataclass
class FolderSummary:
    """What `caption_folder` did. skipped: (path, reason) of every image that could not be captioned."""

    out_path: str
    captioned: int = 0             # captions written by this run
    already_done: int = 0          # images found in the output from an earlier run (resume)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    attention_maps: int = 0

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """False when nothing could be captioned (the CLI then exits non-zero)."""
        return self.captioned + self.already_done > 0


class _PathBatches:
    """A streaming batch sampler: lists of (root, path), `batch_size` at a time, as they are listed.

    With `world` > 1 only the batches rank, rank + world, rank + 2 * world, ... are kept: every process lists
    the same images, cuts the same batches and captions its share (batches, not single images, so that each
    image is decoded in the same batch as in a single-process run: the same floating-point sums).
    """

    def __init__(self, source: Iterator[tuple[str, str]], batch_size: int, rank: int = 0, world: int = 1):
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world

    def _all(self) -> Iterator[list[tuple[str, str]]]:
        batch: list[tuple[str, str]] = []
        for item in self.source:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self) -> Iterator[list[tuple[str, str]]]:
        for i, batch in enumerate(self._all()):
            if i % self.world == self.rank:
                yield batch


def _attention_png_name(path: str, root: str) -> str:
    """photos/sub/x.jpg listed from photos/ -> sub__x.png (a file given by itself -> x.png)."""
    rel = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
    stem = os.path.splitext(os.path.normpath(rel))[0]
    return re.sub(r"[^\w.-]+", "_", stem.replace(os.sep, "__")) + ".png"


class _AttentionNames:
    """A unique attention-map file name for each listed image, given in listing order: `_attention_png_name`,
    then -2, -3, ... when an earlier image has it (`a b.jpg` and `a_b.jpg`, `x.jpg` and `x.png`, one name in two
    input folders; compared ignoring case, as some filesystems do). Every listed image is named, also those
    captioned by an earlier run, so that a rerun of the same command gives each image the same file."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, path: str, root: str) -> str:
        base = _attention_png_name(path, root)[:-len(".png")]
        name, n = base, 1
        while name.casefold() in self.used:
            n += 1
            name = f"{base}-{n}"
        self.used.add(name.casefold())
        return name + ".png"


def _refuse_writing_into_inputs(inputs: Sequence[str], recursive: bool, outputs: dict[str, str | None]) -> None:
    """Refuse an output that is an input (seqgen.outputs), one of the images an input folder lists
    (`--skipped photos/a.jpg`), or with `recursive` a map folder inside an input folder (captioned next time)."""
    refuse_overwriting_inputs(outputs, [("the input", root) for root in inputs])
    folders = [(root, os.path.realpath(root)) for root in inputs if os.path.isdir(root)]
    for flag, path in outputs.items():
        real = os.path.realpath(path) if path else ""
        for root, folder in folders:
            if not real.startswith(folder.rstrip(os.sep) + os.sep):
                continue
            if flag == "--attention-png" and recursive:
                raise SeqgenError(f"--attention-png {path} is inside the input folder {root}, and --recursive would "
                                  f"caption its maps; choose another --attention-png (nothing was written)")
            listed = recursive or os.path.dirname(real) == folder
            if listed and os.path.isfile(real) and os.path.splitext(real)[1].lower() in IMAGE_EXTENSIONS:
                raise SeqgenError(f"{flag} {path} is an image of the input folder {root}; choose another {flag}: "
                                  f"seqgen never writes over its inputs (nothing was written)")


@contextmanager
def _appending(target: str, mode: str, out_path: str):
    """The captions file `target` opened for writing; a close that fails (a full disk: the last flush) is the same
    one-line error as a failed write, and never replaces the error that is already on its way."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        f = open(target, mode, encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as e:
        raise SeqgenError(f"{target}: cannot write the captions ({e.strerror or e})") from None
    try:
        yield f
    except BaseException:
        try:
            f.close()
        except OSError:
            pass
        raise
    try:
        f.close()
    except OSError as e:
        raise _write_failed(out_path, e) from None


def caption_folder(model: Seq2Seq, inputs: Sequence[str], out_path: str, gen: GenerationConfig | None = None, *,
                   batch_size: int = 64, num_workers: int | None = None, recursive: bool = False,
                   follow_symlinks: bool = False, resume: bool = True, attention_png_dir: str | None = None,
                   skipped_path: str | None = None, progress: bool = True,
                   log: Log | None = None, dist: Distributed | None = None) -> FolderSummary:
    """Caption every image in `inputs` (folders and/or files) into `out_path` (.jsonl or .csv).

    Records {"image", "caption", "score"} follow the listing order (sorted within each folder). The output is
    flushed after every batch; with `resume` (default) images already in it are skipped, so a killed run is
    continued by running it again; `resume=False` starts the file over. An image is recognised by its folder
    resolved, so a rerun may spell the folder another way (absolute, ./photos/); records keep the spelling of
    the run that wrote them. Unreadable images are listed in the summary with their reason (and in
    `skipped_path` as path<TAB>reason lines). Memory stays bounded: paths are listed lazily and only a few
    batches are in flight. The output is locked for the run (a second seqgen writing it is refused), and no
    output may be an input.

    Sharded (`dist` from `seqgen.distributed.setup` under torchrun, more than one process): every process
    lists the same images and cuts the same batches; process r captions batches r, r + W, ... into its part
    file (`part_path`) with the same flushing and resume rules (a rerun skips what is in the output and in
    every part). At the end process 0 merges the parts into `out_path` in listing order, atomically, and
    deletes them: the file one process writes. Every process returns the summary of the whole run; process 0
    reports it. Part files found without torchrun (a killed sharded run) are finished and merged the same way.
    """
    require_captioning(model)
    say = log or to_stderr
    dist = dist or Distributed()
    gen = gen or default_caption_gen()
    gen.validate()
    if batch_size < 1:
        raise SeqgenError(f"--batch-size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = default_num_workers(model.device)
    if num_workers < 0:
        raise SeqgenError(f"--num-workers must be >= 0, got {num_workers}")
    if not inputs:
        raise SeqgenError("no input folder or image given")
    fmt = output_format(out_path)
    for root in inputs:
        if not os.path.exists(root):
            raise SeqgenError(f"{root}: no such file or folder")
    if attention_png_dir:
        require_matplotlib()
        if model.decoder.attention is None:
            raise SeqgenError("this model has no attention (--attention none); there are no attention maps to draw")
    _refuse_writing_into_inputs(inputs, recursive, {"--out": out_path, "--skipped": skipped_path,
                                                    "--attention-png": attention_png_dir})
    with output_lock(out_path, dist):
        return _caption_locked(model, inputs, out_path, gen, fmt, batch_size=batch_size, num_workers=num_workers,
                               recursive=recursive, follow_symlinks=follow_symlinks, resume=resume,
                               attention_png_dir=attention_png_dir, skipped_path=skipped_path, progress=progress,
                               say=say, dist=dist)


def _caption_locked(model: Seq2Seq, inputs: Sequence[str], out_path: str, gen: GenerationConfig, fmt: str, *,
                    batch_size: int, num_workers: int, recursive: bool, follow_symlinks: bool, resume: bool,
                    attention_png_dir: str | None, skipped_path: str | None, progress: bool, say: Log,
                    dist: Distributed) -> FolderSummary:
    """`caption_folder` once its arguments are checked and the output is locked."""
    out_abs = os.path.abspath(out_path)
    parts = find_parts(out_path)
    if not resume and parts:       # starting over: an earlier sharded run's parts go too
        if dist.is_main:
            for part in parts:
                _remove(part, out_path)
        parts = []
    sharded = dist.world > 1 or bool(parts)
    target = part_path(out_path, dist.rank, dist.world) if sharded else out_path   # where this process appends
    if sharded and not resume and dist.is_main:
        _remove(out_path, out_path)
    dist.barrier()                 # nothing is removed once any process reads or writes
    resolve = Resolved()
    done: set[str] = set()         # resolved keys of the images already captioned
    if resume:
        done = {resolve(key) for key, _ in read_records(out_path, fmt, repair=not sharded)}
        for part in parts:
            done.update(resolve(key) for key, _ in read_records(part, fmt, repair=part == target))
    dist.barrier()                 # every process has read the same records before any appends new ones
    summary = FolderSummary(out_path=out_path)
    listing_skips: list[tuple[str, str]] = []        # (path, reason): what the listing passed over
    failures: list[tuple[int, str, str]] = []        # (batch number, path, reason): images that failed to decode
    # the merge's order: every listed image's position, by resolved key (process 0 of a sharded run only)
    order: dict[str, int] | None = {} if sharded and dist.is_main else None
    png_name = _AttentionNames() if attention_png_dir else None

    def listing(on_skip: Callable[[str, str], None] | None) -> Iterator[tuple[str, str]]:
        for root in inputs:
            for path in iter_image_paths(root, recursive=recursive, follow_symlinks=follow_symlinks, on_skip=on_skip):
                yield root, path

    show = progress and dist.is_main
    total = sum(1 for _ in listing(None)) if show and dist.world == 1 else None
    bar = tqdm(total=total, unit="img", desc="caption" if dist.world == 1 else f"caption (process 0 of {dist.world})",
               disable=not show, dynamic_ncols=True, file=sys.stderr)
    seen: set[str] = set()

    def todo() -> Iterator[tuple[str, str]]:
        """(attention-map name, path) of each image left to caption."""
        for root, path in listing((lambda p, r: listing_skips.append((p, r))) if dist.is_main else None):
            key = resolve(record_key(path, fmt))
            if key in seen or os.path.abspath(path) == out_abs:
                continue
            seen.add(key)
            name = png_name(path, root) if png_name else ""
            if order is not None:
                order[key] = len(order)
            if key in done:
                summary.already_done += 1
                bar.update(1)
                continue
            yield name, path

    transform = build_transform(model.config.image_encoder)
    # the batch sampler yields (attention-map name, path) keys
    dataset = ImageFolderDataset(operator.itemgetter(1), transform, draft_size=transform.image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_PathBatches(todo(), batch_size, dist.rank, dist.world), num_workers=num_workers,
        collate_fn=collate_images, pin_memory=model.device.type == "cuda", generator=loader_generator())
    new_file = not resume or not os.path.exists(target) or os.path.getsize(target) == 0
    t0 = time.perf_counter()
    with _appending(target, "w" if new_file else "a", out_path) as f:
        if new_file and fmt == "csv":
            _append(f, ",".join(CSV_HEADER) + "\n", out_path)
        for k, batch in enumerate(loader):
            number = k * dist.world + dist.rank          # the batch's place among all processes' batches
            failures.extend((number, path, reason) for (_, path), reason in batch.failed)
            if batch.images is not None:
                paths = [path for _, path in batch.indices]
                with report_out_of_memory(f"captioning a batch of {len(paths)} images (beam {gen.beam})",
                                          f"lower --batch-size (now {batch_size}) or --beam; the finished batches "
                                          f"are kept in {out_path}: run again to continue"):
                    captions = caption_tensor(model, batch.images, gen)
                _append(f, batch_records(fmt, paths, captions), out_path)   # a kill loses at most one batch
                summary.captioned += len(captions)
                if attention_png_dir:
                    summary.attention_maps += _draw_attention(batch.images, batch.indices, captions,
                                                              attention_png_dir)
            bar.update(len(batch.indices) + len(batch.failed))
        try:
            os.fsync(f.fileno())
        except OSError:
            pass
    bar.close()
    if sharded:
        # every process learns the whole run's numbers (so that all exit alike); process 0 merges the parts
        shares = dist.all_gather((summary.captioned, summary.attention_maps, listing_skips, failures))
        summary.captioned = sum(s[0] for s in shares)
        summary.attention_maps = sum(s[1] for s in shares)
        listing_skips = [skip for s in shares for skip in s[2]]
        failures = sorted((failure for s in shares for failure in s[3]), key=lambda failure: failure[0])
    summary.skipped = listing_skips + [(path, reason) for _, path, reason in failures]
    summary.seconds = time.perf_counter() - t0
    if sharded:
        if dist.is_main:
            merge_parts(out_path, find_parts(out_path), lambda key: order.get(resolve(key)))
        dist.barrier()             # the merged file is complete before any process returns
    if dist.is_main:
        _report(summary, skipped_path, say)
    return summary


def _remove(path: str, out_path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SeqgenError(f"{path}: cannot remove it to start {out_path} over ({e.strerror or e})") from None


def _write_failed(out_path: str, e: OSError) -> SeqgenError:
    return SeqgenError(f"{out_path}: cannot write the captions ({e.strerror or e}); the finished batches are kept, "
                       f"run the same command again to continue")


def _append(f, text: str, out_path: str) -> None:
    """Write and flush (so a killed run keeps every finished batch); a failed write is one clear error."""
    try:
        f.write(text)
        f.flush()
    except OSError as e:
        raise _write_failed(out_path, e) from None


def _draw_attention(images: Tensor, items: Sequence[tuple[str, str]], captions: Sequence[Caption],
                    folder: str) -> int:
    """One PNG per (file name, path) in `items` whose caption has attention; returns how many were drawn."""
    drawn = 0
    for image, (name, _), c in zip(images, items, captions):
        if c.attention is None or not c.words:
            continue
        image_attention_map(image.permute(1, 2, 0).numpy(), c.attention, c.words, c.grid,
                            os.path.join(folder, name), title=c.text)
        drawn += 1
    return drawn


def _report(summary: FolderSummary, skipped_path: str | None, say: Log) -> None:
    """The summary line, one line per skipped image (file names escaped, whatever `say` prints to) and the
    --skipped file (path<TAB>reason, each a spreadsheet-safe one-line `cell`)."""
    s = summary
    parts = [f"captioned {s.captioned:,} image(s) in {s.seconds:.1f}s ({s.images_per_second:.1f} img/s) "
             f"into {s.out_path}"]
    if s.already_done:
        parts.append(f"{s.already_done:,} already there from an earlier run")
    if s.skipped:
        parts.append(f"{len(s.skipped):,} skipped")
    say(printable("seqgen: " + "; ".join(parts)))
    for path, reason in s.skipped[:50]:
        say(printable(f"  skipped {path}: {reason}"))
    if len(s.skipped) > 50:
        say(printable(f"  ... and {len(s.skipped) - 50} more" + (f" (all in {skipped_path})" if skipped_path else "")))
    if skipped_path:
        try:
            with open(skipped_path, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.writelines(f"{cell(p)}\t{cell(r)}\n" for p, r in s.skipped)
        except OSError as e:
            raise SeqgenError(f"{skipped_path}: cannot write the list of skipped images ({e.strerror or e})") from None
    if s.attention_maps:
        say(f"seqgen: {s.attention_maps:,} attention map(s) written")


__all__ = ["FolderSummary", "caption_folder", "find_parts", "image_key", "merge_parts", "output_format",
           "part_path", "read_done", "record_key"]
