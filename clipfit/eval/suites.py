"""Which sets a suite holds, and its one table: `clipfit eval suite` and `--eval-zeroshot`.

A set is named in one of these ways (`clipfit eval suite SUITE`, `--eval-zeroshot SPEC`):

  DATASET=PATH        one set: imagenet, cifar10, cifar100, folder, imagenet-v2, imagenet-sketch,
                      imagenet-r, imagenet-a, objectnet at PATH, or wds/NAME at a folder or hf-hub:ORG/NAME
  wds/NAME            CLIP_benchmark's copy on the hub, hf-hub:clip-benchmark/wds_NAME
  robustness[=ROOT]   ImageNet and its five shifts: CLIP_benchmark's hub copies, or the on-disk
                      forms under ROOT (WiSE-FT's data-location layout)
  vtab[=ROOT]         CLIP_benchmark's vtab collection: its hub copies, or ROOT/wds_NAME folders
  FILE.toml           `name = "path"` lines (name a DATASET, e.g. `imagenet-r = "/data/imagenet-r"`,
                      `"wds/cars" = "hf-hub:clip-benchmark/wds_cars"`), or `name = {dataset = ...,
                      path = ..., classnames = ..., templates = ...}` for a set under a name of your own;
                      relative paths are relative to the file

Torch-free until a set is loaded.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfit.errors import UsageError
from clipfit.eval.catalog import (BENCHMARK_NAMES, BUILTIN_SUITES, ROBUSTNESS_FOLDERS, ROBUSTNESS_WDS, VTAB, dataset_names,
                                  is_wds, known, slug, wds_folder_name, wds_is_retrieval)
from clipfit.hub import HUB_PREFIX

FORMS = ("DATASET=PATH, wds/NAME, robustness[=ROOT], vtab[=ROOT] or a suite .toml file")
TABLE_KEYS = ("dataset", "path", "classnames", "templates")


@dataclass(frozen=True)
class SetSpec:
    dataset: str  # a name of clipfit.eval.catalog
    location: str | None  # a folder or hf-hub:ORG/NAME; None: a wds/ set's hub copy
    label: str | None = None  # the name a suite file gives it
    classnames: str | None = None
    templates: str | None = None

    @property
    def task(self) -> str:
        """zeroshot or retrieval: a local wds/ folder's dataset_type.txt says; else the name, as in
        CLIP_benchmark (flickr30k, mscoco_captions, ... are retrieval sets)."""
        if not is_wds(self.dataset):
            return "zeroshot"
        local = bool(self.location) and not self.location.startswith(HUB_PREFIX)
        kind_file = Path(self.location) / "dataset_type.txt" if local else None
        if kind_file is not None and kind_file.is_file():
            retrieval = kind_file.read_text(encoding="utf-8", errors="replace").strip().lower() == "retrieval"
        else:
            retrieval = wds_is_retrieval(self.dataset)
        return "retrieval" if retrieval else "zeroshot"

    def base_name(self) -> str:
        """The set's name in result keys (`zeroshot/NAME/acc1`), before duplicates are numbered."""
        if self.label:
            return self.label
        if self.dataset == "folder":
            return Path(self.location).resolve().name
        return slug(self.dataset)

    def benchmark_name(self) -> str:
        """CLIP_benchmark's name for the set (its JSON's `dataset`)."""
        return self.dataset if is_wds(self.dataset) else BENCHMARK_NAMES.get(self.dataset, self.base_name())


def parse_specs(items: list[str], flag: str = "--eval-zeroshot") -> list[SetSpec]:
    return [spec for item in items for spec in parse_spec(item, flag)]


def parse_spec(item: str, flag: str) -> list[SetSpec]:
    name, sep, value = item.partition("=")
    if name in BUILTIN_SUITES:
        return builtin_suite(name, value if sep else None)
    if item.endswith(".toml") and not sep:
        return read_suite_file(Path(item))
    if known(name) and (value or (is_wds(name) and not sep)):
        return [SetSpec(name, value or None)]
    raise UsageError(f"{flag} {item!r}: expected {FORMS}; DATASET is one of {dataset_names()}")


def builtin_suite(name: str, root: str | None) -> list[SetSpec]:
    if name == "vtab":
        return [SetSpec(dataset, str(Path(root) / wds_folder_name(dataset)) if root else None) for dataset in VTAB]
    if root is None:
        return [SetSpec(dataset, None) for dataset in ROBUSTNESS_WDS]
    return [SetSpec(dataset, str(first_present(Path(root), folders))) for dataset, folders in ROBUSTNESS_FOLDERS.items()]


def first_present(root: Path, folders: tuple[str, ...]) -> Path:
    """root/folder for the first of `folders` that exists, else for the last, the plainest name
    (imagenet/val, the ImageNetV2 archive's folder), which the error then names."""
    return next((root / f for f in folders if (root / f).exists()), root / folders[-1])


