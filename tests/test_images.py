"""Image loading against hostile files, folder listing, the crash-proof dataset, caption/split files."""
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from seqgen.data.images import (IMAGE_EXTENSIONS, ImageError, ImageFolderDataset, collate_images, iter_image_paths,
                                load_image, read_captions, read_split)
from seqgen.encoders.cnn import ImageTransform
from seqgen.errors import SeqgenError


def jpeg_bytes(size=(32, 24), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def noisy_jpeg_bytes(size=(64, 64)) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(width=100_000, height=100_000) -> bytes:
    """A valid-looking PNG whose header claims width x height pixels (10 gigapixels by default)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def make_hostile_folder(d) -> dict[str, str | None]:
    """Files in `d` -> expected ImageError reason (None = must load)."""
    expect: dict[str, str | None] = {}
    write(d / "good.jpg", jpeg_bytes())
    expect["good.jpg"] = None
    Image.new("RGB", (20, 10), (0, 128, 255)).save(d / "good.png")
    expect["good.png"] = None
    write(d / "truncated.jpg", noisy_jpeg_bytes()[:1500])
    expect["truncated.jpg"] = "truncated"
    write(d / "empty.jpg", b"")
    expect["empty.jpg"] = "empty file"
    write(d / "text.jpg", b"this is not an image, just some text\n" * 3)
    expect["text.jpg"] = "not an image"
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))          # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))                    # one opaque blue pixel
    rgba.save(d / "alpha.png")
    expect["alpha.png"] = None
    Image.new("L", (9, 9), 77).save(d / "gray.png")
    expect["gray.png"] = None
    Image.new("RGB", (1, 1), (1, 2, 3)).save(d / "one.png")
    expect["one.png"] = None
    write(d / "cmyk.jpg", jpeg_bytes(mode="CMYK", color=(0, 255, 255, 0)))
    expect["cmyk.jpg"] = None
    Image.fromarray(np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)).save(d / "deep16.png")
    expect["deep16.png"] = None
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)           # index 0 black, 1 red
    pal.putpixel((0, 0), 0)
    pal.save(d / "palette.png", transparency=0)                # index 0 is transparent
    expect["palette.png"] = None
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    expect["anim.gif"] = None
    write(d / "bomb.png", huge_png_header())
    expect["bomb.png"] = "decompression bomb"
    return expect


@pytest.fixture
def hostile(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    return d, make_hostile_folder(d)


def test_each_hostile_file_loads_as_rgb_or_gives_its_reason(hostile):
    d, expect = hostile
    for name, reason in expect.items():
        if reason is None:
            img = load_image(d / name)
            assert img.mode == "RGB", name
        else:
            with pytest.raises(ImageError) as e:
                load_image(d / name)
            assert e.value.reason == reason, name
            assert e.value.path == str(d / name)
            assert isinstance(e.value, SeqgenError)


def test_conversions_are_faithful(hostile):
    d, _ = hostile
    alpha = load_image(d / "alpha.png")
    assert alpha.getpixel((0, 0)) == (0, 0, 255) and alpha.getpixel((5, 5)) == (255, 255, 255)  # on white
    assert load_image(d / "gray.png").getpixel((3, 3)) == (77, 77, 77)
    assert load_image(d / "one.png").size == (1, 1)
    deep = load_image(d / "deep16.png")                        # scaled to 8 bits, not clipped at 255
    assert [deep.getpixel(p)[0] for p in [(0, 0), (1, 0), (0, 1)]] == [0, 128, 255]
    pal = load_image(d / "palette.png")
    assert pal.getpixel((0, 0)) == (255, 255, 255) and pal.getpixel((1, 1)) == (255, 0, 0)
    assert load_image(d / "anim.gif").getpixel((2, 2)) == (255, 0, 0)  # first frame
    r, g, b = load_image(d / "cmyk.jpg").getpixel((1, 1))      # C=0 M=255 Y=255 K=0 is red
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6                                            # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rotated.jpg").size == (10, 20)


def test_decompression_bomb_limit_stays_on(tmp_path, monkeypatch):
    Image.new("RGB", (12, 12)).save(tmp_path / "warn.png")     # 144 px: between 1x and 2x the limit
    Image.new("RGB", (20, 20)).save(tmp_path / "error.png")    # 400 px: above 2x
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for name in ["warn.png", "error.png"]:
        with pytest.raises(ImageError) as e:
            load_image(tmp_path / name)
        assert e.value.reason == "decompression bomb"


def test_draft_decoding_of_large_jpegs(tmp_path):
    write(tmp_path / "big.jpg", jpeg_bytes(size=(800, 600)))
    write(tmp_path / "bigcmyk.jpg", jpeg_bytes(size=(800, 600), mode="CMYK", color=(0, 255, 255, 0)))
    assert load_image(tmp_path / "big.jpg").size == (800, 600)
    small = load_image(tmp_path / "big.jpg", draft_size=100)
    assert small.mode == "RGB" and small.size == (200, 150)       # 1/4 scale keeps both sides >= 100
    cmyk = load_image(tmp_path / "bigcmyk.jpg", draft_size=100)
    assert cmyk.mode == "RGB" and min(cmyk.size) >= 100 and cmyk.getpixel((5, 5))[0] > 200


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "nope.jpg")
    assert e.value.reason == "no such file"
    with pytest.raises(ImageError) as e:
        load_image(tmp_path)
    assert e.value.reason == "is a directory"


def test_no_file_handle_left_open(hostile):
    d, expect = hostile
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("needs /proc")
    before = len(os.listdir(fd_dir))
    for _ in range(3):
        for name in expect:
            try:
                load_image(d / name)
            except ImageError:
                pass
    assert len(os.listdir(fd_dir)) == before


def test_dataloader_workers_survive_bad_images(hostile):
    d, expect = hostile
    paths = list(iter_image_paths(d))
    assert sorted(os.path.basename(p) for p in paths) == sorted(expect)
    loader = torch.utils.data.DataLoader(ImageFolderDataset(paths, ImageTransform(16)), batch_size=4,
                                         num_workers=2, collate_fn=collate_images)
    good, bad = [], {}
    for batch in loader:
        if batch.images is not None:
            assert batch.images.shape == (len(batch.indices), 3, 16, 16)
            assert batch.images.dtype == torch.uint8
        good += batch.indices
        bad.update(batch.failed)
    assert sorted(good + list(bad)) == list(range(len(paths)))
    names = {os.path.basename(paths[i]): r for i, r in bad.items()}
    assert names == {n: r for n, r in expect.items() if r is not None}


def test_collate_all_bad():
    batch = collate_images([(0, None, "truncated"), (1, None, "empty file")])
    assert batch.images is None and batch.indices == [] and batch.failed == [(0, "truncated"), (1, "empty file")]


def test_listing_order_recursion_and_extensions(tmp_path):
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    for rel in ["b.jpg", "a.PNG", "c.txt", "sub/z.webp", "sub/deeper/y.tiff", "m.gif"]:
        write(root / rel, b"x")
    flat = [os.path.relpath(p, root) for p in iter_image_paths(root)]
    assert flat == ["a.PNG", "b.jpg", "m.gif"]
    deep = [os.path.relpath(p, root) for p in iter_image_paths(root, recursive=True)]
    assert deep == ["a.PNG", "b.jpg", "m.gif", "sub/deeper/y.tiff", "sub/z.webp"]
    assert deep == [os.path.relpath(p, root) for p in iter_image_paths(root, recursive=True)]  # stable
    single = write(tmp_path / "notes.txt", b"x")
    assert list(iter_image_paths(single)) == [single]          # a file given directly passes through
    with pytest.raises(SeqgenError):
        list(iter_image_paths(tmp_path / "missing"))
    assert ".jpg" in IMAGE_EXTENSIONS


def test_symlinks_outside_root_are_skipped(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    write(root / "in.jpg", b"x")
    write(outside / "secret.jpg", b"x")
    os.symlink(outside / "secret.jpg", root / "link_out.jpg")
    os.symlink(root / "in.jpg", root / "link_in.jpg")
    os.symlink(outside, root / "dir_out")
    os.symlink(root, root / "loop")                            # a cycle back to the root
    skipped = []
    got = [os.path.basename(p) for p in iter_image_paths(root, recursive=True,
                                                          on_skip=lambda p, r: skipped.append(r))]
    assert got == ["in.jpg", "link_in.jpg"]
    assert skipped.count("symlink outside the folder") == 2
    followed = [os.path.relpath(p, root) for p in iter_image_paths(root, recursive=True, follow_symlinks=True)]
    assert followed == ["dir_out/secret.jpg", "in.jpg", "link_in.jpg", "link_out.jpg"]


def test_read_captions_tsv(tmp_path):
    p = write(tmp_path / "c.tsv", b"image\tcaption\na.jpg\tA dog runs .\na.jpg\tA dog  running\r\n\nb.jpg\tA cat\n")
    assert read_captions(p) == {"a.jpg": ["A dog runs .", "A dog running"], "b.jpg": ["A cat"]}
    p2 = write(tmp_path / "c2.tsv", b"a.jpg\tA dog\n")
    assert read_captions(p2) == {"a.jpg": ["A dog"]}
    bad = write(tmp_path / "bad.tsv", b"a.jpg\tA dog\nno tab here\n")
    with pytest.raises(SeqgenError, match=r"bad\.tsv:2:"):
        read_captions(bad)
    empty_cap = write(tmp_path / "e.tsv", b"a.jpg\tA dog\nb.jpg\t  \n")
    with pytest.raises(SeqgenError, match=r"e\.tsv:2: empty caption"):
        read_captions(empty_cap)


def test_read_captions_flickr_token(tmp_path):
    p = write(tmp_path / "Flickr8k.token.txt",
              b"1000268201_693b08cb0e.jpg#0\tA child in a pink dress .\n1000268201_693b08cb0e.jpg#1\tA girl .\n"
              b"1001773457_577c3a7d70.jpg#0\tTwo dogs .\n")
    assert read_captions(p) == {"1000268201_693b08cb0e.jpg": ["A child in a pink dress .", "A girl ."],
                                "1001773457_577c3a7d70.jpg": ["Two dogs ."]}
    bad = write(tmp_path / "bad.token.txt", b"x.jpg#0\tok\nx.jpg\tno index\n")
    with pytest.raises(SeqgenError, match=r"bad\.token\.txt:2:"):
        read_captions(bad)


def test_read_captions_json(tmp_path):
    karpathy = {"dataset": "flickr8k", "images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog .", "tokens": ["a", "dog"]},
                                                              {"tokens": ["a", "puppy"]}]},
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "A cat ."}]}]}
    p = write(tmp_path / "dataset_flickr8k.json", json.dumps(karpathy).encode())
    assert read_captions(p) == {"a.jpg": ["A dog .", "a puppy"], "b.jpg": ["A cat ."]}
    coco = {"images": [{"id": 7, "file_name": "x.jpg"}],
            "annotations": [{"image_id": 7, "caption": "A bus."}, {"image_id": 7, "caption": "A red bus."}]}
    p = write(tmp_path / "captions.json", json.dumps(coco).encode())
    assert read_captions(p) == {"x.jpg": ["A bus.", "A red bus."]}
    bad = write(tmp_path / "bad.json", b'{"images": [\n{"filename": "a.jpg",}]}')
    with pytest.raises(SeqgenError, match=r"bad\.json:2:"):
        read_captions(bad)
    with pytest.raises(SeqgenError, match=r"images\[0\]"):
        read_captions(write(tmp_path / "nofile.json", b'{"images": [{"sentences": []}]}'))


def test_read_split(tmp_path):
    p = write(tmp_path / "train.txt", b"a.jpg\n\n  b.jpg  \r\nc.jpg")
    assert read_split(p) == ["a.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(SeqgenError):
        read_split(write(tmp_path / "empty.txt", b""))
