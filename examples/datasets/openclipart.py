"""Build a captioned pairs folder from the Open Clip Art Library images packaged by Debian.

Source:   Debian package `openclipart-png` (0.18; ~8.1k PNG clip-art images in category folders)
Install:  sudo apt-get update && sudo apt-get install -y openclipart-png
Licence:  public domain (Creative Commons Public Domain Dedication; see
          /usr/share/doc/openclipart-png/copyright)

Captions come from the cleaned file name and the category path, e.g.
    animals/bugs/ladybug_01.png  ->  "clip art of a ladybug, animals / bugs"
File names are "<title>_<author>_<nn>" cut to 24 characters; author names are recognised as
the word runs that end many different titles and are dropped, so some captions keep a
fragment of a rare author's name.

Output (sidecar layout, NAME.png + NAME.txt, images flattened on white and shrunk to 256 px):
    OUT/align/...     for aligning the starter model
    OUT/heldout/...   20% by a seeded hash of the image bytes: evaluation only
Byte-identical copies (the package files some images under two categories) are written once.
Images that examples/pairs was made from (listed in its ATTRIBUTION) are left out of both, so
the example folder stays unseen by the starter.

Usage: python examples/datasets/openclipart.py OUT [--seed 0] [--heldout 0.2] [--limit N]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

from common import DEFAULT_HELDOUT_FRACTION, DEFAULT_SEED, flatten_to_rgb, fresh_output, report, shrink, split_of, write_pair

SOURCE = Path("/usr/share/openclipart/png")
INSTALL = "sudo apt-get update && sudo apt-get install -y openclipart-png"
EXAMPLE_ATTRIBUTION = Path(__file__).resolve().parents[1] / "pairs" / "ATTRIBUTION"
# Near-identical generated images (1.4k stars, gradients, tilings) or copies: they would
# teach nothing and swamp the rest.
SKIPPED_FOLDERS = ("shapes/stars", "special/gradients", "special/patterns", "unsorted/duplicates")
NAME_BODY = 24  # openclipart 0.18 cut "<title>_<author>" to this many characters
AUTHOR_MIN_FILES = 3


def words_of(stem: str) -> list[str]:
    """File-name words, without the trailing copy number ("_01", "_02b") or empty parts."""
    stem = re.sub(r"_\d{1,2}[a-z]?$", "", stem)
    return [w for w in re.split(r"[_\-\s]+", stem.lower()) if w]


def author_tails(stems: list[str]) -> set[tuple[str, ...]]:
    """Word runs that end the names of several different titles: authors' names."""
    titles_by_tail: dict[tuple[str, ...], set[tuple[str, ...]]] = defaultdict(set)
    for stem in stems:
        words = words_of(stem)
        for start in range(1, len(words)):
            titles_by_tail[tuple(words[start:])].add(tuple(words[:start]))
    return {tail for tail, titles in titles_by_tail.items() if len(titles) >= AUTHOR_MIN_FILES}


def author_first_words(tails: set[tuple[str, ...]]) -> set[str]:
    starts = Counter(tail[0] for tail in tails if len(tail) >= 2)
    return {word for word, count in starts.items() if count >= 2 and len(word) >= 3}


def is_author_tail(tail: tuple[str, ...], tails, first_words, name_length: int) -> bool:
    if tail in tails and (len(tail) >= 2 or tail[0] in first_words):
        return True
    # A known author's first name cut short, in a name that ran into the length limit.
    cut_short = name_length >= NAME_BODY - 1 and len(tail) <= 2 and len(tail[0]) >= 3
    return cut_short and any(name.startswith(tail[0]) for name in first_words)


def title_of(stem: str, tails, first_words) -> str:
    words = words_of(stem)
    name_length = len("_".join(words))
    for start in range(1, len(words)):
        if is_author_tail(tuple(words[start:]), tails, first_words, name_length):
            words = words[:start]
            break
    words = [w for w in words if not re.fullmatch(r"0\d", w)]  # "dog_01_..." numbering
    return " ".join(words)


def with_article(title: str) -> str:
    if title[:1].isdigit():
        return title
    return f"{'an' if title[:1] in 'aeiou' else 'a'} {title}"


def category_of(relative: Path) -> str:
    return " / ".join(part.replace("_", " ") for part in relative.parent.parts)


def caption_of(relative: Path, tails, first_words) -> str:
    title = title_of(relative.stem, tails, first_words) or relative.stem.replace("_", " ")
    category = category_of(relative)
    return f"clip art of {with_article(title)}, {category}" if category else f"clip art of {with_article(title)}"


def example_sources() -> set[str]:
    """Source paths (relative to SOURCE) that examples/pairs was made from."""
    if not EXAMPLE_ATTRIBUTION.is_file():
        return set()
    return set(re.findall(r"openclipart-png:(\S+\.png)", EXAMPLE_ATTRIBUTION.read_text(encoding="utf-8")))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unique_files(files: list[Path]) -> dict[str, Path]:
    """One file per distinct content: the package files many images under two categories.

    The copy in the deepest category folder is kept, as its caption says the most.
    """
    chosen: dict[str, Path] = {}
    for path in files:
        digest = file_digest(path)
        if digest not in chosen or len(path.parts) > len(chosen[digest].parts):
            chosen[digest] = path
    return chosen


def source_files() -> list[Path]:
    files = sorted(SOURCE.rglob("*.png"))
    return [p for p in files if not any(p.relative_to(SOURCE).as_posix().startswith(f + "/") for f in SKIPPED_FOLDERS)]


def output_name(relative: Path) -> str:
    return relative.with_suffix("").as_posix().replace("/", "__")


def build(out: Path, seed: int, heldout: float, limit: int | None, force: bool) -> None:
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} not found; install it with: {INSTALL}")
    by_digest = unique_files(source_files())
    # The example images, and every copy of them, stay out of both splits.
    example_digests = {file_digest(SOURCE / name) for name in example_sources() if (SOURCE / name).is_file()}
    kept = sorted((path, digest) for digest, path in by_digest.items() if digest not in example_digests)[:limit]
    stems = [p.stem for p in SOURCE.rglob("*.png")]
    tails = author_tails(stems)
    first_words = author_first_words(tails)
    fresh_output(out, force)
    counts = Counter()
    for path, digest in kept:
        relative = path.relative_to(SOURCE)
        # Split on content, not path, so no image can sit on both sides under two names.
        split = split_of(digest, seed, heldout)
        try:
            with Image.open(path) as image:
                picture = shrink(flatten_to_rgb(image))
        except (OSError, Image.DecompressionBombError) as error:
            # One poster is 231 megapixels; better to skip it than to lift Pillow's guard.
            print(f"skipped {relative}: {error}", file=sys.stderr)
            counts["skipped (unreadable or oversized)"] += 1
            continue
        write_pair(out / split, output_name(relative), picture, [caption_of(relative, tails, first_words)])
        counts[split] += 1
    skipped = len(example_digests & set(by_digest))
    report(out, {**counts, "left out as examples/pairs sources": skipped})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--heldout", type=float, default=DEFAULT_HELDOUT_FRACTION, help="fraction held out")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (for a quick look)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    args = parser.parse_args(argv)
    build(args.out, args.seed, args.heldout, args.limit, args.force)


if __name__ == "__main__":
    sys.exit(main())
