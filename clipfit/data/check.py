"""Validate a pairs folder: which items are usable, and why the others are not.

Shared by `clipfit data check` (reports everything) and `clipfit refine` (skips or, with
--strict, refuses bad items before training starts).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from clipfit.data.images import DEFAULT_MAX_PIXELS, BadImage, file_stamp, open_rgb
from clipfit.data.pairs import ClassSet, Pair, PairSet, Problem
from clipfit.data.layouts import load_pairs
from clipfit.data.tokens import count_tokens, exceeds_context
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
    long_captions: list[Problem] = field(default_factory=list)  # used, but truncated in training
    context_length: int | None = None
    classes: ClassSet | None = None  # a labelled folder's classes (--layout classes)
    class_images: list[int] = field(default_factory=list)  # usable images of each class

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
            "captions_over_context": len(self.long_captions),
            "warnings": len(self.warnings),
            **({"classes": len(self.class_images), "empty_classes": self.class_images.count(0)} if self.classes else {}),
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
            "long_captions": [asdict(p) for p in self.long_captions],
            **({"classes": self.class_table()} if self.classes else {}),
        }

    def class_table(self) -> list[dict]:
        """Per class: its name, its folder and how many usable images it has."""
        return [{"name": name, "folder": folder, "images": count}
                for name, folder, count in zip(self.classes.names, self.classes.folders, self.class_images)]

    def sections(self) -> list[tuple[str, list[Problem]]]:
        """Every item worth a look, by kind, as (kind, [(file, reason)]): what `data check` prints."""
        return [
            ("unreadable image", self.bad_images),
            ("bad item", self.problems),
            ("image without caption", [Problem(p, "no caption: skipped") for p in self.images_without_captions]),
            ("caption without image", [Problem(p, "no image of the same name: ignored")
                                       for p in self.captions_without_images]),
            ("caption too long", self.long_captions),
            ("duplicate images", [Problem(", ".join(group), "same bytes: both are trained on")
                                  for group in self.duplicate_images]),
            ("warning", self.warnings),
        ]


def decode_or_reason(pair: Pair, max_pixels: int) -> Pair | str:
    """The pair stamped with its file's size and time as decoded, or why it cannot be used."""
    try:
        stamp = file_stamp(pair.image)
        open_rgb(pair.image, max_pixels)
    except BadImage as e:
        return str(e)
    except (OSError, DataError) as e:  # DataError: the table holding the image cannot be opened
        return f"cannot read: {getattr(e, 'strerror', None) or e}"
    return replace(pair, stamp=stamp)


def split_decodable(pairs: list[Pair], max_pixels: int, workers: int = 4) -> tuple[list[Pair], list[Problem]]:
    """Decode every image once (threads: Pillow releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(track(pool.map(lambda p: decode_or_reason(p, max_pixels), pairs), "checking images",
                             len(pairs), size=lambda _result: 1))
    good = [r for r in results if isinstance(r, Pair)]
    bad = [Problem(str(p.image), r) for p, r in zip(pairs, results) if isinstance(r, str)]
    return good, bad


def duplicate_groups(pairs: list[Pair]) -> list[list[str]]:
    by_digest: dict[str, list[str]] = defaultdict(list)
    for pair in pairs:
        by_digest[hashlib.sha1(pair.image.read_bytes()).hexdigest()].append(pair.key)
    return [keys for keys in by_digest.values() if len(keys) > 1]


def long_captions(pairs: list[Pair], context_length: int) -> list[Problem]:
    return [Problem(f"{p.key} (caption {i + 1} of {len(p.captions)})",
                    f"{count_tokens(c)} tokens, over the context length of {context_length}: truncated in training")
            for p in pairs for i, c in enumerate(p.captions) if exceeds_context(c, context_length)]


IMBALANCE_RATIO = 3  # largest class over smallest non-empty class above this: a warning


def class_warnings(root: str, classes: ClassSet, counts: list[int]) -> list[Problem]:
    """Empty classes, and a class imbalance over IMBALANCE_RATIO (largest / smallest non-empty class)."""
    warnings = [Problem(folder, "empty class: no usable image; it stays a class the classifier can predict")
                for folder, count in zip(classes.folders, counts) if count == 0]
    held = [(count, name) for count, name in zip(counts, classes.names) if count]
    (smallest, small), (largest, large) = min(held), max(held)
    if largest / smallest > IMBALANCE_RATIO:
        warnings.append(Problem(root, (
            f"class imbalance: {large!r} has {largest} images, {small!r} {smallest} (largest/smallest "
            f"{largest / smallest:.1f} > {IMBALANCE_RATIO}); large classes dominate the batches and top-1, "
            "mean_per_class_recall weighs every class alike")))
    return warnings


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
    if pairset.classes is not None and good:
        report.classes = pairset.classes
        report.class_images = [0] * len(pairset.classes.names)
        for pair in good:
            report.class_images[pair.label] += 1
        report.warnings += class_warnings(report.root, pairset.classes, report.class_images)
    if find_duplicates:
        report.duplicate_images = duplicate_groups(good)
    if context_length:
        report.long_captions = long_captions(good, context_length)
    return report


def check_folder(path: str | Path, layout: str = "auto", csv_img_key: str = "filepath",
                 csv_caption_key: str = "title", image_column: str | None = None,
                 caption_column: str | None = None, classnames: str | None = None, templates: str | None = None,
                 **kwargs) -> CheckReport:
    return check_pairset(load_pairs(path, layout, csv_img_key, csv_caption_key, image_column, caption_column,
                                    classnames, templates), **kwargs)
