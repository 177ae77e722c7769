"""A dataset the recipe was not tuned on, offline: scikit-learn's handwritten digits (1,797
8x8 greyscale scans, 10 classes, shipped inside scikit-learn) written as birdfg's folder layout.

    python benchmarks/digits_folder.py --out runs/digits-data
    python train.py --data runs/digits-data --preset lite --output runs/digits

Every class's photos are split 80 / 20 into train_images/ and val_images/ (a fixed seed), each
scan upscaled to 128 px (bicubic) and saved as an RGB PNG: the trunk's preprocessing resizes it
to its own input like any photo. No bird boxes, so no zoomed training views. scikit-learn comes
with requirements-dev.txt (pytorch-grad-cam needs it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 128


def write_folder(out: Path, val_share: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write train_images/<digit>/*.png and val_images/<digit>/*.png; returns the counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train_images": 0, "val_images": 0}
    for label in np.unique(digits.target):
        index = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = round(len(index) * val_share)
        for split, chosen in (("val_images", index[:n_val]), ("train_images", index[n_val:])):
            folder = out / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                scan = (digits.images[i] * (255 / 16)).astype(np.uint8)  # values 0..16
                Image.fromarray(scan).resize((SIDE, SIDE), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
            counts[split] += len(chosen)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the dataset folder to write (train.py --data)")
    args = p.parse_args(argv)
    if (args.out / "train_images").exists():
        print(f"error: {args.out / 'train_images'} exists; choose another --out or remove it", file=sys.stderr)
        return 2
    counts = write_folder(args.out)
    print(f"wrote {counts['train_images']} train and {counts['val_images']} val photos under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
