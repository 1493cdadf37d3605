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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from seqgen.data.images import (ImageFolderDataset, collate_images, default_num_workers, iter_image_paths,
                                loader_generator)
from seqgen.distributed import Distributed
from seqgen.encoders.cnn import build_transform
from seqgen.errors import SeqgenError, report_out_of_memory
from seqgen.generation import GenerationConfig
from seqgen.inference.captioning import Caption, caption_tensor, default_caption_gen, require_captioning
from seqgen.log import Log, to_stderr
from seqgen.plots import image_attention_map, require_matplotlib
from seqgen.tasks.caption_records import (CSV_HEADER, batch_records, find_parts, image_key, merge_parts, output_format,
                                          part_path, read_done, read_records)

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


def caption_folder(model: Seq2Seq, inputs: Sequence[str], out_path: str, gen: GenerationConfig | None = None, *,
                   batch_size: int = 64, num_workers: int | None = None, recursive: bool = False,
                   follow_symlinks: bool = False, resume: bool = True, attention_png_dir: str | None = None,
                   skipped_path: str | None = None, progress: bool = True,
                   log: Log | None = None, dist: Distributed | None = None) -> FolderSummary:
    """Caption every image in `inputs` (folders and/or files) into `out_path` (.jsonl or .csv).

    Records {"image", "caption", "score"} follow the listing order (sorted within each folder). The output is
    flushed after every batch; with `resume` (default) images already in it are skipped, so a killed run is
    continued by running it again; `resume=False` starts the file over. Unreadable images are listed in the
    summary with their reason (and in `skipped_path` as path<TAB>reason lines). Memory stays bounded: paths
    are listed lazily and only a few batches are in flight.

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
    done: set[str] = set()
    if resume:
        done = {key for key, _ in read_records(out_path, fmt, repair=not sharded)}
        for part in parts:
            done.update(key for key, _ in read_records(part, fmt, repair=part == target))
    dist.barrier()                 # every process has read the same records before any appends new ones
    summary = FolderSummary(out_path=out_path)
    listing_skips: list[tuple[str, str]] = []        # (path, reason): what the listing passed over
    failures: list[tuple[int, str, str]] = []        # (batch number, path, reason): images that failed to decode
    # the merge's order: every listed image's position (process 0 of a sharded run only)
    order: dict[str, int] | None = {} if sharded and dist.is_main else None

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
        for root, path in listing((lambda p, r: listing_skips.append((p, r))) if dist.is_main else None):
            key = image_key(path)
            if key in seen or os.path.abspath(path) == out_abs:
                continue
            seen.add(key)
            if order is not None:
                order[key] = len(order)
            if key in done:
                summary.already_done += 1
                bar.update(1)
                continue
            yield root, path

    transform = build_transform(model.config.image_encoder)
    # the batch sampler yields (root, path) keys
    dataset = ImageFolderDataset(operator.itemgetter(1), transform, draft_size=transform.image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_PathBatches(todo(), batch_size, dist.rank, dist.world), num_workers=num_workers,
        collate_fn=collate_images, pin_memory=model.device.type == "cuda", generator=loader_generator())
    new_file = not resume or not os.path.exists(target) or os.path.getsize(target) == 0
    t0 = time.perf_counter()
    try:
        os.makedirs(os.path.dirname(out_abs), exist_ok=True)
        f = open(target, "w" if new_file else "a", encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as e:
        raise SeqgenError(f"{target}: cannot write the captions ({e.strerror or e})") from None
    with f:
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
            merge_parts(out_path, find_parts(out_path), order.get)
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


def _append(f, text: str, out_path: str) -> None:
    """Write and flush (so a killed run keeps every finished batch); a failed write is one clear error."""
    try:
        f.write(text)
        f.flush()
    except OSError as e:
        raise SeqgenError(f"{out_path}: cannot write the captions ({e.strerror or e}); the finished batches are "
                          f"kept, run the same command again to continue") from None


def _draw_attention(images: Tensor, items: Sequence[tuple[str, str]], captions: Sequence[Caption],
                    folder: str) -> int:
    """One PNG per (root, path) in `items` whose caption has attention; returns how many were drawn."""
    drawn = 0
    for image, (root, path), c in zip(images, items, captions):
        if c.attention is None or not c.words:
            continue
        image_attention_map(image.permute(1, 2, 0).numpy(), c.attention, c.words, c.grid,
                            os.path.join(folder, _attention_png_name(path, root)), title=c.text)
        drawn += 1
    return drawn


def _report(summary: FolderSummary, skipped_path: str | None, say: Log) -> None:
    s = summary
    parts = [f"captioned {s.captioned:,} image(s) in {s.seconds:.1f}s ({s.images_per_second:.1f} img/s) "
             f"into {s.out_path}"]
    if s.already_done:
        parts.append(f"{s.already_done:,} already there from an earlier run")
    if s.skipped:
        parts.append(f"{len(s.skipped):,} skipped")
    say("seqgen: " + "; ".join(parts))
    for path, reason in s.skipped[:50]:
        say(f"  skipped {path}: {reason}")
    if len(s.skipped) > 50:
        say(f"  ... and {len(s.skipped) - 50} more" + (f" (all in {skipped_path})" if skipped_path else ""))
    if skipped_path:
        try:
            with open(skipped_path, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.writelines(f"{p}\t{r}\n" for p, r in s.skipped)
        except OSError as e:
            raise SeqgenError(f"{skipped_path}: cannot write the list of skipped images ({e.strerror or e})") from None
    if s.attention_maps:
        say(f"seqgen: {s.attention_maps:,} attention map(s) written")


__all__ = ["FolderSummary", "caption_folder", "find_parts", "image_key", "merge_parts", "output_format",
           "part_path", "read_done"]
