"""Labelled image sets for zero-shot classification and linear probes.

  imagenet  an ImageFolder of the ILSVRC-2012 validation set: one folder per WordNet synset
            (n01440764, ...). Class names and the 80 OpenAI prompt templates come from
            open_clip.zero_shot_metadata. All 1000 folders sorted by name give the standard
            class order (as torchvision's ImageFolder); a subset of them needs timm to look
            up each synset's index.
  cifar10, cifar100
            torchvision's on-disk format (cifar-10-batches-py/, cifar-100-python/) in PATH;
            never downloaded. The test split is evaluated.
  folder    an ImageFolder of your own: class names are the folder names (sorted, `_` read as a
            space), unless --classnames FILE gives them in that order; a training folder of
            `clipfit refine --layout classes` is read by the same conventions (clipfit.data.classes).

Templates mark the class name with {c} (CLIP_benchmark's convention). Without --templates,
every set uses open_clip's 80 OpenAI ImageNet templates (a folder: its templates.txt, if any).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clipfit.data.classes import (class_folders, class_names, default_templates, fill, folder_templates, read_list,
                                  read_templates, stratified_split)
from clipfit.errors import DataError, UsageError

__all__ = ["DATASETS", "LabelledImages", "load_labelled", "image_folder",
           # the conventions a labelled training folder shares (clipfit.data.classes)
           "default_templates", "fill", "read_list", "read_templates", "stratified_split"]

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


def image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class folders sorted by name and their image files, as torchvision's ImageFolder finds them."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    folders = class_folders(root)
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


def load_folder(root: Path, classnames_file: str | None) -> LabelledImages:
    from clipfit.data.images import open_rgb

    folders, images, labels = image_folder(root)
    return LabelledImages(root.resolve().name, str(root.resolve()), images, labels,
                          class_names(root, folders, classnames_file), folder_templates(root, None), open_rgb)


def load_labelled(dataset: str, path: str | Path, classnames_file: str | None = None,
                  templates_file: str | None = None) -> LabelledImages:
    """One of DATASETS at `path`, with --classnames/--templates overrides applied."""
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if dataset == "folder":
        data = load_folder(root, classnames_file)
    elif dataset == "imagenet":
        data = load_imagenet(root)
    else:
        data = load_cifar(dataset, root)
    if classnames_file and dataset != "folder":
        classnames = read_list(classnames_file, "class names")
        if len(classnames) != len(data.classes):
            raise UsageError(f"--classnames has {len(classnames)} names but {dataset} has {len(data.classes)} classes")
        data.classes = classnames
    if templates_file:
        data.templates = read_templates(templates_file)
    return data