def read_suite_file(path: Path) -> list[SetSpec]:
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such suite file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    if not table:
        raise UsageError(f"{path}: the suite names no sets")
    return [suite_entry(path, name, value) for name, value in table.items()]


def suite_entry(path: Path, name: str, value: Any) -> SetSpec:
    where = f"{path}: {name!r}"
    if isinstance(value, str):
        if not known(name):
            raise UsageError(f"{where} is not a dataset ({dataset_names()}); for a set of your own write "
                             f"{name} = {{dataset = \"folder\", path = \"...\"}}")
        return SetSpec(name, relative_to(path, value))
    if not isinstance(value, dict) or not isinstance(value.get("dataset"), str):
        raise UsageError(f"{where}: expected \"PATH\" or {{dataset = \"...\", path = \"...\"}}")
    unknown = [key for key in value if key not in TABLE_KEYS]
    if unknown or not known(value["dataset"]):
        problem = f"unknown key {unknown[0]!r} (keys: {', '.join(TABLE_KEYS)})" if unknown else \
            f"dataset {value['dataset']!r} is not one of {dataset_names()}"
        raise UsageError(f"{where}: {problem}")
    if "path" not in value and not is_wds(value["dataset"]):
        raise UsageError(f"{where}: no path for {value['dataset']}")
    return SetSpec(value["dataset"], relative_to(path, value.get("path")), name,
                   relative_to(path, value.get("classnames")), relative_to(path, value.get("templates")))


def relative_to(suite_file: Path, value: str | None) -> str | None:
    if not value or value.startswith(HUB_PREFIX) or Path(value).is_absolute():
        return value
    return str(suite_file.parent / value)


def named(specs: list[SetSpec]) -> dict[str, SetSpec]:
    """Each set under its name, duplicates numbered (imagenet, imagenet-2)."""
    names: dict[str, SetSpec] = {}
    for spec in specs:
        names[unique_name(spec.base_name(), names)] = spec
    return names


def unique_name(name: str, taken: dict) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def load_set(spec: SetSpec):
    """A zero-shot set (clipfit.eval.datasets.LabelledImages or clipfit.eval.wds.WdsSet) or a
    retrieval set (a WdsSet), with the spec's class names and templates applied."""
    from clipfit.eval.sets import load_labelled, overridden

    if not is_wds(spec.dataset):
        return load_labelled(spec.dataset, spec.location, spec.classnames, spec.templates)
    from clipfit.eval.wds import open_wds

    data = open_wds(spec.dataset, spec.location)
    if (data.kind == "retrieval") != (spec.task == "retrieval"):
        from clipfit.errors import DataError

        raise DataError(f"{data.root}: {spec.dataset} is a {spec.task} set by its name (as in CLIP_benchmark) "
                        f"but its dataset_type.txt says {data.kind}")
    return overridden(data, f"{spec.dataset} at {data.root}", spec.classnames, spec.templates)


# --- the suite's table: markdown, JSON and CSV ---------------------------------------------------

# CLIP_benchmark's benchmark/benchmark.csv columns, in its order; clipfit adds the calibration error
CSV_COLUMNS = ("acc1", "acc5", "mean_per_class_recall", "dataset", "model", "pretrained", "task",
               "mean_average_precision", "image_retrieval_recall@5", "text_retrieval_recall@5", "model_fullname", "ece")
# (metric, heading) of the markdown table; `score` is each set's headline number
SHOWN = (("acc1", "top-1"), ("ece", "ECE"), ("acc5", "top-5"), ("mean_per_class_recall", "mean per-class recall"),
         ("mean_average_precision", "mAP"), ("image_retrieval_recall@5", "image retrieval R@5"),
         ("text_retrieval_recall@5", "text retrieval R@5"), ("score", "score"))
MEAN = "mean"
RETRIEVAL_SCORE = ("image_retrieval_recall@5", "text_retrieval_recall@5")


def set_score(metrics: dict[str, float]) -> float | None:
    """A set's headline number: top-1, else the mean average precision (multi-label), else the
    mean of the two retrieval directions' Recall@5."""
    from clipfit.eval.metrics import is_number

    for name in ("acc1", "mean_average_precision"):
        if is_number(metrics.get(name)):
            return metrics[name]
    recalls = [metrics.get(name) for name in RETRIEVAL_SCORE]
    return sum(recalls) / 2 if all(is_number(r) for r in recalls) else None


