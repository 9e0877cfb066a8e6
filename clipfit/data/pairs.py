"""What every data layout reads into: pairs of an image and its captions, the set of them a folder
holds, and the problems met on the way (clipfit.data.layouts and clipfit.data.tables build them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    image: Path  # or a clipfit.data.tables.TableImage: an image inside a table row, read when decoded
    captions: tuple[str, ...]
    key: str  # path relative to the data folder: a stable identity for caches and reports
    stamp: tuple[int, int] | None = None  # (size, mtime_ns) when checked: see clipfit.data.dataset.open_checked
    label: int | None = None  # class index in a labelled folder: pairs of one class are positives of each other


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str


@dataclass(frozen=True)
class ClassSet:
    """A labelled folder's classes (clipfit.data.classes): `Pair.label` indexes them; every image of
    class i has the captions `templates` filled with `names[i]`."""

    names: tuple[str, ...]  # what the captions call each class
    folders: tuple[str, ...]  # the class sub-folders, sorted: class i is folders[i]
    templates: tuple[str, ...]  # `{c}` marks the class name

    def to_json(self) -> dict:
        return {"names": list(self.names), "folders": list(self.folders), "templates": list(self.templates)}


@dataclass
class PairSet:
    root: Path
    layout: str
    pairs: list[Pair]
    problems: list[Problem] = field(default_factory=list)  # items that cannot be used
    warnings: list[Problem] = field(default_factory=list)  # items used, but worth knowing
    images_without_captions: list[str] = field(default_factory=list)
    captions_without_images: list[str] = field(default_factory=list)
    classes: ClassSet | None = None  # a labelled folder's (--layout classes); None for captioned layouts


def resolve_inside(root: Path, name: str) -> tuple[Path | None, str | None]:
    """Resolve a manifest path against root; refuse anything that escapes it."""
    try:
        candidate = (root / name).resolve()
    except RuntimeError:  # Python < 3.13 raises this for a symlink loop
        return None, f"symlink loop: {name}"
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        return None, f"unusable file name {name!r} ({e})"
    if not candidate.is_relative_to(root.resolve()):
        return None, f"path escapes the data folder: {name}"
    if not candidate.is_file():  # a pipe or device is never opened: reading it could block
        return None, f"not a regular file: {name}" if candidate.exists() else f"missing file: {name}"
    return candidate, None
