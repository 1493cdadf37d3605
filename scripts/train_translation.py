#!/usr/bin/env python
"""Train a translation model: the same flags and code as `seqgen train translation` (copy and adapt).

    python scripts/train_translation.py --src-train data/train.de --tgt-train data/train.en \\
        --src-valid data/val.de --tgt-valid data/val.en --out runs/de-en
    python scripts/train_translation.py --config runs/multi30k_de_en.yaml --out runs/de-en --time-budget 60
    python scripts/train_translation.py --out runs/de-en --resume

Flags: data (--src-train, --level, --vocab-size, --max-len, --max-tokens, --batch-size, ...), encoder (--enc-*),
decoder (--attention, --input-feeding, --hidden, ...), training (--lr, --max-steps, --eval-every, --patience,
--label-smoothing, --time-budget, ...) and validation decoding (--eval-beam, --eval-max-len, ...);
`--help` lists them all. Afterwards:

    seqgen translate runs/de-en/best.pt test.de > hyp.en
    seqgen evaluate runs/de-en/best.pt --src test.de --ref test.en
"""
import sys

from seqgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "translation", *sys.argv[1:]]))
