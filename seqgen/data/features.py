"""Feature cache for frozen image backbones: run the CNN once, read memory-mapped features every epoch.

Layout of a cache folder:
    features.f16 (or .f32)  one flat array: memory [N, h*w, C] followed by state [N, C] (the grid mean)
    index.json              names (row order), shapes, dtype, the encoder config and transform, a fingerprint

The fingerprint covers everything the features depend on: the encoder config, a digest of its weights,
the transform, the storage dtype, the image names and each image file's size and mtime. `build()` reuses a
cache only when the fingerprint matches and otherwise rebuilds it, so a cache from another backbone or
other images is never used by mistake. Writes are atomic (temporary names, then rename), with index.json
written last: a cache killed half-way has no index and is rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import IO, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from seqgen.atomic import atomic_write
from seqgen.data.images import ImageError, ImageFolderDataset, collate_images, default_num_workers
from seqgen.encoders.base import EncoderOutput
from seqgen.encoders.cnn import CNNImageEncoder
from seqgen.errors import SeqgenError

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
_DTYPES = {"float16": ("f16", np.float16), "float32": ("f32", np.float32)}


def _weights_digest(encoder: CNNImageEncoder) -> str:
    """sha256 over the backbone's state (names, shapes, values), independent of memory format/device."""
    h = hashlib.sha256()
    for name, t in encoder.backbone.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def cache_fingerprint(names: Sequence[str], image_paths: Sequence[str], encoder: CNNImageEncoder,
                      transform: Callable, dtype: str) -> str:
    """A digest of everything the cached features depend on (see the module docstring)."""
    h = hashlib.sha256()
    # Where the weights came from (enum name, file) does not matter, only what they are: the digest says
    # that, so a resumed or reloaded model (whose config no longer names a weights source) reuses the cache.
    config = {k: v for k, v in dataclasses.asdict(encoder.config).items() if k not in ("weights", "weights_file")}
    h.update(json.dumps({"version": FORMAT_VERSION, "encoder": config,
                         "weights": _weights_digest(encoder), "transform": repr(transform),
                         "dtype": dtype}, sort_keys=True).encode())
    for name, path in zip(names, image_paths):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{name}\0{stamp}\n".encode())
    return h.hexdigest()


