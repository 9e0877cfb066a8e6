"""Labelled image sets for zero-shot classification and linear probes.

  imagenet  an ImageFolder of the ILSVRC-2012 validation set: one folder per WordNet synset
            (n01440764, ...). Class names and the 80 OpenAI prompt templates come from
            open_clip.zero_shot_metadata. All 1000 folders sorted by name give the standard
            class order (as torchvision's ImageFolder); a subset of them needs timm to look
            up each synset's index.
  cifar10, cifar100
            torchvision's on-disk format (cifar-10-batches-py/, cifar-100-python/) in PATH;
            never downloaded. The test split is evaluated.
  folder    an ImageFolder of your own: class names are the folder names (sorted), unless
            --classnames FILE gives them in that order.

Templates mark the class name with {c} (CLIP_benchmark's convention). Without --templates,
every set uses open_clip's 80 OpenAI ImageNet templates.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clipfit.errors import DataError, UsageError

DATASETS = ("imagenet", "cifar10", "cifar100", "folder")
BENCHMARK_NAMES = {"imagenet": "imagenet1k", "cifar10": "cifar10", "cifar100": "cifar100"}  # CLIP_benchmark's
SYNSET = re.compile(r"n\d{8}")
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


@dataclass
class LabelledImages:
    """Images with integer labels into `classes`; `images` are paths (or in-memory PIL images)."""

    name: str  # CLIP_benchmark's dataset name, or the folder name
    key: str  # identity for the feature cache
    images: list
    labels: list[int]
    classes: list[str]
    templates: list[str]
    load: Callable  # image entry → PIL image

    def subset(self, indices: list[int], suffix: str) -> "LabelledImages":
        return LabelledImages(self.name, f"{self.key}#{suffix}", [self.images[i] for i in indices],
                              [self.labels[i] for i in indices], self.classes, self.templates, self.load)


def pil_rgb(path) -> "object":
    """torchvision's ImageFolder loader, for parity with CLIP_benchmark on benchmark sets."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def identity(image):
    return image


def default_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]


def read_list(path: str | Path, what: str) -> list[str]:
    """A JSON list of strings, or one entry per non-blank line (\\n or \\r\\n ends a line, nothing else)."""
    from clipfit.data.text import caption_lines

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UsageError(f"{path}: cannot read {what} file ({e.strerror or e})") from None
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


def image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class folders sorted by name and their image files, as torchvision's ImageFolder finds them."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    images, labels = [], []
    for label, folder in enumerate(folders):
        for dirpath, _, files in sorted(os.walk(root / folder, followlinks=True)):
            for name in sorted(files):
                if name.lower().endswith(FOLDER_EXTENSIONS):
                    images.append(Path(dirpath) / name)
                    labels.append(label)
    if not images:
        raise DataError(f"{root}: no images in class sub-folders (an ImageFolder holds ROOT/<class>/<image>)")
    return folders, images, labels


def imagenet_indices(synsets: list[str], root: Path) -> list[int]:
    """Standard ImageNet-1k index of each synset folder."""
    bad = [s for s in synsets if not SYNSET.fullmatch(s)]
    if bad:
        raise DataError(f"{root}: imagenet needs WordNet synset folder names like n01440764, found {bad[0]!r}")
    if len(synsets) == 1000:
        return list(range(1000))  # sorted synsets are the standard order
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        raise DataError(f"{root}: holds {len(synsets)} of the 1000 synset folders; a subset needs timm "
                        "(pip install timm) to know each synset's class index") from None
    info = ImageNetInfo()
    index = {info.index_to_label_name(i): i for i in range(info.num_classes())}
    unknown = [s for s in synsets if s not in index]
    if unknown:
        raise DataError(f"{root}: {unknown[0]} is not an ImageNet-1k synset")
    return [index[s] for s in synsets]


def load_imagenet(root: Path) -> LabelledImages:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    synsets, images, labels = image_folder(root)
    indices = imagenet_indices(synsets, root)
    return LabelledImages("imagenet1k", str(root.resolve()), images, [indices[label] for label in labels],
                          list(IMAGENET_CLASSNAMES), default_templates(), pil_rgb)


def load_cifar(name: str, root: Path) -> LabelledImages:
    from torchvision import datasets

    make = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        data = make(str(root), train=False, download=False)
    except RuntimeError:
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        raise DataError(f"{root}: no {name} test set here (torchvision's {folder}/ folder); clipfit never downloads it") from None
    images = [data[i][0] for i in range(len(data))]
    return LabelledImages(name, f"{name}:{root.resolve()}", images, list(data.targets), list(data.classes),
                          default_templates(), identity)


def load_folder(root: Path, classnames: list[str] | None) -> LabelledImages:
    from clipfit.data.images import open_rgb

    folders, images, labels = image_folder(root)
    if classnames is not None and len(classnames) != len(folders):
        raise UsageError(f"--classnames has {len(classnames)} names but {root} has {len(folders)} class folders")
    return LabelledImages(root.resolve().name, str(root.resolve()), images, labels, classnames or folders,
                          default_templates(), open_rgb)


def load_labelled(dataset: str, path: str | Path, classnames_file: str | None = None,
                  templates_file: str | None = None) -> LabelledImages:
    """One of DATASETS at `path`, with --classnames/--templates overrides applied."""
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    classnames = read_list(classnames_file, "class names") if classnames_file else None
    if dataset == "imagenet":
        data = load_imagenet(root)
    elif dataset in ("cifar10", "cifar100"):
        data = load_cifar(dataset, root)
    else:
        data = load_folder(root, classnames)
    if classnames is not None and dataset != "folder":
        if len(classnames) != len(data.classes):
            raise UsageError(f"--classnames has {len(classnames)} names but {dataset} has {len(data.classes)} classes")
        data.classes = classnames
    if templates_file:
        data.templates = read_templates(templates_file)
    return data


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
