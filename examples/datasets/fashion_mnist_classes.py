"""Build a labelled training folder (one sub-folder per class) from the Fashion-MNIST training split.

Source:   Debian package `dataset-fashion-mnist` (Zalando Research; 70k 28x28 greyscale
          images of 10 kinds of clothing; files in /usr/share/datasets/fashion-mnist)
Install:  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist
Licence:  MIT (Expat), Copyright 2017 Zalando SE; see /usr/share/doc/dataset-fashion-mnist/copyright

Only the official 60k training split is read, with fashion_mnist.py's reader: the starter is
never aligned on Fashion-MNIST, and fashion_mnist.py's held-out zero-shot folder comes from the
test split, so the two never share an image. Folder names are the class names with `_` for a
space, the convention of `clipfit refine --layout classes` ("t-shirt_or_top" is prompted as
"t-shirt or top").

Output: OUT/<class folder>/<training index>.png, --per-class images per class (default 20),
        picked with a fixed seed, and OUT/ATTRIBUTION (source, licence, and where each file
        comes from). `examples/classes/` is this script's output with the defaults.

Usage: python examples/datasets/fashion_mnist_classes.py OUT [--per-class 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from common import DEFAULT_SEED, fresh_output, report
from fashion_mnist import CLASS_NAMES, IMAGE_MAGIC, INSTALL, LABEL_MAGIC, SOURCE, chosen_indices, read_idx


def folder_name(class_name: str) -> str:
    return class_name.replace(" ", "_")


LICENCE = """\
Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def attribution(out: Path, files: list[tuple[str, int]], per_class: int, seed: int) -> str:
    listing = "\n".join(f"  {name:<28} <- dataset-fashion-mnist:train-images-idx3-ubyte.gz image {index}"
                         for name, index in files)
    return f"""\
{out.name}: {len(files)} Fashion-MNIST training images, {per_class} of each of its 10 classes, one
sub-folder per class (the layout `clipfit refine --layout classes` reads)

Source
  Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, https://github.com/zalandoresearch/fashion-mnist),
  training split, as packaged by Debian in `dataset-fashion-mnist`
  (sudo apt-get install -y dataset-fashion-mnist; files under {SOURCE}).

Changes
  None to the pixels: each 28x28 greyscale image is written as a PNG, into the folder of its
  label. Written by examples/datasets/fashion_mnist_classes.py (--per-class {per_class} --seed {seed}).

Licence (MIT, Expat)
{LICENCE}
Files (example <- source)
{listing}
"""


def build(out: Path, per_class: int, seed: int, force: bool) -> None:
    images_file, labels_file = SOURCE / "train-images-idx3-ubyte.gz", SOURCE / "train-labels-idx1-ubyte.gz"
    if not images_file.is_file() or not labels_file.is_file():
        raise SystemExit(f"Fashion-MNIST not found in {SOURCE}; install it with: {INSTALL}")
    images, labels = read_idx(images_file, IMAGE_MAGIC), read_idx(labels_file, LABEL_MAGIC)
    fresh_output(out, force)
    files = []
    for index in chosen_indices(labels, per_class, seed):
        name = f"{folder_name(CLASS_NAMES[labels[index]])}/{index:05d}.png"
        (out / name).parent.mkdir(exist_ok=True)
        Image.fromarray(images[index], mode="L").save(out / name, optimize=True)
        files.append((name, int(index)))
    (out / "ATTRIBUTION").write_text(attribution(out, files, per_class, seed), encoding="utf-8")
    report(out, {"training images": sum(1 for _ in out.rglob("*.png")), "classes": len(CLASS_NAMES)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=20, help="images per class")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    args = parser.parse_args(argv)
    build(args.out, args.per_class, args.seed, args.force)


if __name__ == "__main__":
    sys.exit(main())
