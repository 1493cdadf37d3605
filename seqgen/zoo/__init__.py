"""Models that ship with seqgen, found by name: `load_model("multi30k-de-en")`, `seqgen translate multi30k-de-en`.

`resolve(name_or_path)` is the only entry point the rest of seqgen uses: a path that exists wins; a shipped
name becomes the path of its file inside the installed package (importlib.resources), after its SHA-256 is
checked against models.json. Nothing else in seqgen knows that a model came from here.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from seqgen.errors import SeqgenError
from seqgen.zoo.registry import ENTRIES, ZooEntry

REINSTALL_HINT = ("reinstall seqgen (`pip install --force-reinstall seqgen`; in a source checkout "
                  "`git checkout -- seqgen/zoo/files`)")


def _root():
    """The installed package folder holding models.json and files/ (a Traversable; tests point it elsewhere)."""
    return resources.files("seqgen.zoo")


@dataclass(frozen=True)
class ShippedModel:
    """A registry entry with what was measured on its shipped file (empty when it is not installed)."""

    entry: ZooEntry
    facts: dict[str, Any]

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def path(self) -> str:
        return str(_root().joinpath("files", self.facts.get("file", f"{self.name}.pt")))

    @property
    def installed(self) -> bool:
        return bool(self.facts) and os.path.isfile(self.path)


def _facts() -> dict[str, dict[str, Any]]:
    try:
        text = _root().joinpath("models.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return json.loads(text)


def shipped_models() -> list[ShippedModel]:
    facts = _facts()
    return [ShippedModel(e, facts.get(name, {})) for name, e in ENTRIES.items()]


def names() -> list[str]:
    return list(ENTRIES)


def get(name: str) -> ShippedModel:
    if name not in ENTRIES:
        raise SeqgenError(f"{name!r} is not a shipped model; known names: {', '.join(ENTRIES)}")
    return ShippedModel(ENTRIES[name], _facts().get(name, {}))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED: dict[tuple[str, int, int], str] = {}   # (path, size, mtime_ns) -> sha256 checked in this process


def verify(model: ShippedModel) -> str:
    """The path of a shipped model's file, after checking it against models.json; SeqgenError if it is
    missing or damaged."""
    path = model.path
    if not model.facts:
        raise SeqgenError(f"shipped model {model.name} is not installed in this copy of seqgen (no entry in "
                          f"models.json); train it with `python scripts/train_zoo.py {model.name} --install`")
    try:
        st = os.stat(path)
    except OSError:
        raise SeqgenError(f"{path}: the file of shipped model {model.name} is missing; {REINSTALL_HINT}") from None
    key = (path, st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key) != model.facts["sha256"]:
        if sha256_file(path) != model.facts["sha256"]:
            raise SeqgenError(f"{path}: checksum mismatch: the file of shipped model {model.name} is damaged or "
                              f"modified; {REINSTALL_HINT}")
        _VERIFIED[key] = model.facts["sha256"]
    return path


def resolve(name_or_path: str) -> str:
    """A checkpoint path for a path or a shipped model's name (a path that exists wins)."""
    if os.path.exists(name_or_path):
        return name_or_path
    if name_or_path in ENTRIES:
        return verify(get(name_or_path))
    raise SeqgenError(f"{name_or_path}: no such checkpoint file, and not the name of a shipped model "
                      f"(known names: {', '.join(ENTRIES)}; `seqgen models` describes them)")


def table() -> str:
    """What `seqgen models` prints: one block per shipped model."""
    blocks = []
    for m in shipped_models():
        e, f = m.entry, m.facts
        size = f"{f['bytes'] / 1e6:.1f} MB ({f.get('precision', e.precision)})" if f else "not installed"
        lines = [f"{e.name}  [{e.task}]  {size}",
                 f"  {e.summary}",
                 f"  trained on: {e.trained_on}",
                 f"  data terms: {e.terms}"]
        if f.get("quality"):
            lines.append("  quality:    " + "; ".join(f"{k} {v}" for k, v in f["quality"].items()))
        if f.get("speed"):
            lines.append("  speed:      " + "; ".join(f"{k} {v}" for k, v in f["speed"].items()))
        lines.append(f"  not for:    {e.limits}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\nUse a name wherever a checkpoint path works, e.g. `seqgen translate " \
                                 "multi30k-de-en input.de`; model cards: docs/models.md"
