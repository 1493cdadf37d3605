"""Captioning end to end on a synthetic task (coloured shapes at positions), cached vs live features,
batched beam search, and captioning folders of hostile images with resume."""
import csv
import json
import os
import random
import shutil

import pytest
import torch
from PIL import Image, ImageDraw

from seqgen.data.batch import Batch
from seqgen.data.batching import pad_sequences
from seqgen.data.captions import CaptionDataConfig, CaptionExamples, load_splits
from seqgen.data.features import FeatureCache
from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.cnn import CNNEncoderConfig, CNNImageEncoder, build_transform
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.inference.captioning import caption_images, caption_images_full, caption_tensor
from seqgen.model import ModelConfig, Seq2Seq, load_model
from seqgen.tasks import caption_folder as folder_module
from seqgen.tasks.caption_folder import caption_folder, read_done
from seqgen.tasks.captioning import CaptionRunConfig, train_captioning
from seqgen.tokenizers import TextCodec
from seqgen.train import TrainConfig

from test_images import make_hostile_folder

# -- the synthetic task ------------------------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (40, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SIZE = 32


def draw_shape(d: ImageDraw.ImageDraw, shape: str, color, cx: int, cy: int, r: int) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def shapes_image(rng: random.Random) -> tuple[Image.Image, str]:
    """Two shapes side by side or stacked: "a red circle left of a blue square" / "... above ..."."""
    (c1, c2), (s1, s2) = (rng.choice(list(COLORS)) for _ in range(2)), (rng.choice(SHAPES) for _ in range(2))
    rel = rng.choice(["left of", "above"])
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    r, near, far, mid = rng.randint(5, 6), SIZE // 4, 3 * SIZE // 4, SIZE // 2

    def j() -> int:
        return rng.randint(-2, 2)

    if rel == "left of":
        p1, p2 = (near + j(), mid + j()), (far + j(), mid + j())
    else:
        p1, p2 = (mid + j(), near + j()), (mid + j(), far + j())
    draw_shape(d, s1, COLORS[c1], *p1, r)
    draw_shape(d, s2, COLORS[c2], *p2, r)
    return img, f"a {c1} {s1} {rel} a {c2} {s2}"


def write_shapes_dataset(folder, sizes=(("train", 500), ("valid", 40), ("test", 200)), seed=0) -> dict:
    """images/, captions.tsv (with header) and one split file per split; returns {split: [(name, caption)]}."""
    folder = str(folder)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = random.Random(seed)
    rows, splits = [], {}
    for split, n in sizes:
        items = []
        for i in range(n):
            img, cap = shapes_image(rng)
            name = f"{split}{i:04d}.png"
            img.save(os.path.join(folder, "images", name))
            rows.append(f"{name}\t{cap}")
            items.append((name, cap))
        splits[split] = items
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            f.write("".join(name + "\n" for name, _ in items))
    with open(os.path.join(folder, "captions.tsv"), "w") as f:
        f.write("image\tcaption\n" + "\n".join(rows) + "\n")
    return splits