class FeatureCache:
    """Memory-mapped backbone features [N, h*w, C] (+ pooled [N, C]) keyed by image name.

    Build with `FeatureCache.build(...)` (reuses a matching cache), read with `get(names)`.
    """

    def __init__(self, path_dir: str, index: dict):
        self.path_dir = path_dir
        self.index = index
        self.names: list[str] = index["names"]
        self.grid: tuple[int, int] = tuple(index["grid"])
        self.channels: int = index["channels"]
        self.dtype: str = index["dtype"]
        self.fingerprint: str = index["fingerprint"]
        self._rows = {n: i for i, n in enumerate(self.names)}
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    # -- reading --------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path_dir: str | os.PathLike) -> "FeatureCache":
        """Open an existing cache; SeqgenError when it is missing, incomplete or of another format."""
        path_dir = os.fspath(path_dir)
        index_path = os.path.join(path_dir, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise SeqgenError(f"{path_dir}: no feature cache here (no {INDEX_NAME})")
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise SeqgenError(f"{index_path}: unreadable feature cache index ({e}); delete the folder") from None
        if not isinstance(index, dict) or index.get("version") != FORMAT_VERSION:
            raise SeqgenError(f"{index_path}: feature cache format {index.get('version') if isinstance(index, dict) else '?'}"
                              f" is not {FORMAT_VERSION}; delete the folder to rebuild it")
        data_path = os.path.join(path_dir, index["file"])
        size = os.path.getsize(data_path) if os.path.isfile(data_path) else -1
        if size != index["bytes"]:
            raise SeqgenError(f"{data_path}: feature cache is incomplete ({size} bytes, expected "
                              f"{index['bytes']}); delete the folder to rebuild it")
        return cls(path_dir, index)

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        """(memory [N, hw, C], state [N, C]) as read-only memmaps, opened on first use (also after unpickling
        in a DataLoader worker: the maps themselves are never pickled)."""
        if self._arrays is None:
            n, (h, w), c = len(self.names), self.grid, self.channels
            flat = np.memmap(os.path.join(self.path_dir, self.index["file"]), dtype=_DTYPES[self.dtype][1],
                             mode="r", shape=(n * h * w * c + n * c,))
            self._arrays = (flat[:n * h * w * c].reshape(n, h * w, c), flat[n * h * w * c:].reshape(n, c))
        return self._arrays

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._rows

    def rows(self, names: Sequence[str]) -> list[int]:
        """Row numbers of `names`; SeqgenError naming the first one not in the cache."""
        try:
            return [self._rows[n] for n in names]
        except KeyError as e:
            raise SeqgenError(f"{self.path_dir}: image {e.args[0]!r} is not in the feature cache") from None

    def get_rows(self, rows: Sequence[int]) -> EncoderOutput:
        """Features of cache rows: memory [B, h*w, C] float32, state [B, C] float32, mask None."""
        memory, state = self._data()
        idx = np.asarray(rows, dtype=np.int64)
        mem = torch.from_numpy(memory[idx].astype(np.float32, copy=False))
        st = torch.from_numpy(state[idx].astype(np.float32, copy=False))
        return EncoderOutput(state=st, memory=mem, mask=None)

    def get(self, names: Sequence[str]) -> EncoderOutput:
        """Features of images by name: memory [B, h*w, C] float32, state [B, C] float32, mask None."""
        return self.get_rows(self.rows(names))

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, path_dir: str | os.PathLike, names: Sequence[str], image_paths: Sequence[str],
              encoder: CNNImageEncoder, transform: Callable[[Image.Image], Tensor], *, batch_size: int = 64,
              num_workers: int | None = None, device: str | torch.device = "cpu", progress: bool = True,
              dtype: str = "float16") -> "FeatureCache":
        """Compute and store the features of `image_paths` (row i is `names[i]`), or reuse the cache in
        `path_dir` if it was built from the same encoder, weights, transform, dtype and image files.

        The encoder must be frozen (cached features of a training backbone would be stale). It runs in
        eval mode on `device` and is put back on its own device and mode afterwards. Any image that
        cannot be read raises ImageError listing all of them (a cache must cover every image).
        dtype "float16" halves the disk and page-cache footprint (relative error ~5e-4); "float32" stores
        exactly what the encoder computed.
        """
        path_dir = os.fspath(path_dir)
        if dtype not in _DTYPES:
            raise SeqgenError(f"feature cache dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if len(names) != len(image_paths):
            raise SeqgenError(f"feature cache: {len(names)} names but {len(image_paths)} image paths")
        if not names:
            raise SeqgenError("feature cache: no images to encode")
        if len(set(names)) != len(names):
            dup = next(n for i, n in enumerate(names) if n in names[:i])
            raise SeqgenError(f"feature cache: image name {dup!r} appears twice")
        if not encoder.frozen:
            raise SeqgenError("feature caching needs a frozen backbone (freeze=true, no finetune_from)")
        fingerprint = cache_fingerprint(names, image_paths, encoder, transform, dtype)
        try:
            existing = cls.open(path_dir)
            if existing.fingerprint == fingerprint:
                return existing
        except SeqgenError:
            pass
        os.makedirs(path_dir, exist_ok=True)
        index_path = os.path.join(path_dir, INDEX_NAME)
        if os.path.exists(index_path):
            os.remove(index_path)  # from here on the old cache is invalid, whatever happens next

        suffix, np_dtype = _DTYPES[dtype]
        file_name = f"features.{suffix}"
        data_path = os.path.join(path_dir, file_name)
        grids: list[tuple[int, int]] = []
        atomic_write(data_path, lambda f: grids.append(_compute_into(
            f, np_dtype, list(image_paths), encoder, transform, batch_size=batch_size, num_workers=num_workers,
            device=device, progress=progress)), mode="w+b")
        grid = grids[0]
        for other, _ in _DTYPES.values():  # a cache of the other dtype is stale now
            stale = os.path.join(path_dir, f"features.{other}")
            if other != suffix and os.path.exists(stale):
                os.remove(stale)
        n, c = len(names), encoder.memory_size
        index = {"version": FORMAT_VERSION, "file": file_name, "dtype": dtype, "names": list(names),
                 "grid": list(grid), "channels": c,
                 "bytes": (n * grid[0] * grid[1] * c + n * c) * np.dtype(np_dtype).itemsize,
                 "encoder": dataclasses.asdict(encoder.config), "transform": repr(transform),
                 "fingerprint": fingerprint}
        atomic_write(index_path, lambda f: json.dump(index, f), mode="w", encoding="utf-8")
        return cls.open(path_dir)


def _compute_into(file: IO[bytes], np_dtype: type, image_paths: list[str], encoder: CNNImageEncoder,
                  transform: Callable, *, batch_size: int, num_workers: int | None, device: str | torch.device,
                  progress: bool) -> tuple[int, int]:
    """Encode every image into a flat memmap over `file` (new, opened for reading and writing); returns the
    grid (h, w). Unreadable images raise ImageError naming all of them."""
    from tqdm import tqdm

    n, c = len(image_paths), encoder.memory_size
    device = torch.device(device)
    if num_workers is None:
        num_workers = default_num_workers(device)
    first = next(encoder.parameters())
    orig_device, was_training = first.device, encoder.training
    loader = torch.utils.data.DataLoader(
        ImageFolderDataset(image_paths, transform), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=collate_images, pin_memory=device.type == "cuda")
    flat = None
    grid: tuple[int, int] | None = None
    failures: list[tuple[str, str]] = []
    encoder.eval().to(device)
    try:
        with torch.inference_mode(), tqdm(total=n, unit="img", desc="features", disable=not progress) as bar:
            for batch in loader:
                failures.extend((image_paths[i], reason) for i, reason in batch.failed)
                if batch.images is not None:
                    fmap = encoder.features(batch.images.to(device, non_blocking=True)).float()
                    h, w = fmap.shape[-2:]
                    if flat is None:
                        grid = (h, w)
                        flat = np.memmap(file, dtype=np_dtype, mode="w+", shape=(n * h * w * c + n * c,))
                    elif (h, w) != grid:
                        raise SeqgenError(f"feature grid changed from {grid} to {(h, w)}: the transform must "
                                          f"give every image the same size")
                    memory = fmap.flatten(2).transpose(1, 2)        # [B, hw, C]
                    state = memory.mean(dim=1)                       # pooled from float32, then stored
                    idx = np.asarray(batch.indices, dtype=np.int64)
                    mem_view = flat[:n * h * w * c].reshape(n, h * w, c)
                    st_view = flat[n * h * w * c:].reshape(n, c)
                    mem_view[idx] = memory.cpu().numpy().astype(np_dtype)
                    st_view[idx] = state.cpu().numpy().astype(np_dtype)
                bar.update(len(batch.indices) + len(batch.failed))
        if failures:
            shown = "; ".join(f"{p} ({r})" for p, r in failures[:10])
            more = f" and {len(failures) - 10} more" if len(failures) > 10 else ""
            raise ImageError(failures[0][0], failures[0][1], failures,
                             message=f"{len(failures)} image(s) cannot be read: {shown}{more}; "
                                     f"fix or remove them from the split before caching features")
        assert flat is not None and grid is not None
        flat.flush()
        return grid
    finally:
        encoder.to(orig_device).train(was_training)
