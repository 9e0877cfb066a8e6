"""The names of the evaluation sets, and the class names and templates CLIP_benchmark gives them.

Torch-free: `clipfit --help` and the settings check read these names.

  imagenet, cifar10, cifar100, folder        folders in their usual on-disk form (clipfit.eval.datasets)
  imagenet-v2, imagenet-sketch, imagenet-r,  ImageNet's distribution shifts in their usual on-disk form,
  imagenet-a, objectnet                      scored as WiSE-FT and FLYP score them (clipfit.eval.shifts)
  wds/NAME                                   CLIP_benchmark's WebDataset layout, a local folder or
                                             hf-hub:clip-benchmark/wds_NAME (clipfit.eval.wds)

Class names and templates are CLIP_benchmark 1.6.2's own data files, shipped in clipfit/assets/
(clipfit/assets/SOURCES.md), looked up as CLIP_benchmark looks them up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLASSNAMES_FILE = "en_classnames.json"
TEMPLATES_FILE = "en_zeroshot_classification_templates.json"
DEFAULT_TEMPLATES_KEY = "imagenet1k"  # CLIP_benchmark's templates for a set without its own

FOLDER_SETS = ("imagenet", "cifar10", "cifar100", "folder")
SHIFTS = ("imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a", "objectnet")
DATASETS = (*FOLDER_SETS, *SHIFTS)  # and any wds/NAME
# the name CLIP_benchmark's JSON gives each set (its `dataset` field), for `clip_benchmark build`
BENCHMARK_NAMES = {"imagenet": "imagenet1k", "cifar10": "cifar10", "cifar100": "cifar100",
                   "imagenet-v2": "imagenetv2", "imagenet-sketch": "imagenet_sketch", "imagenet-r": "imagenet-r",
                   "imagenet-a": "imagenet-a", "objectnet": "objectnet"}

WDS_PREFIX = "wds/"
HUB_ORG = "clip-benchmark"  # where CLIP_benchmark publishes its sets: hf-hub:clip-benchmark/wds_NAME
# CLIP_benchmark 1.6.2's get_dataset_default_task: these names are retrieval sets, every other one classification
RETRIEVAL_SETS = ("flickr30k", "flickr8k", "mscoco_captions", "multilingual_mscoco_captions", "flickr30k-200",
                  "crossmodal3600", "xtd10", "xtd200")
# the sets CLIP_benchmark publishes in this layout (its benchmark/webdatasets.txt)
PUBLISHED_WDS = (
    "mscoco_captions", "flickr8k", "flickr30k", "imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a",
    "imagenet-r", "imagenet-o", "objectnet", "fer2013", "voc2007", "sun397", "cars",
    "fgvc_aircraft", "mnist", "stl10", "gtsrb", "country211", "renderedsst2",
    *(f"vtab/{name}" for name in (
        "caltech101", "cifar10", "cifar100", "clevr_count_all", "clevr_closest_object_distance",
        "diabetic_retinopathy", "dmlab", "dsprites_label_orientation", "dsprites_label_x_position",
        "dsprites_label_y_position", "dtd", "eurosat", "kitti_closest_vehicle_distance", "flowers", "pets", "pcam",
        "resisc45", "smallnorb_label_azimuth", "smallnorb_label_elevation", "svhn")),
)


def is_wds(name: str) -> bool:
    return name.startswith(WDS_PREFIX) and len(name) > len(WDS_PREFIX)


def wds_short(name: str) -> str:
    """`wds/vtab/cifar10` -> `vtab/cifar10`: the name CLIP_benchmark evaluates it under."""
    return name.removeprefix(WDS_PREFIX)


def wds_hub(name: str) -> str:
    """Where CLIP_benchmark publishes a wds/ set: hf-hub:clip-benchmark/wds_NAME, '/' written '-'."""
    return f"hf-hub:{HUB_ORG}/wds_{wds_short(name).replace('/', '-')}"


def wds_is_retrieval(name: str) -> bool:
    return wds_short(name) in RETRIEVAL_SETS


def known(name: str) -> bool:
    return name in DATASETS or is_wds(name)


def slug(name: str) -> str:
    """A set's name inside result keys (`zeroshot/SLUG/acc1`): no '/', as CLIP_benchmark's own
    output file names (`wds/vtab/cifar10` -> `vtab_cifar10`)."""
    return wds_short(name).replace("/", "_")


def dataset_names() -> str:
    return ", ".join(DATASETS) + " or wds/NAME"


# --- CLIP_benchmark's class names and templates ------------------------------------------------

@lru_cache(maxsize=None)
def benchmark_file(file: str) -> dict[str, list[str]]:
    return json.loads((ASSETS / file).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Found:
    items: list[str]
    source: str  # where they come from, as the JSON and docs say it


def lookup_keys(name: str) -> list[str]:
    """The keys CLIP_benchmark tries for a set (its name, then for a wds/ set the name after
    `wds/`), then the last part of that name (`vtab/cifar10` -> `cifar10`), under which its data
    files keep most sets; a VTAB set's own names first (`caltech101_vtab`, as its VTAB builder)."""
    short = wds_short(name)
    last = short.rpartition("/")[2]
    keys = [name, short, *([f"{last}_vtab"] if short.startswith("vtab/") else []), last]
    return list(dict.fromkeys(keys))


