"""Build a zero-shot ImageFolder from the Fashion-MNIST test set packaged by Debian.

Source:   Debian package `dataset-fashion-mnist` (Zalando Research; 70k 28x28 greyscale
          images of 10 kinds of clothing; files in /usr/share/datasets/fashion-mnist)
Install:  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist
Licence:  MIT (Expat), Copyright 2017 Zalando SE; see /usr/share/doc/dataset-fashion-mnist/copyright

Only the official 10k test split is read, and the starter is never aligned on Fashion-MNIST,
so everything written is held out. Folder names are the class names the zero-shot prompts use
("T-shirt/top" becomes "t-shirt or top": a folder name cannot hold a slash).

Output: OUT/<class name>/<test index>.png, --per-class images per class (default 100),
        picked with a fixed seed.

Usage: python examples/datasets/fashion_mnist.py OUT [--per-class 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common import DEFAULT_SEED, fresh_output, report

SOURCE = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
CLASS_NAMES = (  # label order of the dataset
    "t-shirt or top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The IDX format: big-endian magic, dimension sizes, then unsigned bytes."""
    data = gzip.decompress(path.read_bytes())
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise SystemExit(f"{path}: not an IDX file of the expected kind (magic {found}, wanted {magic})")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def chosen_indices(labels: np.ndarray, per_class: int | None, seed: int) -> list[int]:
    rng = random.Random(seed)
    chosen = []
    for label in range(len(CLASS_NAMES)):
        indices = np.flatnonzero(labels == label).tolist()
        chosen += sorted(rng.sample(indices, per_class)) if per_class and per_class < len(indices) else indices
    return chosen


def build(out: Path, per_class: int | None, seed: int, force: bool) -> None:
    images_file, labels_file = SOURCE / "t10k-images-idx3-ubyte.gz", SOURCE / "t10k-labels-idx1-ubyte.gz"
    if not images_file.is_file() or not labels_file.is_file():
        raise SystemExit(f"Fashion-MNIST not found in {SOURCE}; install it with: {INSTALL}")
    images, labels = read_idx(images_file, IMAGE_MAGIC), read_idx(labels_file, LABEL_MAGIC)
    fresh_output(out, force)
    for index in chosen_indices(labels, per_class, seed):
        folder = out / CLASS_NAMES[labels[index]]
        folder.mkdir(exist_ok=True)
        Image.fromarray(images[index], mode="L").save(folder / f"{index:05d}.png")
    report(out, {"held-out images": sum(1 for _ in out.rglob("*.png")), "classes": len(CLASS_NAMES)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=100, help="images per class; 0 for all 1000")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    args = parser.parse_args(argv)
    build(args.out, args.per_class or None, args.seed, args.force)


if __name__ == "__main__":
    sys.exit(main())