def shapes_run(folder, *, steps=250, freeze=False, **data_kw) -> CaptionRunConfig:
    folder = str(folder)
    data = dict(images=f"{folder}/images", captions=f"{folder}/captions.tsv", train_split=f"{folder}/train.txt",
                valid_split=f"{folder}/valid.txt", min_freq=1, batch_size=32, num_workers=0)
    data.update(data_kw)
    return CaptionRunConfig(
        data=CaptionDataConfig(**data),
        encoder=CNNEncoderConfig(backbone="tiny", weights=None, freeze=freeze, image_size=SIZE),
        decoder=DecoderConfig(cell="gru", emb=32, hidden=96, attention="bahdanau", dropout=0.0),
        train=TrainConfig(lr=1e-2, warmup_steps=20, max_steps=steps, eval_every=steps, checkpoint_every=steps,
                          log_every=50, label_smoothing=0.0, seed=1, device="cpu", progress=False),
        eval=GenerationConfig(beam=1, max_len=12))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    return d, write_shapes_dataset(d)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A tiny CNN (trained from scratch) + attention decoder on the shapes task; ~10 s on one thread."""
    d, splits = shapes
    out = tmp_path_factory.mktemp("run")
    state = train_captioning(shapes_run(d), str(out), log=lambda m: None)
    return load_model(str(out / "best.pt"), task="captioning"), d, splits, out, state


def test_tiny_cnn_learns_the_shapes_task(trained):
    model, d, splits, out, state = trained
    assert state.best is not None and state.best > 9.0          # validation CIDEr-D (perfect = 10)
    test = splits["test"]
    hyps = caption_images(model, [str(d / "images" / n) for n, _ in test], GenerationConfig(beam=1, max_len=12))
    exact = sum(h == c for h, (_, c) in zip(hyps, test)) / len(test)
    assert exact >= 0.95, list(zip(hyps, test))[:10]
    # the metrics log has validation CIDEr-D and BLEU-4, and the checkpoint knows its task
    evals = [json.loads(ln)["eval"] for ln in open(out / "metrics.jsonl") if '"eval"' in ln]
    assert {"cider", "bleu4", "bleu1"} <= set(evals[-1])


def test_batched_beam_equals_one_at_a_time(trained):
    model, d, splits, *_ = trained
    paths = [str(d / "images" / n) for n, _ in splits["test"][:10]]
    gen = GenerationConfig(beam=4, max_len=12, amp="off")   # float32: bf16 rounding depends on the batch
    batched = caption_images_full(model, paths, gen, batch_size=10)
    alone = [caption_images_full(model, [p], gen, batch_size=1)[0] for p in paths]
    for b, a in zip(batched, alone):
        assert b.text == a.text
        assert abs(b.score - a.score) < 1e-5
    # Seq2Seq.caption is the same thing, and takes PIL images too (any mode)
    pil = Image.open(paths[0]).convert("RGBA")
    assert model.caption([paths[0], pil], beam=4, max_len=12, amp="off") == [batched[0].text] * 2


def test_caption_attention_covers_each_word(trained):
    model, d, splits, *_ = trained
    c = caption_images_full(model, [str(d / "images" / splits["test"][0][0])], GenerationConfig(beam=3, max_len=12))[0]
    assert c.grid == (4, 4) and c.words[-1] == "<eos>"
    assert c.attention.shape == (len(c.words), 16)
    assert torch.allclose(c.attention.sum(-1), torch.ones(len(c.words)), atol=1e-5)


def test_caption_refuses_other_models_and_bad_paths(trained, tmp_path):
    model, *_ = trained
    lm = Seq2Seq(ModelConfig(task="lm", decoder=DecoderConfig(emb=8, hidden=8)), tgt=model.tgt)
    with pytest.raises(SeqgenError, match="captioning needs a model"):
        caption_images(lm, ["x.png"])
    with pytest.raises(SeqgenError, match="no such file"):
        caption_images(model, [str(tmp_path / "missing.png")])


# -- cached features -----------------------------------------------------------------------------------

def test_cached_features_equal_live_features(shapes, tmp_path):
    d, splits = shapes
    torch.manual_seed(0)
    codec = TextCodec.build("word", [c for _, c in splits["train"]])
    model = Seq2Seq(ModelConfig(task="captioning", decoder=DecoderConfig(cell="gru", emb=16, hidden=32,
                                                                        attention="bahdanau", dropout=0.0),
                                image_encoder=CNNEncoderConfig(backbone="tiny", image_size=SIZE, freeze=True)),
                    tgt=codec).eval()
    items = splits["valid"][:6]
    names = [n for n, _ in items]
    paths = [str(d / "images" / n) for n in names]
    transform = build_transform(model.config.image_encoder)
    cache = FeatureCache.build(tmp_path / "cache", names, paths, model.encoder, transform, batch_size=4,
                               num_workers=0, progress=False, dtype="float32")
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    cached = cache.get(names)
    target, _ = pad_sequences([[codec.vocab.bos, *codec.encode(c), codec.vocab.eos] for _, c in items],
                              codec.vocab.pad)
    with torch.no_grad():
        live_logits = model(Batch(target=target, source=images))
        cached_logits = model(Batch(target=target, source=cached))
    assert torch.allclose(live_logits, cached_logits, atol=1e-5)
    gen = GenerationConfig(beam=3, max_len=8, amp="off")   # the cache holds float32 CNN features
    live = caption_tensor(model, images, gen)
    from_cache = caption_tensor(model, cached, gen)
    assert [c.text for c in live] == [c.text for c in from_cache]
    assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(live, from_cache))


def test_frozen_backbone_trains_from_the_cache_and_resumes_exactly(shapes, tmp_path, monkeypatch):
    d, _ = shapes

    def no_cnn(*a, **k):
        raise AssertionError("the CNN ran during training: features should come from the cache")

    def run(out, steps, resume=False):
        cfg = shapes_run(d, steps=20, freeze=True, train_split=str(d / "valid.txt"), valid_split=str(d / "test.txt"),
                         valid_limit=8, feature_cache=str(tmp_path / "features"), cache_dtype="float32")
        cfg.train.eval_every = cfg.train.checkpoint_every = 10
        cfg.train.schedule, cfg.train.warmup_steps = "constant", 5   # the LR must not depend on max_steps
        cfg.train.max_steps = steps
        return train_captioning(cfg, str(out), resume=resume, overrides={"train": {"max_steps": steps}},
                                log=lambda m: None)

    run(tmp_path / "warm", 1)                                   # builds the caches
    assert os.path.exists(tmp_path / "features" / "train" / "index.json")
    monkeypatch.setattr(CNNImageEncoder, "forward", no_cnn)
    monkeypatch.setattr(CNNImageEncoder, "features", no_cnn)   # the caches are reused, never rebuilt
    run(tmp_path / "full", 20)
    run(tmp_path / "part", 10)
    run(tmp_path / "part", 20, resume=True)
    full = load_model(str(tmp_path / "full" / "last.pt")).state_dict()
    part = load_model(str(tmp_path / "part" / "last.pt")).state_dict()
    assert all(torch.equal(full[k], part[k]) for k in full)


# -- data ----------------------------------------------------------------------------------------------

def test_every_caption_of_an_image_is_an_example():
    codec = TextCodec.build("word", ["a b c", "a b"])
    ex = CaptionExamples(["x.jpg", "y.jpg"], {"x.jpg": ["a b", "a b c", "b " * 50], "y.jpg": ["c"]}, codec, max_len=10)
    assert ex.image_of.tolist() == [0, 0, 1] and ex.dropped == 1
    assert ex.targets[0] == [codec.vocab.bos, *codec.encode("a b"), codec.vocab.eos]


def test_splits(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(20):
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / f"{i}.png")
        rows += [f"{i}.png\tA  Cat {i}", f"{i}.png\ta dog"]
    (tmp_path / "caps.tsv").write_text("\n".join(rows) + "\n")
    base = dict(images=str(tmp_path / "images"), captions=str(tmp_path / "caps.tsv"))
    s = load_splits(CaptionDataConfig(**base, valid_fraction=0.1), seed=1)
    assert len(s.valid) == 2 and len(s.train) == 18 and not set(s.train) & set(s.valid)
    assert s.captions["3.png"] == ["a cat 3", "a dog"]                     # lowercased, spaces collapsed
    (tmp_path / "val.txt").write_text("1.png\n2.png\n")
    s = load_splits(CaptionDataConfig(**base, valid_split=str(tmp_path / "val.txt")), seed=1)
    assert s.valid == ["1.png", "2.png"] and len(s.train) == 18
    (tmp_path / "bad.txt").write_text("1.png\nnope.png\n")
    with pytest.raises(SeqgenError, match="have no caption"):
        load_splits(CaptionDataConfig(**base, valid_split=str(tmp_path / "bad.txt")), seed=1)
    os.remove(tmp_path / "images" / "5.png")
    with pytest.raises(SeqgenError, match="missing.*5.png"):
        load_splits(CaptionDataConfig(**base), seed=1)


# -- folders -------------------------------------------------------------------------------------------

def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_folder_of_hostile_images(trained, tmp_path):
    model, *_ = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    expect = make_hostile_folder(folder)      # good, truncated, empty, text-as-.jpg, alpha, gray, 1x1, cmyk, ...
    out = tmp_path / "captions.jsonl"
    summary = caption_folder(model, [str(folder)], str(out), GenerationConfig(beam=3, max_len=12), batch_size=4,
                             num_workers=2, progress=False, skipped_path=str(tmp_path / "skipped.tsv"),
                             log=lambda m: None)
    good = sorted(n for n, r in expect.items() if r is None)
    records = read_jsonl(out)
    assert [os.path.basename(r["image"]) for r in records] == good          # listing order, each once
    assert all(r["caption"] and isinstance(r["score"], float) for r in records)
    bad = {os.path.basename(p): r for p, r in summary.skipped}
    assert bad == {n: r for n, r in expect.items() if r is not None}
    assert summary.ok and summary.captioned == len(good)
    lines = (tmp_path / "skipped.tsv").read_text().splitlines()
    assert sorted(os.path.basename(ln.split("\t")[0]) for ln in lines) == sorted(bad)


def test_nothing_captionable_is_not_ok(trained, tmp_path):
    model, *_ = trained
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    (tmp_path / "bad" / "b.png").write_text("text")
    summary = caption_folder(model, [str(tmp_path / "bad")], str(tmp_path / "c.jsonl"), progress=False,
                             num_workers=0, log=lambda m: None)
    assert not summary.ok and len(summary.skipped) == 2


def test_killed_run_resumes_and_captions_each_image_once(trained, tmp_path, monkeypatch):
    model, d, splits, *_ = trained
    folder = tmp_path / "many"
    folder.mkdir()
    names = [n for n, _ in splits["test"][:23]]
    for n in names:
        shutil.copy(d / "images" / n, folder / n)
    out = tmp_path / "caps.jsonl"
    gen = GenerationConfig(beam=2, max_len=12)
    calls = {"n": 0}
    real = folder_module.caption_tensor

    def dies_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt       # a kill between two flushed batches
        return real(*a, **k)

    monkeypatch.setattr(folder_module, "caption_tensor", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        caption_folder(model, [str(folder)], str(out), gen, batch_size=5, num_workers=2,
                       progress=False, log=lambda m: None)
    monkeypatch.undo()
    assert len(read_jsonl(out)) == 10
    with open(out, "a", encoding="utf-8") as f:          # and a record cut off mid-write by the kill
        f.write('{"image": "' + str(folder / names[10]) + '", "capt')
    summary = caption_folder(model, [str(folder)], str(out), gen, batch_size=5, num_workers=2,
                             progress=False, log=lambda m: None)
    assert summary.already_done == 10 and summary.captioned == 13
    records = read_jsonl(out)
    assert [os.path.basename(r["image"]) for r in records] == sorted(names)   # each exactly once, in order
    # a third run has nothing left to do
    again = caption_folder(model, [str(folder)], str(out), gen, progress=False, num_workers=0,
                           log=lambda m: None)
    assert again.captioned == 0 and again.already_done == 23 and again.ok
    # the same captions as an uninterrupted run
    fresh = tmp_path / "fresh.jsonl"
    caption_folder(model, [str(folder)], str(fresh), gen, batch_size=7, num_workers=0,
                   progress=False, log=lambda m: None)
    assert [(r["image"], r["caption"]) for r in read_jsonl(fresh)] == [(r["image"], r["caption"]) for r in records]


def test_symlinks_leaving_the_folder_are_skipped_unless_asked(trained, tmp_path):
    model, d, splits, *_ = trained
    folder = tmp_path / "links"
    folder.mkdir()
    os.symlink(d / "images" / splits["test"][0][0], folder / "outside.png")
    Image.open(d / "images" / splits["test"][1][0]).save(folder / "inside.png")
    summary = caption_folder(model, [str(folder)], str(tmp_path / "o.jsonl"), progress=False, num_workers=0,
                             log=lambda m: None)
    assert summary.captioned == 1 and [r for _, r in summary.skipped] == ["symlink outside the folder"]


def test_csv_output_recursive_and_attention_maps(trained, tmp_path):
    pytest.importorskip("matplotlib")
    model, d, splits, *_ = trained
    folder = tmp_path / "tree"
    (folder / "sub").mkdir(parents=True)
    items = splits["test"][:3]
    for i, (n, _) in enumerate(items):
        Image.open(d / "images" / n).save((folder / "sub" if i else folder) / n)
    out = tmp_path / "caps.csv"
    gen = GenerationConfig(beam=3, max_len=12)
    summary = caption_folder(model, [str(folder)], str(out), gen, recursive=True, num_workers=0, progress=False,
                             attention_png_dir=str(tmp_path / "att"), log=lambda m: None)
    assert summary.captioned == 3 and summary.attention_maps == 3
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "caption", "score"]
    want = dict(zip([n for n, _ in items], caption_images(model, [str(d / "images" / n) for n, _ in items], gen)))
    assert {os.path.basename(r["image"]): r["caption"] for r in rows} == want
    pngs = sorted(os.listdir(tmp_path / "att"))
    assert len(pngs) == 3 and all(p.endswith(".png") for p in pngs)
    assert Image.open(tmp_path / "att" / pngs[0]).size[0] > 100
    # resume works for CSV too
    again = caption_folder(model, [str(folder)], str(out), gen, recursive=True, num_workers=0, progress=False,
                           log=lambda m: None)
    assert again.already_done == 3 and again.captioned == 0


def test_foreign_output_file_is_not_overwritten(tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text("my notes\n")
    with pytest.raises(SeqgenError, match="not a captions record"):
        read_done(str(out))
    assert out.read_text() == "my notes\n"
    with pytest.raises(SeqgenError, match="unknown output format"):
        read_done(str(tmp_path / "x.txt"))


def test_unwritable_output_is_one_clear_error(trained, tmp_path):
    model, d, splits, *_ = trained
    (tmp_path / "out.jsonl").mkdir()
    image = str(d / "images" / splits["test"][0][0])
    for resume in (True, False):
        with pytest.raises(SeqgenError, match="out.jsonl: cannot"):
            caption_folder(model, [image], str(tmp_path / "out.jsonl"), resume=resume, progress=False,
                           num_workers=0, log=lambda m: None)
