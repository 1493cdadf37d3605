"""Pictures from matplotlib (the `plot` extra): attention heatmaps and training curves from metrics.jsonl.

matplotlib is imported only when a picture is drawn, with the Agg backend (no display needed).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from seqgen.errors import SeqgenError


def _pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SeqgenError("drawing pictures needs matplotlib: pip install 'seqgen[plot]'") from None
    return plt


def require_matplotlib() -> None:
    """Raise the install hint now rather than after a long run."""
    _pyplot()


def _save(fig: Any, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    except OSError as e:
        raise SeqgenError(f"{path}: cannot write the picture ({e.strerror or e})") from None


def attention_heatmap(attention: Any, source_tokens: Sequence[str], target_tokens: Sequence[str], path: str,
                      *, title: str | None = None) -> str:
    """Save a heatmap of attention weights [len(target_tokens), len(source_tokens)] as a PNG at `path`.

    Source tokens run along the x axis, generated target tokens down the y axis. Returns `path`.
    """
    plt = _pyplot()
    weights = attention.detach().cpu().float().numpy() if hasattr(attention, "detach") else attention
    rows, cols = len(target_tokens), len(source_tokens)
    if tuple(weights.shape) != (rows, cols):
        raise ValueError(f"attention has shape {tuple(weights.shape)} but there are {rows} target and "
                         f"{cols} source tokens")
    fig, ax = plt.subplots(figsize=(max(3.0, 0.35 * cols + 1.5), max(2.5, 0.3 * rows + 1.2)))
    try:
        im = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(cols))
        ax.set_xticklabels(list(source_tokens), rotation=90, fontsize=8)
        ax.set_yticks(range(rows))
        ax.set_yticklabels(list(target_tokens), fontsize=8)
        ax.set_xlabel("source")
        ax.set_ylabel("generated")
        if title:
            ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (one JSON object per line)."""
    from seqgen.data.text import read_lines

    records = []
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise SeqgenError(f"{path}:{lineno}: not a JSON line (is this a metrics.jsonl?)") from None
    return records


def loss_curve(metrics_path: str, path: str, *, x: str = "step") -> str:
    """Save training loss and every validation metric from `metrics_path` (metrics.jsonl) as a PNG.

    x: "step", or an evaluation field such as "train_minutes" (then only evaluations can be drawn against it).
    Returns `path`.
    """
    plt = _pyplot()
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "eval" not in r]
    evals = [r for r in records if "eval" in r]
    names = sorted({k for r in evals for k in r["eval"] if k not in ("train_minutes", "wall_minutes", "loss")})
    if not train and not evals:
        raise SeqgenError(f"{metrics_path}: no training or evaluation records to draw")
    panels = 1 + len(names)
    fig, axes = plt.subplots(panels, 1, figsize=(6.0, 2.2 * panels), sharex=(x == "step"), squeeze=False)
    try:
        ax = axes[0][0]
        if train and x == "step":
            ax.plot([s for s, _ in train], [v for _, v in train], label="training loss", lw=1)
        eval_x = [r["step"] if x == "step" else r["eval"].get(x) for r in evals]
        if any(v is None for v in eval_x):
            raise SeqgenError(f"{metrics_path}: evaluation records have no {x!r}")
        if any("loss" in r["eval"] for r in evals):
            ax.plot(eval_x, [r["eval"].get("loss") for r in evals], "o-", label="validation loss", ms=3)
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=8)
        for i, name in enumerate(names):
            a = axes[i + 1][0]
            a.plot(eval_x, [r["eval"].get(name) for r in evals], "o-", ms=3)
            a.set_ylabel(name)
        for row in axes:
            row[0].grid(alpha=0.3)
        axes[-1][0].set_xlabel(x.replace("_", " "))
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


__all__ = ["attention_heatmap", "loss_curve", "read_metrics", "require_matplotlib"]


def image_attention_map(image: Any, attention: Any, words: Sequence[str], grid: tuple[int, int], path: str, *,
                        title: str | None = None, columns: int = 5, max_words: int = 40) -> str:
    """Save where each generated word of a caption looked: one panel per word, the image with that word's
    attention over the image grid laid over it (upsampled smoothly), plus the plain image first.

    image: [H, W, 3] uint8 or floats in [0, 1] (or a PIL image); attention: [len(words), h * w] weights;
    grid: (h, w), row-major as the encoder flattens it. Only the first `max_words` words get a panel.
    Returns `path`.
    """
    import numpy as np

    plt = _pyplot()
    arr = np.asarray(image)
    img = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    weights = attention.detach().cpu().float().numpy() if hasattr(attention, "detach") else np.asarray(attention)
    h, w = grid
    if weights.shape != (len(words), h * w):
        raise ValueError(f"attention has shape {tuple(weights.shape)} but there are {len(words)} words and a "
                         f"{h}x{w} grid")
    words, weights = list(words)[:max_words], weights[:max_words]
    panels = 1 + len(words)
    cols = max(1, min(columns, panels))
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    try:
        height, width = img.shape[:2]
        for k, ax in enumerate(a for row in axes for a in row):
            ax.axis("off")
            if k >= panels:
                continue
            ax.imshow(img)
            if k == 0:
                ax.set_title("image", fontsize=9)
                continue
            cell = weights[k - 1].reshape(h, w)
            ax.imshow(cell / max(float(cell.max()), 1e-12), cmap="gray", alpha=0.6, vmin=0.0, vmax=1.0,
                      extent=(0, width, height, 0), interpolation="bilinear")
            ax.set_title(words[k - 1], fontsize=9)
        if title:
            fig.suptitle(title, fontsize=10)
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


__all__.append("image_attention_map")
