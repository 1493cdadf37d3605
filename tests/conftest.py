import os
import sys

import pytest
import torch

# Tests are small; one thread avoids oversubscribing the 2-core CI machine and keeps runs deterministic.
torch.set_num_threads(1)

SHARED_DATA = os.environ.get("SEQGEN_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def shared_data():
    """Path of ../shared/data (or $SEQGEN_DATA); slow tests skip cleanly when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real data not found at {SHARED_DATA} (set SEQGEN_DATA)")
    return SHARED_DATA


def run_cli(*args, check=True, timeout=300, env=None, input=None):
    """Run `python -m seqgen.cli ARGS` in a subprocess; returns CompletedProcess."""
    import subprocess
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "seqgen.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"seqgen {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def write_tiny_captioner(path):
    """Save an untrained tiny captioning model (tiny CNN at 32px + GRU with Bahdanau attention) to `path`:
    its captions are nonsense, but deterministic. Returns `path`."""
    from seqgen.checkpoint import save_checkpoint
    from seqgen.decoders.rnn import DecoderConfig
    from seqgen.encoders.cnn import CNNEncoderConfig
    from seqgen.model import ModelConfig, Seq2Seq
    from seqgen.tokenizers import TextCodec
    torch.manual_seed(0)
    codec = TextCodec.build("word", ["a red circle left of a blue square", "a green triangle above a yellow dot"])
    model = Seq2Seq(ModelConfig(task="captioning", decoder=DecoderConfig(cell="gru", emb=16, hidden=32,
                                                                        attention="bahdanau", dropout=0.0),
                                image_encoder=CNNEncoderConfig(backbone="tiny", image_size=32, freeze=True)),
                    tgt=codec)
    save_checkpoint(str(path), model.to_payload())
    return path


def write_image_folder(folder, n):
    """Create `folder` with n 32x32 PNGs img000.png ... (a coloured disc on a plain background, seeded)."""
    import random

    from PIL import Image, ImageDraw
    folder.mkdir()
    rng = random.Random(1)
    for i in range(n):
        img = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        x, y = rng.randrange(20), rng.randrange(20)
        ImageDraw.Draw(img).ellipse((x, y, x + 12, y + 12), fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / f"img{i:03d}.png")
    return folder
