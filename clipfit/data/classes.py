"""Labelled image folders: one sub-folder per class. The conventions that training on one
(`clipfit refine --layout classes`, clipfit.data.layouts.read_classes) and measuring on one
(`clipfit eval zeroshot folder`, clipfit.eval.datasets) share, so both find the same classes, names and prompts:

  classes    the sub-folders of ROOT, sorted by name (torchvision's ImageFolder order), hidden ones
             left out; a class's name is its folder's name with `_` read as a space, unless a
             class-names file gives the names, one per line in that order.
  templates  prompts with `{c}` where the class name goes (CLIP_benchmark's convention): a
             templates file, else ROOT/templates.txt, else open_clip's 80 OpenAI ImageNet templates.

Which files inside a class folder are images differs: training takes clipfit's image types
(clipfit.data.images.IMAGE_EXTENSIONS, GIF included) and skips hidden files (e.g. macOS `._x.jpg`),
while evaluation lists files as torchvision's ImageFolder does (TIFF, PPM and PGM too, hidden files
included), so its numbers are CLIP_benchmark's. A folder of JPEG/PNG/WebP/BMP images reads alike.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from clipfit.data.text import caption_lines
from clipfit.errors import UsageError

FOLDER_TEMPLATES = "templates.txt"  # a folder's own prompts, beside its class folders


def default_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]


def read_list(path: str | Path, what: str) -> list[str]:
    """A JSON list of strings, or one entry per non-blank line (\\n or \\r\\n ends a line, nothing else)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UsageError(f"{path}: cannot read {what} file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: {what} file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: {what} file is not valid JSON (line {e.lineno}: {e.msg})") from None
        if not all(isinstance(item, str) for item in items):
            raise UsageError(f"{path}: {what} file must be a JSON list of strings")
    else:
        items = caption_lines(text)
    if not items:
        raise UsageError(f"{path}: {what} file is empty")
    return items


def read_templates(path: str | Path) -> list[str]:
    templates = read_list(path, "templates")
    missing = [t for t in templates if "{c}" not in t]
    if missing:
        raise UsageError(f"{path}: template {missing[0]!r} has no {{c}} where the class name goes")
    return templates


def fill(template: str, classname: str) -> str:
    # replace, not str.format: a template may hold other braces
    return template.replace("{c}", classname)


def class_folders(root: Path) -> list[str]:
    """The class sub-folders of `root`, sorted by name; hidden ones (.cache, .git) are not classes."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def class_name(folder: str) -> str:
    """What the prompts call a class folder: `red_apple` is "red apple"."""
    return folder.replace("_", " ")


def class_names(root: Path, folders: list[str], classnames_file: str | Path | None) -> list[str]:
    """The folders' class names, or the file's (one per folder, in sorted folder order)."""
    if classnames_file is None:
        return [class_name(folder) for folder in folders]
    names = read_list(classnames_file, "class names")
    if len(names) != len(folders):
        raise UsageError(f"--classnames has {len(names)} names but {root} has {len(folders)} class folders")
    return names


def folder_templates(root: Path, templates_file: str | Path | None) -> list[str]:
    """--templates FILE, else the folder's own templates.txt, else open_clip's 80 templates."""
    if templates_file is not None:
        return read_templates(templates_file)
    own = root / FOLDER_TEMPLATES
    return read_templates(own) if own.is_file() else default_templates()


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held out): about `fraction` of each class held out, at least one where a
    class has two or more images."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(seed)
    kept, held = [], []
    for label in sorted(by_class):
        members = by_class[label][:]
        rng.shuffle(members)
        n_held = min(len(members) - 1, max(1, round(len(members) * fraction))) if len(members) > 1 else 0
        held += members[:n_held]
        kept += members[n_held:]
    return sorted(kept), sorted(held)
