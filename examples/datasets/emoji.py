"""Build a captioned pairs folder from Google's Noto emoji as packaged on npm.

Source:   npm package `emoji-datasource-google` (16.0.0; 64x64 PNGs, emoji.json with name,
          category and subcategory of each emoji)
Install:  npm install --prefix ~/.cache/clipfit/npm emoji-datasource-google@16.0.0
          (into a cache folder, not this repository; pass its folder with --source if elsewhere)
Licence:  the Google/Noto images are Apache-2.0; emoji.json and the package are MIT
          (Cal Henderson, iamcal/emoji-data)

Captions are the emoji's Unicode name, e.g. "an emoji of egypt flag", "an emoji of grinning face".
The five skin-tone swatches (category "Component") are left out: they are not pictures of anything.

Output (sidecar layout, NAME.png + NAME.txt, flattened on white):
    OUT/align/...     for aligning the starter model
    OUT/heldout/...   20% by a seeded hash of the emoji's code points: evaluation only

Usage: python examples/datasets/emoji.py OUT [--source DIR] [--seed 0] [--heldout 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from common import DEFAULT_HELDOUT_FRACTION, DEFAULT_SEED, flatten_to_rgb, fresh_output, report, split_of, write_pair

DEFAULT_SOURCE = Path.home() / ".cache" / "clipfit" / "npm" / "node_modules" / "emoji-datasource-google"
INSTALL = "npm install --prefix ~/.cache/clipfit/npm emoji-datasource-google@16.0.0"
SKIPPED_CATEGORIES = ("Component",)


def caption_of(entry: dict) -> str:
    return f"an emoji of {entry['name'].lower()}"


def usable(entry: dict, images: Path) -> bool:
    return (
        entry.get("has_img_google")
        and entry.get("category") not in SKIPPED_CATEGORIES
        and (images / entry["image"]).is_file()
    )


def build(out: Path, source: Path, seed: int, heldout: float, force: bool) -> None:
    catalogue, images = source / "emoji.json", source / "img" / "google" / "64"
    if not catalogue.is_file() or not images.is_dir():
        raise SystemExit(f"{source} does not hold emoji-datasource-google; install it with: {INSTALL}")
    entries = [e for e in json.loads(catalogue.read_text(encoding="utf-8")) if usable(e, images)]
    fresh_output(out, force)
    counts = Counter()
    for entry in entries:
        split = split_of(entry["unified"], seed, heldout)
        with Image.open(images / entry["image"]) as image:
            picture = flatten_to_rgb(image)
        write_pair(out / split, entry["short_name"].replace("+", "plus"), picture, [caption_of(entry)])
        counts[split] += 1
    report(out, counts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the installed npm package folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--heldout", type=float, default=DEFAULT_HELDOUT_FRACTION, help="fraction held out")
    parser.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    args = parser.parse_args(argv)
    build(args.out, args.source, args.seed, args.heldout, args.force)


if __name__ == "__main__":
    sys.exit(main())
