"""The models that ship with seqgen: what each is, what it was trained on, and the recipe that made it.

Static facts live here (they change only with a recipe); what was measured on the shipped file (size,
checksum, quality, speed, the commit that trained it) lives in `models.json` beside this file, written by
`scripts/train_zoo.py NAME --install`. docs/models.md is the long form of both.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooEntry:
    name: str
    task: str                 # "translation" | "captioning" | "lm"
    summary: str              # what it does, one line
    trained_on: str           # the data, one line
    terms: str                # the terms of use of that data, one line
    limits: str               # what it is not for, with an example
    recipe: tuple[str, ...]   # `seqgen` arguments that train it ({data} = the data folder; --out is added)
    precision: str = "int8"   # compact weight format of the shipped file (seqgen.zoo.compact)


_MULTI30K = "{data}/multi30k"
_FLICKR8K = "{data}/flickr8k"

ENTRIES: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry(
        name="multi30k-de-en",
        task="translation",
        summary="German -> English translation of short image descriptions (bi-GRU encoder, GRU decoder, "
                "Bahdanau attention, 8k joint BPE)",
        trained_on="Multi30k task 1 train (29,000 De-En sentence pairs describing Flickr30k photos)",
        terms="Multi30k (Elliott et al. 2016): research use, cite the paper; the data itself is not shipped",
        limits="knows only Multi30k's domain (one-sentence descriptions of photos): news, chat or long sentences "
               "come out badly, e.g. 'Die Bundesregierung hat am Mittwoch ein neues Klimaschutzgesetz "
               "beschlossen.'",
        recipe=("train", "translation", "--src-train", f"{_MULTI30K}/train.de", "--tgt-train",
                f"{_MULTI30K}/train.en", "--src-valid", f"{_MULTI30K}/val.de", "--tgt-valid", f"{_MULTI30K}/val.en",
                "--max-steps", "5000", "--eval-every", "500", "--checkpoint-every", "500", "--seed", "1",
                "--progress", "false"),
    ),
    ZooEntry(
        name="flickr8k-captioner",
        task="captioning",
        summary="English captions for photos (frozen EfficientNet-Lite0 ImageNet features, LSTM decoder with "
                "Bahdanau attention)",
        trained_on="Flickr8k train split (6,000 photos, 5 captions each)",
        terms="Flickr8k (Hodosh et al. 2013): research use; photos under Flickr's terms; the data is not shipped",
        limits="describes everyday Flickr scenes (people, dogs, sports) in one short sentence; it has never seen "
               "documents, screenshots or drawings, and names no one",
        recipe=("train", "captioning", "--images", f"{_FLICKR8K}/images", "--captions", f"{_FLICKR8K}/captions.tsv",
                "--train-split", f"{_FLICKR8K}/train.txt", "--valid-split", f"{_FLICKR8K}/val.txt", "--seed", "1",
                "--progress", "false"),
    ),
    ZooEntry(
        name="shakespeare-char",
        task="lm",
        summary="character-level language model that writes Shakespeare-like text (2-layer LSTM 384)",
        trained_on="Tiny Shakespeare, first 90% of its 1,115,394 characters",
        terms="Shakespeare's plays: public domain",
        limits="a toy-sized model: locally plausible verse and speaker names, no sense over more than a line",
        recipe=("train", "lm", "--text", "{data}/tinyshakespeare/input.txt", "--level", "char", "--cell", "lstm",
                "--emb", "384", "--hidden", "384", "--layers", "2", "--dropout", "0.2", "--seq-len", "128",
                "--batch-size", "64", "--lr", "3e-3", "--warmup-steps", "100", "--max-steps", "2000",
                "--eval-every", "250", "--checkpoint-every", "250", "--log-every", "100", "--seed", "1",
                "--progress", "false"),
    ),
)}
