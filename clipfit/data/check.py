"""Validate a pairs folder: which items are usable, and why the others are not.

Shared by `clipfit data check` (reports everything) and `clipfit refine` (skips or, with
--strict, refuses bad items before training starts).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipfit.data.images import DEFAULT_MAX_PIXELS, BadImage, open_rgb
from clipfit.data.layouts import Pair, PairSet, Problem, load_pairs
from clipfit.data.tokens import exceeds_context
from clipfit.errors import DataError
from clipfit.progress import track


@dataclass
class CheckReport:
    root: str
    layout: str
    usable: list[Pair]
    bad_images: list[Problem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    images_without_captions: list[str] = field(default_factory=list)
    captions_without_images: list[str] = field(default_factory=list)
    duplicate_images: list[list[str]] = field(default_factory=list)
    long_captions: int = 0
    context_length: int | None = None

    @property
    def skipped(self) -> list[Problem]:
        """Everything that will not be trained on, with its reason."""
        return self.problems + self.bad_images

    def summary(self) -> dict:
        return {
            "pairs_found": len(self.usable) + len(self.bad_images),
            "usable_pairs": len(self.usable),
            "unreadable_images": len(self.bad_images),
            "other_problems": len(self.problems),
            "images_without_captions": len(self.images_without_captions),
            "captions_without_images": len(self.captions_without_images),
            "duplicate_image_groups": len(self.duplicate_images),
            "captions_over_context": self.long_captions,
            "warnings": len(self.warnings),
        }

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "layout": self.layout,
            "context_length": self.context_length,
            "summary": self.summary(),
            "bad_images": [asdict(p) for p in self.bad_images],
            "problems": [asdict(p) for p in self.problems],
            "warnings": [asdict(p) for p in self.warnings],
            "images_without_captions": self.images_without_captions,
            "captions_without_images": self.captions_without_images,
            "duplicate_images": self.duplicate_images,
        }


def decode_or_reason(pair: Pair, max_pixels: int) -> str | None:
    try:
        open_rgb(pair.image, max_pixels)
    except BadImage as e:
        return str(e)
    except (OSError, DataError) as e:  # DataError: the table holding the image cannot be opened
        return f"cannot read: {getattr(e, 'strerror', None) or e}"
    return None


def split_decodable(pairs: list[Pair], max_pixels: int, workers: int = 4) -> tuple[list[Pair], list[Problem]]:
    """Decode every image once (threads: Pillow releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(track(pool.map(lambda p: decode_or_reason(p, max_pixels), pairs), "checking images",
                             len(pairs), size=lambda _reason: 1))
    good = [p for p, r in zip(pairs, reasons) if r is None]
    bad = [Problem(str(p.image), r) for p, r in zip(pairs, reasons) if r is not None]
    return good, bad


def duplicate_groups(pairs: list[Pair]) -> list[list[str]]:
    by_digest: dict[str, list[str]] = defaultdict(list)
    for pair in pairs:
        by_digest[hashlib.sha1(pair.image.read_bytes()).hexdigest()].append(pair.key)
    return [keys for keys in by_digest.values() if len(keys) > 1]


def count_long_captions(pairs: list[Pair], context_length: int) -> int:
    return sum(exceeds_context(c, context_length) for p in pairs for c in p.captions)


def check_pairset(
    pairset: PairSet,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    context_length: int | None = None,
    find_duplicates: bool = True,
    workers: int = 4,
) -> CheckReport:
    good, bad = split_decodable(pairset.pairs, max_pixels, workers)
    report = CheckReport(
        root=str(pairset.root),
        layout=pairset.layout,
        usable=good,
        bad_images=bad,
        problems=list(pairset.problems),
        warnings=list(pairset.warnings),
        images_without_captions=list(pairset.images_without_captions),
        captions_without_images=list(pairset.captions_without_images),
        context_length=context_length,
    )
    if find_duplicates:
        report.duplicate_images = duplicate_groups(good)
    if context_length:
        report.long_captions = count_long_captions(good, context_length)
    return report


def check_folder(path: str | Path, layout: str = "auto", csv_img_key: str = "filepath",
                 csv_caption_key: str = "title", image_column: str | None = None,
                 caption_column: str | None = None, **kwargs) -> CheckReport:
    return check_pairset(load_pairs(path, layout, csv_img_key, csv_caption_key, image_column, caption_column),
                         **kwargs)
