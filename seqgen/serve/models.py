"""The models a server holds, and the one function that decodes a batch of requests for any of them.

A `ServedModel` is a loaded Seq2Seq under a name (a shipped model's name, or NAME=PATH, or a file's stem).
`run_batch(key, items)` is what the Batcher's worker thread calls: it calls the same task functions the CLI
calls (`translate_nbest`, `caption_tensor`, `generate_text`); the server owns no decoding logic of its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.model import Seq2Seq, load_model


@dataclass
class ServedModel:
    name: str
    source: str          # the shipped name or the path it was loaded from
    model: Seq2Seq

    @property
    def task(self) -> str:
        return self.model.config.task

    def describe(self) -> dict:
        from seqgen import zoo
        info = {"name": self.name, "task": self.task, "source": self.source,
                "parameters": sum(p.numel() for p in self.model.parameters())}
        if self.source in zoo.names():
            info["summary"] = zoo.get(self.source).entry.summary
        return info


def parse_model_arg(arg: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a shipped name -> (name, name); a path -> (its file stem, path)."""
    if "=" in arg and not os.path.exists(arg):
        name, path = arg.split("=", 1)
        if not name or not path:
            raise SeqgenError(f"{arg!r}: give a model as NAME, PATH or NAME=PATH")
        return name, path
    if os.path.exists(arg):
        stem = os.path.splitext(os.path.basename(os.path.normpath(arg)))[0]
        return stem or arg, arg
    return arg, arg


def load_served(args: Sequence[str], device: torch.device | str = "cpu") -> dict[str, ServedModel]:
    """Load every model named on the command line; SeqgenError for a duplicate name or a bad model."""
    served: dict[str, ServedModel] = {}
    for arg in args:
        name, source = parse_model_arg(arg)
        if name in served:
            raise SeqgenError(f"two models are called {name!r}: name them with NAME=PATH")
        served[name] = ServedModel(name, source, load_model(source, device=device))
    if not served:
        raise SeqgenError("give at least one model to serve")
    return served


def gen_key(gen: GenerationConfig) -> tuple:
    """A hashable form of the decoding options (requests batch together only when these are equal)."""
    return tuple(sorted(vars(gen).items()))


def run_batch(served: dict[str, ServedModel], key: Hashable, items: Sequence[Any]) -> list[Any]:
    """Decode one batch. key = (model name, job, gen_key, extra); items depend on the job:

    translate: source sentences -> lists of Translation (n-best); caption: image tensors [3, S, S] uint8 ->
    Caption; generate: (prompt, num_samples) -> lists of texts (one search per item: prompts differ in length).
    """
    name, job, gen_items, extra = key
    model = served[name].model
    gen = GenerationConfig(**dict(gen_items))
    if job == "translate":
        from seqgen.inference.translation import translate_nbest
        return translate_nbest(model, list(items), gen, batch_size=max(1, len(items)), seed=extra,
                               warn=lambda _m: None)
    if job == "caption":
        from seqgen.inference.captioning import caption_tensor
        generator = torch.Generator(device=model.device).manual_seed(extra) if gen.temperature > 0 else None
        return caption_tensor(model, torch.stack(list(items)), gen, generator=generator)
    if job == "generate":
        from seqgen.inference.lm import generate_text
        return [generate_text(model, prompt, gen, num_samples=n, seed=extra) for prompt, n in items]
    raise ValueError(f"unknown job {job!r}")