def benchmark_classnames(name: str) -> Found | None:
    table = benchmark_file(CLASSNAMES_FILE)
    key = next((k for k in lookup_keys(name) if k in table), None)
    return Found(list(table[key]), f"CLIP_benchmark {CLASSNAMES_FILE}[{key}]") if key else None


def benchmark_templates(name: str) -> Found:
    """A set's own templates, else ImageNet's 80 (CLIP_benchmark's rule)."""
    table = benchmark_file(TEMPLATES_FILE)
    key = next((k for k in lookup_keys(name) if k in table), DEFAULT_TEMPLATES_KEY)
    return Found(list(table[key]), f"CLIP_benchmark {TEMPLATES_FILE}[{key}]")


@lru_cache(maxsize=None)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1,000 ILSVRC-2012 WordNet ids in the standard class order."""
    return tuple((ASSETS / "imagenet_synsets.txt").read_text(encoding="utf-8").split())


# --- built-in suites ----------------------------------------------------------------------------

# ImageNet and its five shifts: CLIP_benchmark's copies on the hub, or with a ROOT folder the
# on-disk forms WiSE-FT reads from its --data-location (the first of the names found there)
ROBUSTNESS_WDS = ("wds/imagenet1k", "wds/imagenetv2", "wds/imagenet_sketch", "wds/imagenet-r", "wds/imagenet-a",
                  "wds/objectnet")
ROBUSTNESS_FOLDERS = {
    "imagenet": ("imagenet/val_in_folder", "imagenet/val"),
    "imagenet-v2": ("ImageNetV2-matched-frequency", "imagenetv2-matched-frequency-format-val"),
    "imagenet-sketch": ("sketch",),
    "imagenet-r": ("imagenet-r",),
    "imagenet-a": ("imagenet-a",),
    "objectnet": ("objectnet-1.0",),
}
# CLIP_benchmark 1.6.2's `vtab` collection (datasets/builder.py), as wds/ sets
VTAB = tuple(f"wds/{name}" for name in (
    "vtab/caltech101", "vtab/cifar100", "vtab/clevr_count_all", "vtab/clevr_closest_object_distance",
    "vtab/diabetic_retinopathy", "vtab/dmlab", "vtab/dsprites_label_orientation", "vtab/dsprites_label_x_position",
    "vtab/dtd", "vtab/eurosat", "vtab/kitti_closest_vehicle_distance", "vtab/flowers", "vtab/pets", "vtab/pcam",
    "vtab/resisc45", "vtab/smallnorb_label_azimuth", "vtab/smallnorb_label_elevation", "sun397", "vtab/svhn"))
BUILTIN_SUITES = ("robustness", "vtab")


def wds_folder_name(name: str) -> str:
    """The folder `hf download clip-benchmark/wds_NAME --local-dir ROOT/wds_NAME` makes: wds_ + NAME, '/' written '-'."""
    return wds_hub(name).rpartition("/")[2]
