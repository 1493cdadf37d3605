#!/usr/bin/env python
"""Train a character-level language model (char-rnn style) on one text file.

    python scripts/train_charlm.py --text input.txt --out runs/charlm [--hidden 512 --layers 2 ...]
    python scripts/train_charlm.py --out runs/charlm --resume

The same as `seqgen train lm --level char` with char-rnn-like defaults (2-layer LSTM 512, sequences of 128
characters); any `seqgen train lm` flag can be added and wins over these defaults.
"""
import sys

from seqgen.cli import main

DEFAULTS = ["--level", "char", "--cell", "lstm", "--hidden", "512", "--emb", "512", "--layers", "2",
            "--dropout", "0.2", "--seq-len", "128", "--batch-size", "64", "--lr", "3e-3"]

if __name__ == "__main__":
    # argparse keeps the last occurrence of a flag, so the user's flags override DEFAULTS
    sys.exit(main(["train", "lm", *DEFAULTS, *sys.argv[1:]]))
