"""`seqgen evaluate` for captioning: caption the images of a test split and score them against all their references.

    names, captions, scores = evaluate_captions(model, "flickr8k/images", "flickr8k/captions.tsv",
                                                "flickr8k/test.txt", GenerationConfig(beam=5))
    scores == {"bleu1": ..., "bleu4": 22.0, "rouge_l": 0.48, "cider": 0.53}

The images are decoded and captioned exactly as training-time validation does it (`image_valid_batches` and
`caption_all` of seqgen.tasks.captioning) and scored by the same function (`seqgen.metrics.caption_scores`), so a
model's validation numbers and `seqgen evaluate` on the same split and decoding agree. METEOR and SPICE are not
computed: their reference implementations need Java.
"""
from __future__ import annotations

import json
import os

from seqgen.atomic import atomic_write
from seqgen.data.captions import image_valid_batches, load_test_split
from seqgen.data.images import default_num_workers
from seqgen.encoders.cnn import build_transform
from seqgen.errors import SeqgenError
from seqgen.generation import GenerationConfig
from seqgen.inference.captioning import require_captioning
from seqgen.metrics import caption_scores
from seqgen.model import Seq2Seq
from seqgen.outputs import spreadsheet_cell
from seqgen.tasks.captioning import caption_all

OUTPUT_FORMATS = (".jsonl", ".tsv", ".txt")


def check_output(path: str) -> None:
    """Refuse an --out whose extension is not one this command writes (before anything is decoded)."""
    if path and os.path.splitext(path)[1].lower() not in OUTPUT_FORMATS:
        raise SeqgenError(f"--out {path}: write the captions to a .jsonl file (one {{\"image\", \"caption\"}} record "
                          f"per line) or a .tsv/.txt file (image<TAB>caption)")


def evaluate_captions(model: Seq2Seq, images: str, captions: str, split: str, gen: GenerationConfig, *,
                      batch_size: int = 64, num_workers: int | None = None
                      ) -> tuple[list[str], list[str], dict[str, float]]:
    """Caption the images of `split` (every captioned image without one) with `gen`; returns (image names, their
    captions, scores: bleu1..bleu4 0..100, rouge_l and cider). See the module docstring."""
    require_captioning(model)
    names, refs = load_test_split(images, captions, split)
    workers = num_workers if num_workers is not None else default_num_workers(model.device)
    batches = image_valid_batches([os.path.join(images, n) for n in names], build_transform(model.config.image_encoder),
                                  batch_size, workers, what="evaluation")
    hyps = caption_all(model, batches, len(names), gen)
    return names, hyps, caption_scores(hyps, [refs[n] for n in names])


def write_captions(path: str, names: list[str], hyps: list[str]) -> None:
    """--out: one record per image, atomically (a killed run leaves the old file or none)."""
    if path.lower().endswith(".jsonl"):
        text = "".join(json.dumps({"image": n, "caption": h}, ensure_ascii=False) + "\n" for n, h in zip(names, hyps))
    else:
        text = "".join(f"{spreadsheet_cell(n)}\t{spreadsheet_cell(h)}\n" for n, h in zip(names, hyps))
    try:
        atomic_write(path, lambda f: f.write(text), mode="w", encoding="utf-8")
    except OSError as e:
        raise SeqgenError(f"{path}: cannot write the captions ({e.strerror or e})") from None


def score_line(scores: dict[str, float], images: int, gen: GenerationConfig) -> str:
    """One line of the scores, as `seqgen evaluate` prints them."""
    search = f"beam {gen.beam}" if gen.beam > 1 else ("greedy" if gen.temperature == 0 else
                                                      f"sampling at temperature {gen.temperature}")
    return (" | ".join(f"BLEU-{n} {scores[f'bleu{n}']:.2f}" for n in range(1, 5))
            + f" | ROUGE-L {scores['rouge_l']:.4f} | CIDEr-D {scores['cider']:.4f} ({images:,} images, {search})")


__all__ = ["check_output", "evaluate_captions", "score_line", "write_captions"]
