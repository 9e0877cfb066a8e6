"""Results as CLIP_benchmark writes them, and as a table on the terminal.

clipfit keeps rates in percent (points) everywhere people read them; the JSON follows
CLIP_benchmark, whose rates are fractions in [0, 1], so `clip_benchmark build` can aggregate
clipfit's files with its own.
"""

from __future__ import annotations

import re
from typing import Any

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "geometry")
RATE = re.compile(r"(^|[_/])(acc\d+|mean_per_class_recall|mean_average_precision|ece)$|(_recall|_R)@\d+$")


def is_rate(name: str) -> bool:
    """Accuracies, recalls, average precision and calibration error: percentages in clipfit,
    fractions in CLIP_benchmark's JSON."""
    return bool(RATE.search(name))


# The validation split's yardsticks that its `retrieval/validation` group also reports (R@1 as
# image/text_retrieval_recall@1, counting every caption; the same gap): listed there only.
SHOWN_IN_VALIDATION_GROUP = ("image_to_text_R@1", "text_to_image_R@1", "modality_gap")
VALIDATION_GROUP = "retrieval/validation/"
LABELLED_SPLIT = "acc1"  # a folder of classes' split is also measured as a classifier


def listed_once(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` without the yardsticks that the validation group lists as well. A labelled split
    keeps its R@1: it counts a caption of the image's class as found, the group only the image's own."""
    if not any(name.startswith(VALIDATION_GROUP) for name in metrics):
        return metrics
    hidden = ("modality_gap",) if LABELLED_SPLIT in metrics else SHOWN_IN_VALIDATION_GROUP
    return {k: v for k, v in metrics.items() if k not in hidden}


def benchmark_json(dataset: str, model: str, pretrained: str, task: str, metrics: dict[str, float],
                   extra: dict[str, Any] | None = None, templates: list[str] | None = None) -> dict[str, Any]:
    """CLIP_benchmark's record; `templates`, the zero-shot prompts used, as its --dump_templates writes them."""
    assert task in TASKS, task
    return {
        "dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
        "metrics": {name: value / 100.0 if is_rate(name) and value == value else value for name, value in metrics.items()},
        "language": "en",
        **({"templates": list(templates)} if templates else {}),
        **({"clipfit": extra} if extra else {}),
    }


def format_value(name: str, value: float | None) -> str:
    if value is None or value != value:  # no value: null in JSON, NaN (clipfit.eval.metrics.undefined) here
        return f"n/a ({value.reason})" if hasattr(value, "reason") else "n/a"
    return f"{value:.2f}%" if is_rate(name) else f"{value:.4g}"


def print_table(title: str, metrics: dict[str, float], caption: str | None = None) -> None:
    """The metrics as a table (rates in percent), and `caption` on one line under it."""
    from rich.console import Console
    from rich.table import Table

    from clipfit.progress import rich_literal

    table = Table(title=rich_literal(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, format_value(name, value))
    console = Console()
    console.print(table)
    if caption:
        console.print(rich_literal(caption), highlight=False, soft_wrap=True)
