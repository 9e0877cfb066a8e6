"""Build a tiny ImageNet ImageFolder from the 20 sample photos that foolbox ships.

Source:   PyPI package `foolbox==3.3.4` (its foolbox/data/imagenet_<nn>_<label>.jpg files;
          the label is the ImageNet-1k class index)
Install:  pip install --no-deps foolbox==3.3.4
          (only its data files are read; foolbox is never imported, so its own deps are not needed)
Licence:  the foolbox package is MIT. The photos are ImageNet samples; their copyright stays with
          their owners, so use this folder for smoke tests only and do not redistribute it.

It exists to smoke-test `clipfit eval zeroshot imagenet` offline: 20 images are far too few
to measure anything. Folder names are WordNet synset ids (n01440764...) in the standard
ImageNet-1k order, taken from timm's ImageNet metadata; class names for prompts come from
open_clip's IMAGENET_CLASSNAMES in the same order.

Output: OUT/<synset>/imagenet_<nn>_<label>.jpg (copied unchanged)

Usage: python examples/datasets/imagenet_samples.py OUT
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

from common import fresh_output, report

INSTALL = "pip install --no-deps foolbox==3.3.4"
SAMPLE = re.compile(r"imagenet_\d+_(\d+)\.jpg")


def foolbox_samples() -> list[Path]:
    spec = find_spec("foolbox")  # locate without importing: foolbox's imports need eagerpy etc.
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"foolbox is not installed; install it with: {INSTALL}")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return sorted(p for p in data.glob("imagenet_*.jpg") if SAMPLE.fullmatch(p.name))


def imagenet_synsets() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_label_name(i) for i in range(info.num_classes())]


def build(out: Path, force: bool) -> None:
    samples = foolbox_samples()
    synsets = imagenet_synsets()
    fresh_output(out, force)
    for path in samples:
        label = int(SAMPLE.fullmatch(path.name).group(1))
        folder = out / synsets[label]
        folder.mkdir(exist_ok=True)
        shutil.copyfile(path, folder / path.name)
    report(out, {"held-out images": len(samples), "classes": len({p.parent for p in out.rglob("*.jpg")})})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    args = parser.parse_args(argv)
    build(args.out, args.force)


if __name__ == "__main__":
    sys.exit(main())
