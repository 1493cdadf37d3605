"""FeatureCache: cached == live features, reuse only when nothing changed, atomic and complete."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from seqgen.data.features import FeatureCache
from seqgen.data.images import ImageError, load_image
from seqgen.encoders.cnn import CNNEncoderConfig, CNNImageEncoder, build_transform
from seqgen.errors import SeqgenError

N = 7


def make_images(d, n=N):
    rng = np.random.default_rng(0)
    d.mkdir(exist_ok=True)
    names, paths = [], []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / name)
        names.append(name)
        paths.append(str(d / name))
    return names, paths


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return CNNImageEncoder(CNNEncoderConfig(backbone="tiny", image_size=32, **kw))


def live(encoder, transform, paths):
    with torch.no_grad():
        return encoder.eval()(torch.stack([transform(load_image(p)) for p in paths]))


def build(cache_dir, names, paths, enc, **kw):
    kw.setdefault("num_workers", 0)
    return FeatureCache.build(cache_dir, names, paths, enc, build_transform(enc.config), batch_size=3,
                              progress=False, **kw)


def test_cached_equals_live_float32_and_float16(tmp_path):
    names, paths = make_images(tmp_path / "imgs")
    enc = tiny()
    want = live(enc, build_transform(enc.config), paths)
    order = [4, 0, 6]
    c32 = build(tmp_path / "c32", names, paths, enc, dtype="float32")
    got = c32.get([names[i] for i in order])
    assert got.memory.dtype == torch.float32 and got.mask is None
    assert got.memory.shape == (3, 4 * 4, 128) and got.state.shape == (3, 128)
    assert torch.allclose(got.memory, want.memory[order], atol=1e-5)
    assert torch.allclose(got.state, want.state[order], atol=1e-5)

    c16 = build(tmp_path / "c16", names, paths, enc, num_workers=2)      # default dtype float16
    assert c16.dtype == "float16" and len(c16) == N and os.path.exists(tmp_path / "c16" / "features.f16")
    got = c16.get(names)
    scale = want.memory.abs().max()
    assert torch.allclose(got.memory, want.memory, atol=1e-3 * scale, rtol=1e-3)
    assert torch.allclose(got.state, want.state, atol=1e-3 * scale, rtol=1e-3)


def test_reuse_and_rebuild_on_change(tmp_path, monkeypatch):
    names, paths = make_images(tmp_path / "imgs")
    enc = tiny(seed=0)
    enc.train()
    first = build(tmp_path / "c", names, paths, enc, dtype="float32")
    assert enc.training  # mode restored
    data = tmp_path / "c" / "features.f32"
    stamp = os.stat(data).st_mtime_ns

    # same everything: reused without running the CNN
    monkeypatch.setattr(enc, "features", lambda x: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = build(tmp_path / "c", names, paths, enc, dtype="float32")
    assert again.fingerprint == first.fingerprint and os.stat(data).st_mtime_ns == stamp
    monkeypatch.undo()

    # other weights (same config) -> rebuilt with the new encoder's features
    other = tiny(seed=1)
    rebuilt = build(tmp_path / "c", names, paths, other, dtype="float32")
    assert rebuilt.fingerprint != first.fingerprint
    assert torch.allclose(rebuilt.get(names).state, live(other, build_transform(other.config), paths).state,
                          atol=1e-5)
    # another backbone config -> rebuilt
    torch.manual_seed(1)
    bigger = CNNImageEncoder(CNNEncoderConfig(backbone="tiny", image_size=64))
    assert build(tmp_path / "c", names, paths, bigger, dtype="float32").grid == (8, 8)
    # a changed image file -> rebuilt
    Image.new("RGB", (40, 48), (9, 9, 9)).save(paths[2])
    os.utime(paths[2], ns=(1, 1))
    assert build(tmp_path / "c", names, paths, bigger, dtype="float32").fingerprint != rebuilt.fingerprint
    # another dtype -> rebuilt, the stale file is removed
    build(tmp_path / "c", names, paths, bigger, dtype="float16")
    assert sorted(os.listdir(tmp_path / "c")) == ["features.f16", "index.json"]


def test_bad_images_are_listed_and_nothing_is_left(tmp_path):
    names, paths = make_images(tmp_path / "imgs")
    open(paths[1], "wb").close()
    with open(paths[5], "wb") as f:
        f.write(b"text")
    with pytest.raises(ImageError) as e:
        build(tmp_path / "c", names, paths, tiny())
    assert [os.path.basename(p) for p, _ in e.value.failures] == ["img1.png", "img5.png"]
    assert "2 image(s)" in str(e.value) and "empty file" in str(e.value)
    assert os.listdir(tmp_path / "c") == []
    with pytest.raises(SeqgenError, match="no feature cache"):
        FeatureCache.open(tmp_path / "c")


def test_incomplete_cache_is_refused_and_rebuilt(tmp_path):
    names, paths = make_images(tmp_path / "imgs")
    enc = tiny()
    cache = build(tmp_path / "c", names, paths, enc)
    data = tmp_path / "c" / "features.f16"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(SeqgenError, match="incomplete"):
        FeatureCache.open(tmp_path / "c")
    again = build(tmp_path / "c", names, paths, enc)
    assert again.fingerprint == cache.fingerprint and len(FeatureCache.open(tmp_path / "c")) == N


def test_errors_and_pickling(tmp_path):
    names, paths = make_images(tmp_path / "imgs", n=3)
    with pytest.raises(SeqgenError, match="frozen"):
        build(tmp_path / "c", names, paths, tiny(freeze=False))
    with pytest.raises(SeqgenError, match="2 image paths"):
        build(tmp_path / "c", names, paths[:2], tiny())
    with pytest.raises(SeqgenError, match="twice"):
        build(tmp_path / "c", [names[0]] * 3, paths, tiny())
    cache = build(tmp_path / "c", names, paths, tiny())
    with pytest.raises(SeqgenError, match="nope.png"):
        cache.get(["nope.png"])
    cache.get(names)                                   # maps opened
    clone = pickle.loads(pickle.dumps(cache))          # what a DataLoader worker receives: no array inside
    assert len(pickle.dumps(cache)) < 10_000
    assert torch.equal(clone.get(names[::-1]).memory, cache.get(names[::-1]).memory)
