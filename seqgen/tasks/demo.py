"""`seqgen demo`: the shipped models at work (offline, about half a minute on a 2-core CPU), and
`seqgen demo --train`: train a small character model on text the project generates, then generate from it.

The first shows what a new user can do on day one: caption a photo (with an attention map), translate German,
continue a prompt; the second shows the whole training pipeline (tokenizer, decoder, trainer, sampling).
"""
from __future__ import annotations

import os
import random
import tempfile

import torch

from seqgen.data.images import load_image
from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.cnn import build_transform
from seqgen.generation import GenerationConfig
from seqgen.inference.captioning import caption_images_full, default_caption_gen
from seqgen.inference.lm import generate_text
from seqgen.inference.translation import translate
from seqgen.model import load_model
from seqgen.plots import image_attention_map
from seqgen.tasks.lm import LMDataConfig, LMRunConfig, train_lm
from seqgen.train import TrainConfig

_WHO = ["the old king", "a little fox", "the miller's daughter", "a grey wolf", "the young sailor",
        "an honest shepherd", "the clever crow", "a weary knight"]
_DOES = ["walks", "sings", "waits", "dances", "sleeps", "wanders", "weeps", "laughs"]
_WHERE = ["by the river", "under the silver moon", "in the green wood", "across the cold sea",
          "beyond the hill", "at the castle gate", "in the quiet town", "near the old mill"]
_WHEN = ["at dawn", "all night", "in the rain", "when the bells ring", "before the winter", "every spring"]


def demo_text(lines: int = 3000, seed: int = 0) -> str:
    """A small corpus of rhythmic sentences from a fixed grammar (deterministic for a seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        who, does, where = rng.choice(_WHO), rng.choice(_DOES), rng.choice(_WHERE)
        line = f"{who} {does} {where}"
        if rng.random() < 0.5:
            line += " " + rng.choice(_WHEN)
        out.append(line[0].upper() + line[1:] + ".")
    return "\n".join(out) + "\n"


def run_training_demo(seconds: float = 40.0, out: str | None = None, seed: int = 1) -> None:
    """Train for about `seconds` and print generations; the run folder is `out` or a temp folder."""
    with tempfile.TemporaryDirectory() as tmp:
        out = out or os.path.join(tmp, "run")
        text_path = os.path.join(tmp, "demo.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write(demo_text(seed=seed))
        print(f"seqgen demo: training a character LSTM on {text_path} for ~{seconds:.0f}s (offline, CPU)")
        run = LMRunConfig(
            data=LMDataConfig(text=text_path, level="char", seq_len=128, batch_size=32, valid_fraction=0.1),
            decoder=DecoderConfig(cell="lstm", emb=64, hidden=256, layers=1, dropout=0.0),
            train=TrainConfig(lr=5e-3, warmup_steps=20, max_steps=100_000, time_budget=seconds / 60,
                              eval_every=100, log_every=50, checkpoint_every=100, seed=seed, progress=False,
                              device="cpu"))
        state = train_lm(run, out)
        print(f"\ntrained {state.step} steps; validation loss {state.best:.3f} nats/char; checkpoint {out}/best.pt\n")
        model = load_model(os.path.join(out, "best.pt"))
        for temperature in (0.5, 0.8, 1.0):
            gen = GenerationConfig(temperature=temperature, max_len=160)
            print(f"--- temperature {temperature}, prompt 'The old king':")
            print(generate_text(model, "The old king", gen, seed=seed)[0].rstrip())
        print("--- beam search (beam 5), prompt 'A little fox':")
        print(generate_text(model, "A little fox", GenerationConfig(beam=5, max_len=60), seed=seed)[0].rstrip())


# German sentences written for this demo (in Multi30k's domain: one-sentence descriptions of a scene).
DEMO_GERMAN = [
    "Ein Mann fährt mit dem Fahrrad durch die Stadt.",
    "Zwei Kinder spielen im Sand am Strand.",
    "Eine Frau in einem roten Kleid singt auf einer Bühne.",
    "Ein schwarzer Hund springt über einen Zaun.",
    "Drei Männer arbeiten auf dem Dach eines Hauses.",
]


def demo_photos() -> list[str]:
    """Photos that installed packages already carry (no image of unclear licence ships with seqgen)."""
    found = []
    try:
        import matplotlib
        path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
        if os.path.isfile(path):
            found.append(path)
    except ImportError:
        pass
    return found


def run_demo(out: str = "runs/demo", seed: int = 1, say=print) -> dict:
    """Caption, translate and generate with the shipped models; returns what was printed, by job."""
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    results: dict = {}
    say("seqgen demo: the models that ship with seqgen, offline (`seqgen models` describes them)\n")

    photos = demo_photos()
    say("1. Captioning (flickr8k-captioner, beam 5):")
    if photos:
        captioner = load_model("flickr8k-captioner", task="captioning")
        captions = caption_images_full(captioner, photos, default_caption_gen())
        transform = build_transform(captioner.config.image_encoder)
        for i, (path, c) in enumerate(zip(photos, captions)):
            say(f"   {os.path.basename(path)}: {c.text}")
            if i == 0 and c.attention is not None:
                png = os.path.join(out, os.path.splitext(os.path.basename(path))[0] + "_attention.png")
                image = transform(load_image(path)).permute(1, 2, 0).numpy()
                image_attention_map(image, c.attention, c.words, c.grid, png, title=c.text)
                say(f"   attention of each word over the photo: {png}")
        results["captions"] = [c.text for c in captions]
    else:
        say("   (no sample photo found: matplotlib's sample_data/grace_hopper.jpg is missing)")

    say("\n2. Translation German -> English (multi30k-de-en, beam 5):")
    translator = load_model("multi30k-de-en", task="translation")
    english = translate(translator, DEMO_GERMAN, GenerationConfig(beam=5), seed=seed)
    for de, en in zip(DEMO_GERMAN, english):
        say(f"   {de}\n     -> {en}")
    results["translations"] = english

    say('\n3. Generation (shakespeare-char), prompt "ROMEO:":')
    lm = load_model("shakespeare-char", task="lm")
    results["generations"] = []
    for temperature in (0.5, 1.0):
        text = generate_text(lm, "ROMEO:", GenerationConfig(temperature=temperature, max_len=200), seed=seed)[0]
        say(f"--- temperature {temperature}:\n{text.rstrip()}\n")
        results["generations"].append(text)

    say("Your own files:\n"
        "   seqgen caption flickr8k-captioner photos/ --out captions.jsonl      # a folder; rerun to resume\n"
        "   seqgen translate multi30k-de-en input.de --out output.en\n"
        "   seqgen generate shakespeare-char --prompt \"JULIET:\" --temperature 0.8\n"
        "Your own model:\n"
        "   seqgen train translation --src-train train.de --tgt-train train.en --src-valid val.de "
        "--tgt-valid val.en --out runs/de-en\n"
        "   seqgen train captioning --images photos/ --captions captions.tsv --train-split train.txt "
        "--valid-split val.txt --out runs/cap\n"
        "   seqgen train lm --text input.txt --level char --out runs/lm\n"
        "   seqgen demo --train    # a 40-second training run on generated text")
    return results
