"""ImageNet's distribution shifts in their usual on-disk form, scored as WiSE-FT and FLYP score them.

Every shift is classified by ImageNet's own zero-shot classifier (CLIP_benchmark's 1,000 class
names and 80 templates), so the classifier built once for ImageNet serves all of them (it is
kept in the feature cache):

  imagenet-v2      ImageNetV2 as distributed (matched frequency: ImageNetV2-matched-frequency/ or
                   imagenetv2-matched-frequency-format-val/): one folder per class named by its
                   index, 0 ... 999
  imagenet-sketch  ImageNet-Sketch as distributed (sketch/): one folder per WordNet synset
  imagenet-r,      200 synset folders each (imagenet-r/, imagenet-a/): an image is told apart from
  imagenet-a       the classes whose folders are there, i.e. ImageNet's scores under that class mask
  objectnet        the ObjectNet 1.0 release (objectnet-1.0/ with images/ and mappings/): the 113
                   classes its mappings/ files map to ImageNet classes; a class scores as the
                   largest of its ImageNet classes' scores, and each image loses a 2-pixel border
                   (the release's red frame) before preprocessing, as WiSE-FT does.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipfit.errors import DataError
from clipfit.eval.catalog import BENCHMARK_NAMES
from clipfit.eval.datasets import (LabelledImages, class_images, image_folder, imagenet_classified, imagenet_indices,
                                   pil_rgb)

OBJECTNET_RELEASE = "objectnet-1.0"
OBJECTNET_BORDER = 2  # pixels cropped from every side
# the release's mappings/ files (WiSE-FT reads the same four)
FOLDER_TO_LABEL = "folder_to_objectnet_label.json"  # image folder -> ObjectNet class name
LABEL_TO_IMAGENET = "objectnet_to_imagenet_1k.json"  # ObjectNet class -> ImageNet class names, '; '-separated
PYTORCH_TO_2012 = "pytorch_to_imagenet_2012_id.json"  # standard (PyTorch) index -> ILSVRC-2012 id
IMAGENET_2012_NAMES = "imagenet_to_label_2012_v2"  # line i: the names of ILSVRC-2012 id i


def load_shift(dataset: str, root: Path) -> LabelledImages:
    load = {"imagenet-v2": load_imagenet_v2, "objectnet": load_objectnet}.get(dataset, load_synset_shift)
    return load(dataset, root)


def load_imagenet_v2(dataset: str, root: Path) -> LabelledImages:
    folders, images, labels = image_folder(root)
    bad = [f for f in folders if not (f.isdigit() and int(f) < 1000)]
    if bad:
        raise DataError(f"{root}: imagenet-v2 needs class folders named by ImageNet index, 0 ... 999; found {bad[0]!r}")
    return imagenet_classified(BENCHMARK_NAMES[dataset], str(root.resolve()), images,
                               [int(folders[label]) for label in labels], pil_rgb)


def load_synset_shift(dataset: str, root: Path) -> LabelledImages:
    """Synset folders: among all 1,000 classes (sketch), or among the classes present (R, A)."""
    synsets, images, labels = image_folder(root)
    indices = imagenet_indices(synsets, root, dataset)
    if dataset == "imagenet-sketch":
        return imagenet_classified(BENCHMARK_NAMES[dataset], str(root.resolve()), images,
                                   [indices[label] for label in labels], pil_rgb)
    return imagenet_classified(BENCHMARK_NAMES[dataset], str(root.resolve()), images, labels, pil_rgb,
                               groups=[[index] for index in indices])


def objectnet_release(root: Path) -> Path:
    """The release folder (images/ and mappings/): `root` itself, or root/objectnet-1.0."""
    for candidate in (root, root / OBJECTNET_RELEASE):
        if (candidate / "images").is_dir() and (candidate / "mappings").is_dir():
            return candidate
    raise DataError(f"{root}: not the ObjectNet release (a folder with images/ and mappings/, e.g. {OBJECTNET_RELEASE}/)")


def read_mapping(release: Path, name: str):
    path = release / "mappings" / name
    try:
        text = path.read_text(encoding="utf-8")
        return text.splitlines() if name == IMAGENET_2012_NAMES else json.loads(text)
    except OSError as e:
        raise DataError(f"{path}: cannot read ObjectNet's mapping file ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def objectnet_classes(release: Path) -> dict[str, list[int]]:
    """Image folder -> the standard indices of its ImageNet classes, for the folders the mappings map."""
    folder_of = {label: folder for folder, label in read_mapping(release, FOLDER_TO_LABEL).items()}
    index_of_2012 = {int(id_2012): int(index) for index, id_2012 in read_mapping(release, PYTORCH_TO_2012).items()}
    index_of_name = {line.strip(): index_of_2012[i] for i, line in enumerate(read_mapping(release, IMAGENET_2012_NAMES))
                     if i in index_of_2012}
    classes = {}
    for label, names in read_mapping(release, LABEL_TO_IMAGENET).items():
        unknown = [n for n in names.split("; ") if n not in index_of_name]
        if label not in folder_of or unknown:
            missing = f"the ImageNet class {unknown[0]!r}" if unknown else f"the class {label!r}"
            raise DataError(f"{release / 'mappings'}: {LABEL_TO_IMAGENET} names {missing}, which the other mapping files lack")
        classes[folder_of[label]] = [index_of_name[n] for n in names.split("; ")]
    return classes


def without_border(path):
    image = pil_rgb(path)
    width, height = image.size
    return image.crop((OBJECTNET_BORDER, OBJECTNET_BORDER, width - OBJECTNET_BORDER, height - OBJECTNET_BORDER))


def load_objectnet(dataset: str, root: Path) -> LabelledImages:
    release = objectnet_release(root)
    classes = objectnet_classes(release)
    folders = sorted(classes)
    images, labels = class_images(release / "images", folders)
    if not images:
        raise DataError(f"{release / 'images'}: no images in the {len(folders)} class folders the mappings name")
    return imagenet_classified(BENCHMARK_NAMES[dataset], str(release.resolve()), images, labels, without_border,
                               groups=[classes[folder] for folder in folders])
