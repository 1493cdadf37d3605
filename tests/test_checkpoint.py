"""Checkpoints are data, written atomically, verified on load."""
import os
import pickle

import pytest
import torch

from seqgen.checkpoint import load_checkpoint, save_checkpoint
from seqgen.errors import SeqgenError


def test_round_trip(tmp_path):
    path = str(tmp_path / "a.pt")
    payload = {"config": "{}", "model": {"w": torch.randn(3, 4)}, "vocab": ["<pad>", "a"]}
    save_checkpoint(path, payload)
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], payload["model"]["w"]) and back["vocab"] == payload["vocab"]
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(str(path), {"model": {"w": torch.randn(100, 100)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SeqgenError, match="truncated|corrupt"):
        load_checkpoint(str(path))


def test_bit_flip_is_detected_by_checksum(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(str(path), {"model": {"w": torch.zeros(1000)}})
    data = bytearray(path.read_bytes())
    at = data.find(bytes(4000))             # the weights' 4,000 zero bytes, stored as they are
    assert at > 0
    data[at + 2000] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(SeqgenError, match="checksum|corrupt"):
        load_checkpoint(str(path))


def test_modified_payload_is_detected_by_checksum(tmp_path):
    """Rewritten with torch.save (so the zip is intact), a changed weight, key or string no longer matches."""
    path = tmp_path / "a.pt"
    save_checkpoint(str(path), {"config": "{}", "model": {"w": torch.zeros(10)}})
    for change in (lambda p: p["model"]["w"].add_(1), lambda p: p.update(config='{"x": 1}'),
                   lambda p: p["model"].update(v=p["model"].pop("w"))):
        outer = torch.load(path, weights_only=True)
        change(outer["payload"])
        torch.save(outer, tmp_path / "b.pt")
        with pytest.raises(SeqgenError, match="checksum"):
            load_checkpoint(str(tmp_path / "b.pt"))


def _save_version_1(path, payload):
    """The format seqgen wrote before version 2: the payload torch.save'd into a byte string."""
    import hashlib
    import io
    buf = io.BytesIO()
    torch.save(payload, buf)
    raw = buf.getvalue()
    torch.save({"format": "seqgen-checkpoint", "version": 1, "sha256": hashlib.sha256(raw).hexdigest(),
                "payload": torch.frombuffer(bytearray(raw), dtype=torch.uint8)}, path)


def test_version_1_files_still_load_and_are_checked(tmp_path):
    path = tmp_path / "v1.pt"
    _save_version_1(path, {"config": "{}", "model": {"w": torch.arange(6.0)}})
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], torch.arange(6.0))
    outer = torch.load(path, weights_only=True)
    outer["payload"][len(outer["payload"]) // 2] ^= 0x10
    torch.save(outer, path)
    with pytest.raises(SeqgenError, match="checksum"):
        load_checkpoint(str(path))


def test_crafted_payloads_are_refused_in_one_line(tmp_path):
    path = tmp_path / "c.pt"
    nested = []
    for _ in range(100):
        nested = [nested]
    for version, payload in ((0, {}), (True, {}), ("2", {}), (2, {"n": 10 ** 5000}), (2, {"deep": nested}),
                             (2, ["not", "a", "mapping"])):
        torch.save({"format": "seqgen-checkpoint", "version": version, "sha256": "0" * 64, "payload": payload}, path)
        with pytest.raises(SeqgenError) as e:
            load_checkpoint(str(path))
        assert "\n" not in str(e.value) and len(str(e.value)) < 300


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "seqgen-checkpoint", "version": 1, "payload": Evil()}, path)
    with pytest.raises(SeqgenError, match="pickled code"):
        load_checkpoint(str(path))
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(SeqgenError):
        load_checkpoint(str(raw))


def test_foreign_and_future_formats(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(SeqgenError, match="not a seqgen checkpoint"):
        load_checkpoint(str(foreign))
    future = tmp_path / "future.pt"
    torch.save({"format": "seqgen-checkpoint", "version": 99, "payload": torch.zeros(1, dtype=torch.uint8)}, future)
    with pytest.raises(SeqgenError, match="newer"):
        load_checkpoint(str(future))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_text_and_empty_files_are_not_checkpoints(tmp_path):
    for name, data in (("log.jsonl", b'{"step": 1}\n'), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SeqgenError, match="not a seqgen checkpoint"):
            load_checkpoint(str(tmp_path / name))


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    """The one write every whole file goes through (seqgen.atomic): text or bytes, and a writer that fails
    half-way leaves the old file and no temp file."""
    from seqgen.atomic import atomic_write
    path = tmp_path / "sub" / "out.txt"
    atomic_write(str(path), lambda f: f.write("één\n"), mode="w", encoding="utf-8")
    assert path.read_text(encoding="utf-8") == "één\n"

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        atomic_write(str(path), half_then_fail)
    assert path.read_text(encoding="utf-8") == "één\n" and os.listdir(path.parent) == ["out.txt"]


def test_map_location_moves_every_tensor_after_the_check(tmp_path):
    path = str(tmp_path / "a.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "trainer": {"optimizer": {"state": [torch.zeros(3)]}}})
    back = load_checkpoint(path, map_location="meta")
    assert back["model"]["w"].device.type == "meta" and back["trainer"]["optimizer"]["state"][0].device.type == "meta"
