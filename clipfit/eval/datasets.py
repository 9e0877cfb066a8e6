"""Labelled image sets for zero-shot classification and linear probes, in their usual on-disk form.

  imagenet  an ImageFolder of the ILSVRC-2012 validation set: one folder per WordNet synset
            (n01440764, ...). All 1000 folders sorted by name give the standard class order (as
            torchvision's ImageFolder); a subset of them is placed by clipfit/assets/imagenet_synsets.txt.
  cifar10, cifar100
            torchvision's on-disk format (cifar-10-batches-py/, cifar-100-python/) in PATH;
            never downloaded. The test split is evaluated.
  folder    an ImageFolder of your own: class names are the folder names (sorted), unless
            --classnames FILE gives them in that order.
  imagenet-v2, imagenet-sketch, imagenet-r, imagenet-a, objectnet
            ImageNet's distribution shifts: clipfit.eval.shifts.

Class names and templates are CLIP_benchmark's (clipfit.eval.catalog): ImageNet's class names and
80 templates, CIFAR's own 18 templates with torchvision's class names; a folder set uses
ROOT/templates.txt, else ImageNet's templates. Templates mark the class name with {c}
(CLIP_benchmark's convention). --classnames and --templates override them.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from clipfit.eval.catalog import (BENCHMARK_NAMES, DATASETS, SHIFTS, Found, benchmark_classnames, benchmark_templates,
                                  dataset_names, imagenet_synsets)
from clipfit.errors import DataError, UsageError

SYNSET = re.compile(r"n\d{8}")
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


@dataclass
class LabelledImages:
    """Images with integer labels; `images` are paths (or in-memory PIL images).

    The zero-shot classifier has one row per name in `classes`. Usually label k is row k; where
    `groups` is given (ImageNet's shifts), label k is the k-th group and scores as the largest of
    its rows (a 200-class mask, ObjectNet's classes pooled from ImageNet's)."""

    name: str  # CLIP_benchmark's dataset name, or the folder name
    key: str  # identity for the feature cache
    images: list
    labels: list[int]
    classes: list[str]
    templates: list[str]
    load: Callable  # image entry → PIL image
    groups: list[list[int]] | None = None
    sources: dict[str, str] = field(default_factory=dict)  # where classes and templates come from

    @property
    def class_count(self) -> int:
        """How many classes an image is told apart from."""
        return len(self.groups) if self.groups is not None else len(self.classes)

    def subset(self, indices: list[int], suffix: str) -> "LabelledImages":
        return replace(self, key=f"{self.key}#{suffix}", images=[self.images[i] for i in indices],
                       labels=[self.labels[i] for i in indices])

    def features(self, encoder):
        """(normalised image embeddings, labels) through `encoder` (clipfit.eval.encode.Encoder)."""
        import torch

        return encoder.images(self.images, self.load, self.key), torch.tensor(self.labels)


def pil_rgb(path) -> "object":
    """torchvision's ImageFolder loader, for parity with CLIP_benchmark on benchmark sets."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def identity(image):
    return image


def default_templates() -> list[str]:
    """CLIP_benchmark's templates for a set without its own: ImageNet's 80 (OpenAI's)."""
    return benchmark_templates(BENCHMARK_NAMES["imagenet"]).items


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
    images, labels = class_images(root, folders)
    if not images:
        raise DataError(f"{root}: no images in class sub-folders (an ImageFolder holds ROOT/<class>/<image>)")
    return folders, images, labels


def class_images(root: Path, folders: list[str]) -> tuple[list[Path], list[int]]:
    """The image files under each class folder (label k: folders[k]), in torchvision's ImageFolder order."""
    images, labels = [], []
    for label, folder in enumerate(folders):
        found = [Path(dirpath) / name for dirpath, _, files in sorted(os.walk(root / folder, followlinks=True))
                 for name in sorted(files) if name.lower().endswith(FOLDER_EXTENSIONS)]
        images += found
        labels += [label] * len(found)
    return images, labels


def imagenet_indices(synsets: list[str], root: Path, dataset: str = "imagenet") -> list[int]:
    """Standard ImageNet-1k index of each synset folder."""
    bad = [s for s in synsets if not SYNSET.fullmatch(s)]
    if bad:
        raise DataError(f"{root}: {dataset} needs WordNet synset folder names like n01440764, found {bad[0]!r}")
    index = {synset: i for i, synset in enumerate(imagenet_synsets())}
    unknown = [s for s in synsets if s not in index]
    if unknown:
        raise DataError(f"{root}: {unknown[0]} is not an ImageNet-1k synset")
    return [index[s] for s in synsets]


def imagenet_classified(name: str, key: str, images: list, labels: list[int], load: Callable,
                        groups: list[list[int]] | None = None) -> LabelledImages:
    """A set scored by ImageNet's zero-shot classifier: CLIP_benchmark's 1,000 class names and 80 templates."""
    classes = benchmark_classnames(BENCHMARK_NAMES["imagenet"])
    templates = benchmark_templates(BENCHMARK_NAMES["imagenet"])
    return LabelledImages(name, key, images, labels, classes.items, templates.items, load, groups,
                          {"classnames": classes.source, "templates": templates.source})


def load_imagenet(root: Path) -> LabelledImages:
    synsets, images, labels = image_folder(root)
    indices = imagenet_indices(synsets, root)
    return imagenet_classified(BENCHMARK_NAMES["imagenet"], str(root.resolve()), images,
                               [indices[label] for label in labels], pil_rgb)


def load_cifar(name: str, root: Path) -> LabelledImages:
    from torchvision import datasets

    make = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        data = make(str(root), train=False, download=False)
    except RuntimeError:
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        raise DataError(f"{root}: no {name} test set here (torchvision's {folder}/ folder); clipfit never downloads it") from None
    images = [data[i][0] for i in range(len(data))]
    templates = benchmark_templates(BENCHMARK_NAMES[name])
    return LabelledImages(name, f"{name}:{root.resolve()}", images, list(data.targets), list(data.classes),
                          templates.items, identity,
                          sources={"classnames": f"torchvision {make.__name__}.classes", "templates": templates.source})


FOLDER_TEMPLATES = "templates.txt"  # a folder set's own prompts, beside its class folders


def load_folder(root: Path) -> LabelledImages:
    from clipfit.data.images import open_rgb

    folders, images, labels = image_folder(root)
    own = root / FOLDER_TEMPLATES
    templates = Found(read_templates(own), str(own)) if own.is_file() else benchmark_templates(BENCHMARK_NAMES["imagenet"])
    return LabelledImages(root.resolve().name, str(root.resolve()), images, labels, folders, templates.items, open_rgb,
                          sources={"classnames": "the class folders' names", "templates": templates.source})


def load_labelled(dataset: str, path: str | Path, classnames_file: str | None = None,
                  templates_file: str | None = None) -> LabelledImages:
    """One of DATASETS at `path`, with --classnames/--templates overrides applied."""
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}: choose one of {dataset_names()}")
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if dataset == "imagenet":
        data = load_imagenet(root)
    elif dataset in ("cifar10", "cifar100"):
        data = load_cifar(dataset, root)
    elif dataset in SHIFTS:
        from clipfit.eval.shifts import load_shift

        data = load_shift(dataset, root)
    else:
        data = load_folder(root)
    return overridden(data, f"{dataset} at {root}", classnames_file, templates_file)


def overridden(data, where: str, classnames_file: str | None, templates_file: str | None):
    """`data` (a LabelledImages or a clipfit.eval.wds.WdsSet) with --classnames and --templates applied."""
    if classnames_file:
        classnames = read_list(classnames_file, "class names")
        if len(classnames) != len(data.classes):
            raise UsageError(f"--classnames has {len(classnames)} names but {where} has {len(data.classes)} classes")
        data.classes = classnames
        data.sources["classnames"] = f"--classnames {classnames_file}"
    if templates_file:
        data.templates = read_templates(templates_file)
        data.sources["templates"] = f"--templates {templates_file}"
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
