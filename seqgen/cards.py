"""The measured figures of a model card: quality and speed of a model on its task's test data.

`scripts/train_zoo.py` prints these for a float32 checkpoint and its compact file (docs/models.md holds what
it printed); the slow tests check the shipped files against the cards' targets with the same functions.
data_dir: the folder holding multi30k/, flickr8k/ and tinyshakespeare/ (../shared/data).
"""
from __future__ import annotations

import os

import torch

from seqgen.bench import best_seconds, generation_rate
from seqgen.generation import GenerationConfig
from seqgen.model import load_model


def translation_figures(path: str, data_dir: str, timing: bool = True) -> dict:
    from seqgen.data.text import read_lines
    from seqgen.inference.translation import translate
    from seqgen.metrics import corpus_scores
    src = read_lines(os.path.join(data_dir, "multi30k", "test_2016_flickr.de"))
    ref = read_lines(os.path.join(data_dir, "multi30k", "test_2016_flickr.en"))
    model = load_model(path, task="translation")
    gen = GenerationConfig(beam=5)
    hyps = translate(model, src, gen, batch_size=64)
    scores = corpus_scores(hyps, ref)
    out = {"BLEU test_2016_flickr (beam 5)": round(scores["bleu"], 2),
           "chrF test_2016_flickr (beam 5)": round(scores["chrf"], 2),
           "_signature": scores["bleu_signature"],
           "_examples": [f"{s} -> {t}" for s, t in zip(OUT_OF_DOMAIN, translate(model, OUT_OF_DOMAIN, gen))]}
    if timing:
        seconds = best_seconds(lambda: translate(model, src, gen, batch_size=64), 2, model.device)
        out["sentences/s (beam 5, batch 64)"] = round(len(src) / seconds, 1)
    return out


# News and chat: far from Multi30k's photo descriptions (the card shows what the model makes of them).
OUT_OF_DOMAIN = ["Die Bundesregierung hat am Mittwoch ein neues Klimaschutzgesetz beschlossen.",
                 "Hast du morgen Zeit für einen Kaffee?"]


def captioning_figures(path: str, data_dir: str, timing: bool = True) -> dict:
    from seqgen.data.captions import CaptionDataConfig, load_splits
    from seqgen.data.images import read_split
    from seqgen.inference.captioning import caption_images, default_caption_gen
    from seqgen.metrics import caption_bleu, cider_d, max_ngram_repeats
    d = os.path.join(data_dir, "flickr8k")
    splits = load_splits(CaptionDataConfig(images=os.path.join(d, "images"), captions=os.path.join(d, "captions.tsv"),
                                           train_split=os.path.join(d, "train.txt"),
                                           valid_split=os.path.join(d, "val.txt")), seed=1)
    names = read_split(os.path.join(d, "test.txt"))
    files = [splits.path(n) for n in names]
    refs = [splits.captions[n] for n in names]
    model = load_model(path, task="captioning")
    figures = {}
    for label, gen in (("", default_caption_gen()),
                       (" without n-gram blocking", GenerationConfig(beam=5, max_len=default_caption_gen().max_len))):
        hyps = caption_images(model, files, gen, batch_size=64)
        bleu = caption_bleu(hyps, refs)
        for n in range(1, 5):
            figures[f"BLEU-{n} Flickr8k test{label}"] = round(bleu[f"bleu{n}"], 2)
        figures[f"CIDEr-D Flickr8k test{label}"] = round(cider_d(hyps, refs), 3)
        repeats = [max_ngram_repeats(h, 3) for h in hyps]
        figures[f"captions repeating a word trigram{label}"] = f"{sum(r >= 2 for r in repeats)} / {len(hyps)}"
        figures[f"captions with a trigram 3 times{label}"] = sum(r >= 3 for r in repeats)
        if not label and timing:
            seconds = best_seconds(lambda: caption_images(model, files, gen, batch_size=64), 2, model.device)
            figures["images/s (JPEG files, beam 5, batch 64)"] = round(len(files) / seconds, 1)
        if not label:
            from seqgen.tasks.demo import demo_photos
            photos = demo_photos()
            figures["_examples"] = ([f"{os.path.basename(p)}: {c}" for p, c in
                                     zip(photos, caption_images(model, photos, gen))]
                                    + [f"{n}: {h}" for n, h in zip(names[:5], hyps[:5])])
    return figures


def lm_figures(path: str, data_dir: str, timing: bool = True) -> dict:
    from seqgen.data.text import read_text
    from seqgen.inference.lm import generate_text
    from seqgen.tasks.lm import make_evaluate, split_text
    model = load_model(path, task="lm")
    _, valid_text = split_text(read_text(os.path.join(data_dir, "tinyshakespeare", "input.txt")), 0.1)
    valid_ids = torch.tensor(model.tgt.encode(valid_text), dtype=torch.long)
    with torch.inference_mode():
        loss = make_evaluate(valid_ids, 128, 8, model.tgt.vocab.bos, model.tgt.vocab.pad)(model)["loss"]
    out = {"validation nats/char (last 10%)": round(loss, 4),
           "_examples": [generate_text(model, "ROMEO:", GenerationConfig(temperature=0.8, max_len=200))[0]]}
    if timing:
        sample = GenerationConfig(temperature=0.8, max_len=2000)
        rates = [generation_rate(model, sample, prompt="ROMEO:", seconds=3.0) for _ in range(2)]
        out["chars/s (batch 1, sampling T=0.8)"] = round(max(rates))
    return out


FIGURES = {"translation": translation_figures, "captioning": captioning_figures, "lm": lm_figures}