def suite_means(sets: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each shown metric averaged over the sets that have it; `score` over every set."""
    from clipfit.eval.metrics import is_number

    means = {metric: mean([m[metric] for m in sets.values() if is_number(m.get(metric))]) for metric, _ in SHOWN}
    return {metric: value for metric, value in means.items() if value is not None}


def suite_result(suite: list[str], model: str, pretrained: str, records: dict[str, dict]) -> dict:
    """The suite as JSON: every set's CLIP_benchmark record (rates as fractions) and the mean."""
    sets = {name: {**record["metrics"], "score": set_score(record["metrics"])} for name, record in records.items()}
    return {"suite": suite, "model": model, "pretrained": pretrained,
            "sets": [{"name": name, **record, "metrics": sets[name]} for name, record in records.items()],
            MEAN: suite_means(sets)}


def suite_markdown(result: dict) -> str:
    """One row per set and the mean, rates in percent."""
    from clipfit.eval.results import format_value

    rows = [(s["name"], s["dataset"], s["metrics"]) for s in result["sets"]] + [(f"**{MEAN}**", "", result[MEAN])]
    shown = [(metric, heading) for metric, heading in SHOWN if any(metric in metrics for _, _, metrics in rows)]
    lines = [f"Suite {' '.join(result['suite'])} · {result['model']} ({result['pretrained']})", "",
             "| set | dataset | " + " | ".join(heading for _, heading in shown) + " |",
             "|---|---|" + "---:|" * len(shown)]
    for name, dataset, metrics in rows:
        cells = [format_value("acc1", 100 * metrics[m]) if m in metrics and metrics[m] is not None else ""
                 for m, _ in shown]
        lines.append(f"| {name} | {dataset} | " + " | ".join(cells) + " |")
    lines += ["", "Percentages; ECE is the expected calibration error at the model's logit scale (lower is "
                  "better); score is top-1, mAP for a multi-label set, the mean of both R@5 for retrieval."]
    return "\n".join(lines) + "\n"


def suite_csv(result: dict) -> str:
    """CLIP_benchmark's benchmark.csv columns (rates as fractions) and `ece`, a row per set, then the mean."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    fullname = f"{result['model']} {result['pretrained']}"
    for s in result["sets"]:
        writer.writerow({**s["metrics"], "dataset": s["dataset"], "model": result["model"],
                         "pretrained": result["pretrained"], "task": s["task"], "model_fullname": fullname})
    writer.writerow({**result[MEAN], "dataset": MEAN, "model": result["model"], "pretrained": result["pretrained"],
                     "model_fullname": fullname})
    return out.getvalue()


# --- a run's evaluation sets, for compare and report.md -----------------------------------------

SET_METRICS = ("score", "ece")


def evaluation_sets(results: dict[str, float]) -> dict[str, dict[str, float]]:
    """`group/set` -> the set's score and ECE, from flat results (run.json's `before` or `after`),
    leaving out the validation split (each run's own data)."""
    grouped: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        group, _, metric = key.rpartition("/")
        if group.startswith(("zeroshot/", "retrieval/")) and group != "retrieval/validation":
            grouped.setdefault(group, {})[metric] = value
    return {group: {"score": set_score(metrics), "ece": metrics.get("ece")} for group, metrics in grouped.items()}


def side_by_side(results: list[dict[str, float]]) -> dict[str, Any]:
    """Several flat results (runs' `after`, or one run's before and after) as one table of their
    evaluation sets: each set's score and ECE per result, each metric's mean over the sets where
    every result has it, and with two results the second minus the first. {} without sets."""
    from clipfit.eval.metrics import is_number

    per_result = [evaluation_sets(r) for r in results]
    names = list(dict.fromkeys(name for sets in per_result for name in sets))
    if not names:
        return {}
    table = {name: [sets.get(name, {}) for sets in per_result] for name in names}
    shared = {m: [n for n in names if all(is_number(sets.get(n, {}).get(m)) for sets in per_result)]
              for m in SET_METRICS}
    means = [{m: mean([sets[n][m] for n in shared[m]]) for m in SET_METRICS} for sets in per_result]
    view = {"sets": table, "mean": means, "mean_over": shared["score"], "ece_mean_over": shared["ece"]}
    if len(results) == 2:
        view["change"] = {name: difference(*cells) for name, cells in table.items()}
        view["mean_change"] = difference(*means)
    return view


def mean_label(view: dict[str, Any]) -> str:
    """'mean (3 sets)', or 'mean (3 sets; ECE over 2)' where fewer sets have an ECE (retrieval has none)."""
    score, ece = len(view["mean_over"]), len(view.get("ece_mean_over", view["mean_over"]))
    return f"mean ({score} sets" + (f"; ECE over {ece})" if ece != score else ")")


def difference(first: dict, second: dict) -> dict:
    from clipfit.eval.metrics import is_number

    return {m: second[m] - first[m] if is_number(first.get(m)) and is_number(second.get(m)) else None
            for m in SET_METRICS}


def mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None
