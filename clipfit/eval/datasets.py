"""Labelled image sets for zero-shot classification and linear probes, in their usual on-disk form.

  imagenet  an ImageFolder of the ILSVRC-2012 validation set: one folder per WordNet synset
            (n01440764, ...). All 1000 folders sorted by name give the standard class order (as
            torchvision's ImageFolder); a subset of them is placed by clipfit/assets/imagenet_synsets.txt.
  cifar10, cifar100
            torchvision's on-disk format (cifar-10-batches-py/, cifar-100-python/) in PATH;
            never downloaded. The test split is evaluated.
  folder    an ImageFolder of your own: class names are the folder names (sorted, `_` read as a
            space), unless --classnames FILE gives them in that order; a training folder of
            `clipfit refine --layout classes` is read by the same conventions (clipfit.data.classes).
  imagenet-v2, imagenet-sketch, imagenet-r, imagenet-a, objectnet
            ImageNet's distribution shifts: clipfit.eval.shifts.

Class names and templates are CLIP_benchmark's (clipfit.eval.catalog): ImageNet's class names and
80 templates, CIFAR's own 18 templates with torchvision's class names; a folder set uses
ROOT/templates.txt, else ImageNet's templates. Templates mark the class name with {c}
(CLIP_benchmark's convention). --classnames and --templates override them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from clipfit.data.classes import (FOLDER_TEMPLATES, class_folders, class_names, default_templates, fill, read_list,
                                  read_templates, stratified_split)
from clipfit.eval.catalog import BENCHMARK_NAMES, DATASETS, Found, benchmark_classnames, benchmark_templates, imagenet_synsets
from clipfit.errors import DataError

__all__ = ["DATASETS", "LabelledImages", "image_folder",
           # the conventions a labelled training folder shares (clipfit.data.classes)
           "default_templates", "fill", "read_list", "read_templates", "stratified_split"]

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


def image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class folders sorted by name and their image files, as torchvision's ImageFolder finds them."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    folders = class_folders(root)
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


def load_folder(root: Path) -> LabelledImages:
    from clipfit.data.images import open_rgb

    folders, images, labels = image_folder(root)
    own = root / FOLDER_TEMPLATES
    templates = Found(read_templates(own), str(own)) if own.is_file() else benchmark_templates(BENCHMARK_NAMES["imagenet"])
    return LabelledImages(root.resolve().name, str(root.resolve()), images, labels, class_names(root, folders, None),
                          templates.items, open_rgb,
                          sources={"classnames": "the class folders' names (_ read as a space)",
                                   "templates": templates.source})
