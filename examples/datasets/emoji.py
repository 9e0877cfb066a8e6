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

With --by category (or subcategory), the same split as class folders instead of pairs, a zero-shot
set (`--eval-zeroshot folder=OUT/heldout`): OUT/<split>/<class folder>/NAME.png, the folder being
emoji.json's category in lower case with `&` as "and" and `_` for a space ("Smileys & Emotion" is
smileys_and_emotion/, read as "smileys and emotion"), and OUT/<split>/templates.txt holding the
prompt "an emoji of {c}" the captions above are made with.

Usage: python examples/datasets/emoji.py OUT [--source DIR] [--seed 0] [--heldout 0.2] [--by category]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from common import (DEFAULT_HELDOUT_FRACTION, DEFAULT_SEED, HELDOUT, flatten_to_rgb, fresh_output, report, split_of,
                    write_pair)

DEFAULT_SOURCE = Path.home() / ".cache" / "clipfit" / "npm" / "node_modules" / "emoji-datasource-google"
INSTALL = "npm install --prefix ~/.cache/clipfit/npm emoji-datasource-google@16.0.0"
SKIPPED_CATEGORIES = ("Component",)
GROUPINGS = ("category", "subcategory")  # emoji.json's fields a --by output can use as classes
TEMPLATE = "an emoji of {c}"


def caption_of(entry: dict) -> str:
    return TEMPLATE.format(c=entry["name"].lower())


def class_folder(entry: dict, by: str) -> str:
    """The folder of the entry's category (or subcategory): lower case, "and" for `&`, `_` for a space."""
    return entry[by].lower().replace("&", "and").replace(" ", "_")


def usable(entry: dict, images: Path) -> bool:
    return (
        entry.get("has_img_google")
        and entry.get("category") not in SKIPPED_CATEGORIES
        and (images / entry["image"]).is_file()
    )


def write_image(out: Path, entry: dict, picture: Image.Image, by: str | None) -> None:
    """The emoji as a pair (by None) or as an image in its class folder."""
    name = entry["short_name"].replace("+", "plus")
    if by is None:
        write_pair(out, name, picture, [caption_of(entry)])
        return
    (out / class_folder(entry, by)).mkdir(parents=True, exist_ok=True)
    picture.save(out / class_folder(entry, by) / f"{name}.png", optimize=True)


def usable_entries(source: Path) -> tuple[list[dict], Path]:
    """The emoji built (emoji.json's entries with an image, skin-tone swatches left out) and the images' folder."""
    catalogue, images = source / "emoji.json", source / "img" / "google" / "64"
    if not catalogue.is_file() or not images.is_dir():
        raise SystemExit(f"{source} does not hold emoji-datasource-google; install it with: {INSTALL}")
    return [e for e in json.loads(catalogue.read_text(encoding="utf-8")) if usable(e, images)], images


def class_sizes(source: Path, by: str, seed: int = DEFAULT_SEED, heldout: float = DEFAULT_HELDOUT_FRACTION,
                split: str = HELDOUT) -> Counter:
    """Images per class folder in one split of a --by output, without building it."""
    entries, _ = usable_entries(source)
    return Counter(class_folder(e, by) for e in entries if split_of(e["unified"], seed, heldout) == split)


def build(out: Path, source: Path, seed: int, heldout: float, force: bool, by: str | None = None) -> None:
    entries, images = usable_entries(source)
    fresh_output(out, force)
    counts = Counter()
    for entry in entries:
        split = split_of(entry["unified"], seed, heldout)
        with Image.open(images / entry["image"]) as image:
            picture = flatten_to_rgb(image)
        write_image(out / split, entry, picture, by)
        counts[split] += 1
    if by is not None:
        for split in counts:
            (out / split / "templates.txt").write_text(TEMPLATE + "\n", encoding="utf-8")
    report(out, counts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the installed npm package folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--heldout", type=float, default=DEFAULT_HELDOUT_FRACTION, help="fraction held out")
    parser.add_argument("--by", choices=GROUPINGS, help="class folders of this emoji.json field instead of pairs")
    parser.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    args = parser.parse_args(argv)
    build(args.out, args.source, args.seed, args.heldout, args.force, args.by)


if __name__ == "__main__":
    sys.exit(main())
