"""Images for captioning: safe decoding, streaming folder listing, a crash-proof dataset, caption files.

Hostile inputs are the normal case for a folder of user photos: empty or truncated files, text named
.jpg, CMYK or 16-bit images, palette transparency, animated GIFs, decompression bombs, symlinks pointing
out of the folder. `load_image` turns each into an RGB image or an `ImageError` with a short reason, and
`ImageFolderDataset` turns errors into data, so a DataLoader worker never dies on one bad file.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
import warnings
from typing import Callable, Hashable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from seqgen.data.text import decode_utf8, read_bytes, read_lines
from seqgen.errors import SeqgenError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageError(SeqgenError):
    """An image that cannot be used. `path` is the file, `reason` a short phrase ("truncated", ...).

    `failures` lists every (path, reason) when one error reports several images (feature caching).
    """

    def __init__(self, path: str, reason: str, failures: list[tuple[str, str]] | None = None,
                 message: str | None = None):
        super().__init__(message or f"{path}: cannot read image ({reason})")
        self.path, self.reason = path, reason
        self.failures = failures if failures is not None else [(path, reason)]


# -- decoding --------------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as an 8-bit RGB image (a new object; `image` is not modified).

    Transparency (RGBA, LA, palette with a transparent colour) is composited on white, which is how
    viewers show it; 16/32-bit integer and float images are scaled to 8 bits rather than clipped.
    """
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode == "P":
        # palette images may carry transparency in info["transparency"]: go through RGBA to honour it
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit int / float single-channel image -> RGB, scaling its range to 0..255.

    Pillow's own convert("L") clips such values at 255, which turns most 16-bit photos white.
    """
    arr = np.asarray(image)
    if image.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        hi = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        out = np.clip(arr / hi * 255.0, 0, 255)
    else:
        arr = arr.astype(np.int64)
        # 16-bit data (and mode "I" images decoded from 16-bit files) span 0..65535; small ranges stay as is
        out = arr / 257.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else arr
        out = np.clip(out, 0, 255)
    return Image.fromarray(out.round().astype(np.uint8), mode="L").convert("RGB")


def load_image(path: str | os.PathLike, *, draft_size: int | None = None) -> Image.Image:
    """Decode `path` fully into an RGB PIL image, or raise ImageError with a short reason.

    Reasons: "no such file", "is a directory", "permission denied", "empty file", "not an image",
    "truncated", "decompression bomb" (Pillow's MAX_IMAGE_PIXELS limit stays on), "corrupt".
    The file is closed on return; animated images give their first frame; EXIF rotation is applied.
    draft_size: let JPEG decoding downscale by 2/4/8 in the DCT while both sides stay >= draft_size
    (several times faster for large photos that will be resized to that size anyway).
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except OSError as e:
        raise ImageError(path, f"cannot stat ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(path, "is a directory")
    if st.st_size == 0:
        raise ImageError(path, "empty file")
    try:
        f = open(path, "rb")
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except OSError as e:
        raise ImageError(path, f"cannot open ({e.strerror or e})") from None
    with f:
        return _decode(f, path, draft_size, Image.MAX_IMAGE_PIXELS)


def decode_image_bytes(data: bytes, name: str, *, max_pixels: int | None = None,
                       draft_size: int | None = None) -> Image.Image:
    """`load_image` for bytes received from elsewhere (an upload): the same reasons, under `name`.

    max_pixels: refuse images with more pixels (default: Pillow's MAX_IMAGE_PIXELS) as "decompression bomb".
    """
    if not data:
        raise ImageError(name, "empty file")
    return _decode(io.BytesIO(data), name, draft_size,
                   Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)


def _decode(f, path: str, draft_size: int | None, limit: int | None) -> Image.Image:
    """Decode the open binary file `f` (named `path` in errors) into an RGB PIL image; see `load_image`."""
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                if limit is not None and im.width * im.height > limit:
                    raise ImageError(path, "decompression bomb")
                if draft_size is not None and im.format == "JPEG":
                    im.draft("RGB", (draft_size, draft_size))
                im.load()  # full decode here, so truncation is found now and not in a later resize
                out = to_rgb(im)  # a copy: `im` is unusable once closed
        try:
            out = ImageOps.exif_transpose(out) or out
        except Exception:  # noqa: BLE001 — malformed EXIF must not lose an otherwise good image
            pass
        return out
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(path, "decompression bomb") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except MemoryError:
        raise ImageError(path, "too large to decode") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        # Pillow reports damaged data through many exception types; the message tells truncation apart.
        msg = str(e).lower()
        if "truncated" in msg or isinstance(e, EOFError) or "premature end" in msg:
            raise ImageError(path, "truncated") from None
        raise ImageError(path, "corrupt") from None


# -- listing folders -------------------------------------------------------------------------------

def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def iter_image_paths(root: str | os.PathLike, *, recursive: bool = False, follow_symlinks: bool = False,
                     on_skip: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """Yield the image files under `root` (by extension, case-insensitive) in a stable order.

    Streams with os.scandir, sorting one directory at a time, so memory stays bounded by the largest
    directory, not the tree. A file passed as `root` is yielded as is (whatever its extension: it was
    asked for). Symlinks that resolve outside `root` are skipped unless `follow_symlinks`; symlinked
    directory cycles are never entered twice. `on_skip(path, reason)` hears about every skipped entry
    other than files with non-image extensions.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise SeqgenError(f"{root}: no such file or folder")
    if not os.path.isdir(root):
        yield root
        return
    real_root = os.path.realpath(root)
    skip = on_skip or (lambda p, r: None)
    seen_dirs: set[tuple[int, int]] = set()
    st = os.stat(root)
    seen_dirs.add((st.st_dev, st.st_ino))
    # A depth-first walk over one sorted name list per open directory (reversed, so pop() gives the
    # next name): the output is in sorted order within each directory, subfolders where they sort.
    stack: list[tuple[str, list[str]]] = [(root, _sorted_names(root, skip))]
    while stack:
        directory, names = stack[-1]
        if not names:
            stack.pop()
            continue
        name = names.pop()
        path = os.path.join(directory, name)
        try:
            is_link = os.path.islink(path)
            if is_link and not follow_symlinks and not _is_within(os.path.realpath(path), real_root):
                skip(path, "symlink outside the folder")
                continue
            if os.path.isdir(path):
                if not recursive:
                    continue
                st = os.stat(path)
                key = (st.st_dev, st.st_ino)
                if key in seen_dirs:
                    skip(path, "directory already visited (symlink loop)")
                    continue
                seen_dirs.add(key)
                stack.append((path, _sorted_names(path, skip)))
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                if is_link and not os.path.exists(path):
                    skip(path, "broken symlink")
                    continue
                yield path
        except OSError as e:
            skip(path, f"cannot access ({e.strerror or e})")


def _sorted_names(directory: str, skip: Callable[[str, str], None]) -> list[str]:
    """A directory's entry names sorted descending (they are popped from the end)."""
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it]
    except OSError as e:
        skip(directory, f"cannot list ({e.strerror or e})")
        return []
    names.sort(reverse=True)
    return names


# -- dataset ---------------------------------------------------------------------------------------

def default_num_workers(device: torch.device | str = "cpu") -> int:
    """DataLoader workers for decoding images when the user did not choose (`--num-workers`).

    Decoding a 224px JPEG into uint8 costs a small fraction of the CNN's time per image (large JPEGs are
    decoded at a reduced scale, see `load_image`): on 2 cores a worker process only takes CPU from the CNN and
    the beam search (docs/performance.md, "Folder captioning"), so up to 2 cores decode in the main process,
    up to 4 in one worker. A GPU takes images far faster than the CPU can decode them: then half the cores,
    up to 8.
    """
    cores = os.cpu_count() or 1
    if torch.device(device).type == "cuda":
        return max(1, min(8, cores // 2))
    return 0 if cores <= 2 else 1 if cores <= 4 else 2


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images by key for inference/feature extraction; errors are returned, never raised.

    __getitem__(key) -> (key, uint8 tensor [3, S, S] or None, reason or None). Use `collate_images`.
    paths: the image of each integer key (a sequence), or a function from a key to its image path, for keys
    that are not positions: a streaming batch sampler's (root, path) pairs, say (`operator.itemgetter(1)`;
    such a dataset has no length of its own).
    draft_size: passed to `load_image` (e.g. the transform's image_size) to decode large JPEGs faster.
    """

    def __init__(self, paths: Sequence[str] | Callable[[Hashable], str], transform: Callable[[Image.Image], Tensor],
                 *, draft_size: int | None = None):
        self.paths = paths
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return 0 if callable(self.paths) else len(self.paths)

    def __getitem__(self, key: Hashable) -> tuple[Hashable, Tensor | None, str | None]:
        try:
            path = self.paths(key) if callable(self.paths) else self.paths[key]
            return key, self.transform(load_image(path, draft_size=self.draft_size)), None
        except ImageError as e:
            return key, None, e.reason
        except Exception as e:  # noqa: BLE001 — one odd image (or transform bug) must not kill the worker
            return key, None, f"cannot process ({type(e).__name__}: {e})"


def loader_generator(seed: int = 0) -> torch.Generator:
    """The generator a DataLoader draws its worker base seed from, instead of torch's global RNG: creating a
    loader (every epoch, every evaluation, after --resume) then never shifts the dropout masks of training."""
    return torch.Generator().manual_seed(seed)


class ImageBatch(NamedTuple):
    """A collated batch: `images` [G, 3, S, S] (None when all failed) for the dataset `indices` [G],
    and `failed`: (index, reason) for each image that could not be used."""

    indices: list[int]
    images: Tensor | None
    failed: list[tuple[int, str]]


def collate_images(batch: list[tuple[int, Tensor | None, str | None]]) -> ImageBatch:
    """Stack the good images of a batch from ImageFolderDataset and list the bad ones."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, r or "unknown error") for i, x, r in batch if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return ImageBatch([i for i, _ in good], images, failed)


# -- caption and split files -----------------------------------------------------------------------

_FLICKR_TOKEN_LINE = re.compile(r"^([^\t#]+)#\d+\t(.*)$")


def read_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """Image name -> its captions, in file order. The format is detected from the content:

    - TSV: "image<TAB>caption" per line, several lines per image, optional header "image<TAB>caption";
    - Flickr8k token file: "name.jpg#0<TAB>caption";
    - Karpathy split JSON (dataset_*.json): images[].filename, images[].sentences[].raw;
    - COCO captions JSON: images[].{id, file_name}, annotations[].{image_id, caption}.
    A malformed line or entry raises SeqgenError naming path:line (or the JSON entry).
    """
    path = os.fspath(path)
    text = decode_utf8(read_bytes(path), path).replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise SeqgenError(f"{path}: file is empty")
    if text.lstrip().startswith("{"):
        captions = _read_caption_json(path, text)
    else:
        captions = _read_caption_lines(path, text)
    if not captions:
        raise SeqgenError(f"{path}: no captions found")
    return captions


def _read_caption_lines(path: str, text: str) -> dict[str, list[str]]:
    lines = text.split("\n")
    first = next((ln for ln in lines if ln.strip()), "")
    flickr = bool(_FLICKR_TOKEN_LINE.match(first))
    captions: dict[str, list[str]] = {}
    seen_content = False
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not seen_content:
            seen_content = True
            if not flickr and line.strip().lower().replace(" ", "") in ("image\tcaption", "image\tcaptions"):
                continue
        if flickr:
            m = _FLICKR_TOKEN_LINE.match(line)
            if not m:
                raise SeqgenError(f"{path}:{lineno}: expected 'name.jpg#N<TAB>caption' like the lines before")
            name, caption = m.group(1).strip(), m.group(2).strip()
        else:
            if "\t" not in line:
                raise SeqgenError(f"{path}:{lineno}: expected 'image<TAB>caption', found no tab")
            name, caption = (part.strip() for part in line.split("\t", 1))
            caption = " ".join(caption.split())  # a stray tab or double space inside a caption
        if not name:
            raise SeqgenError(f"{path}:{lineno}: empty image name")
        if not caption:
            raise SeqgenError(f"{path}:{lineno}: empty caption for {name}")
        captions.setdefault(name, []).append(caption)
    return captions


def _read_caption_json(path: str, text: str) -> dict[str, list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SeqgenError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SeqgenError(f"{path}: expected a JSON object with an 'images' list (Karpathy or COCO captions)")
    captions: dict[str, list[str]] = {}
    if isinstance(data.get("annotations"), list):  # COCO
        names: dict[object, str] = {}
        for k, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
                raise SeqgenError(f"{path}: images[{k}] needs 'id' and 'file_name'")
            names[im["id"]] = im["file_name"]
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
                raise SeqgenError(f"{path}: annotations[{k}] needs 'image_id' and a 'caption' string")
            if ann["image_id"] not in names:
                raise SeqgenError(f"{path}: annotations[{k}] refers to unknown image_id {ann['image_id']!r}")
            caption = " ".join(ann["caption"].split())
            if caption:
                captions.setdefault(names[ann["image_id"]], []).append(caption)
        return captions
    for k, im in enumerate(data["images"]):  # Karpathy
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            raise SeqgenError(f"{path}: images[{k}] has no 'filename'")
        sentences = im.get("sentences")
        if not isinstance(sentences, list):
            raise SeqgenError(f"{path}: images[{k}] ({im['filename']}) has no 'sentences' list")
        # Karpathy's COCO file keeps train2014/ and val2014/ images apart in "filepath"
        folder = im.get("filepath")
        name = f"{folder}/{im['filename']}" if isinstance(folder, str) and folder else im["filename"]
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str):
                tokens = s.get("tokens") if isinstance(s, dict) else None
                if not isinstance(tokens, list):
                    raise SeqgenError(f"{path}: images[{k}].sentences[{j}] has neither 'raw' nor 'tokens'")
                raw = " ".join(map(str, tokens))
            caption = " ".join(raw.split())
            if caption:
                captions.setdefault(name, []).append(caption)
    return captions


def read_split(path: str | os.PathLike) -> list[str]:
    """Image names listed one per line (surrounding whitespace and blank lines ignored)."""
    return [ln.strip() for ln in read_lines(path) if ln.strip()]
