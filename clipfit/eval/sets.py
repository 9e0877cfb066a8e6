"""Every labelled evaluation set by name: the one way from DATASET and PATH (and --classnames,
--templates) to a set, over the loaders of clipfit.eval.datasets (ImageNet, CIFAR, folders) and
clipfit.eval.shifts (ImageNet's distribution shifts, which build on those)."""

from __future__ import annotations

from pathlib import Path

from clipfit.data.classes import read_list, read_templates
from clipfit.eval.catalog import DATASETS, SHIFTS, dataset_names
from clipfit.eval.datasets import LabelledImages, load_cifar, load_folder, load_imagenet
from clipfit.eval.shifts import load_shift
from clipfit.errors import DataError, UsageError


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
        data = load_shift(dataset, root)
    else:
        data = load_folder(root)
    return overridden(data, f"{dataset} at {root}", classnames_file, templates_file)


def overridden(data, where: str, classnames_file: str | None, templates_file: str | None):
    """`data` (a LabelledImages or a clipfit.eval.wds.WdsSet) with --classnames and --templates applied."""
    if classnames_file:
        classnames = read_list(classnames_file, "class names")
        if len(classnames) != len(data.classes):
            scored = ""  # a shift set scores a subset of ImageNet's classes through all 1,000 classifier rows
            if getattr(data, "groups", None) is not None:
                scored = f" (its classifier's rows; it scores {len(data.groups)} of them)"
            raise UsageError(f"--classnames has {len(classnames)} names but {where} has {len(data.classes)} "
                             f"classes{scored}")
        data.classes = classnames
        data.sources["classnames"] = f"--classnames {classnames_file}"
    if templates_file:
        data.templates = read_templates(templates_file)
        data.sources["templates"] = f"--templates {templates_file}"
    return data
