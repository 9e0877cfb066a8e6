"""`clipfit compare RUN_DIR...`: the metrics of several runs, side by side.

An input is a run folder (its run.json) or a suite `clipfit eval suite --out` wrote (the folder or
its suite.json). Besides every metric, the evaluation sets get one table: each set's top-1 (or
its score: mAP, Recall@5) and ECE per input, with two inputs the change, and the mean over the
sets every input has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipfit.errors import UsageError
from clipfit.eval.suite import deltas


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json of a run folder; UsageError (exit 2) naming the path when it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "a file" if run_dir.exists() else "not found"
        raise UsageError(f"{run_dir}: not a clipfit run folder ({what}; pass the folder that holds run.json)")
    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{run_dir}: not a clipfit run folder (no run.json)") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise UsageError(f"{path}: not a clipfit run.json (a JSON {type(info).__name__}, not an object)")
    for part in ("config", "model", "before", "after", "delta"):
        if info.get(part) is not None and not isinstance(info[part], dict):
            raise UsageError(f"{path}: not a clipfit run.json ({part!r} is a {type(info[part]).__name__}, not an object)")
    return info


SUITE_JSON = "suite.json"  # `clipfit eval suite --out` writes it; compare reads it
GROUP_OF_TASK = {"zeroshot_classification": "zeroshot", "zeroshot_retrieval": "retrieval"}


def is_suite(path: Path) -> bool:
    if path.is_file():
        return path.name == SUITE_JSON
    return (path / SUITE_JSON).is_file() and not (path / "run.json").exists()


def suite_summary(path: Path) -> dict[str, Any]:
    """A suite's sets as a run's `after` (rates in percent, as run.json keeps them)."""
    from clipfit.eval.results import is_rate

    file = path if path.is_file() else path / SUITE_JSON
    try:
        result = json.loads(file.read_text(encoding="utf-8"))
        sets = {(GROUP_OF_TASK[s["task"]], s["name"]): s["metrics"] for s in result["sets"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{file}: not a suite clipfit wrote ({type(e).__name__}: {e})") from None
    after = {f"{group}/{name}/{metric}": (100.0 * value if is_rate(metric) else value)
             for (group, name), metrics in sets.items() for metric, value in metrics.items()
             if metric != "score" and value is not None}
    return {"run_dir": str(path), "method": f"suite {' '.join(result.get('suite', []))}", "model": result.get("model"),
            "pretrained": result.get("pretrained"), "steps": None, "finished": True, "before": {}, "after": after,
            "delta": {}, "gate": None}


def run_summary(run_dir: Path) -> dict[str, Any]:
    if is_suite(Path(run_dir)):
        return suite_summary(Path(run_dir))
    info = read_run(run_dir)
    config, model = info.get("config") or {}, info.get("model") or {}
    before, after = info.get("before") or {}, info.get("after") or {}
    return {
        "run_dir": str(run_dir), "method": config.get("method"), "model": model.get("arch"),
        "pretrained": model.get("pretrained"), "steps": info.get("steps"), "finished": bool(after),
        "before": before, "after": after,
        "delta": info.get("delta") or deltas(before, after),
        "gate": info.get("gate"),
    }


def compare_runs(run_dirs: list[Path]) -> dict[str, Any]:
    runs = [run_summary(Path(d)) for d in run_dirs]
    metrics: list[str] = []
    for run in runs:
        metrics += [name for name in {**run["before"], **run["after"]} if name not in metrics]
    from clipfit.eval.suites import side_by_side

    return {"runs": runs, "metrics": metrics, "sets": side_by_side([run["after"] for run in runs])}


def cell(run: dict[str, Any], metric: str) -> str:
    from clipfit.eval.results import format_value

    after, before = run["after"].get(metric), run["before"].get(metric)
    if after is None:
        return "" if before is None else f"{format_value(metric, before)} (before)"
    if before is None:
        return format_value(metric, after)
    return f"{format_value(metric, after)} ({after - before:+.3g})"


def print_comparison(table: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from clipfit.progress import rich_literal

    view = Table(title="after (change from each run's own before)")
    view.add_column("", overflow="fold")
    for run in table["runs"]:
        view.add_column(rich_literal(Path(run["run_dir"]).name), justify="right")
    for label in ("method", "model", "pretrained", "steps"):
        view.add_row(label, *[rich_literal(run[label]) for run in table["runs"]])
    for metric in table["metrics"]:
        view.add_row(metric, *[cell(run, metric) for run in table["runs"]])
    Console().print(view)
    if table.get("sets"):
        Console().print(sets_view(table))


def score_cell(values: dict, sign: str = "") -> str:
    """A set's score with its ECE, in percent; sign="+" for a change."""
    from clipfit.eval.metrics import is_number

    score, ece = values.get("score"), values.get("ece")
    if not is_number(score):
        return ""
    return f"{score:{sign}.2f}" + (f" (ECE {ece:{sign}.2f})" if is_number(ece) else "")


def sets_view(table: dict[str, Any]):
    """The evaluation sets' top-1 (or score) and ECE per run, in percent; with two runs the change."""
    from rich.table import Table

    from clipfit.eval.suites import mean_label
    from clipfit.progress import rich_literal

    sets = table["sets"]
    view = Table(title="evaluation sets: top-1, mAP or mean Recall@5 (ECE), percent; mean over the sets all have")
    view.add_column("set", overflow="fold")
    for run in table["runs"]:
        view.add_column(rich_literal(Path(run["run_dir"]).name), justify="right")
    if "change" in sets:
        view.add_column("change", justify="right")
    for name, cells in sets["sets"].items():
        view.add_row(rich_literal(name), *[score_cell(c) for c in cells],
                     *([score_cell(sets["change"][name], "+")] if "change" in sets else []))
    view.add_row(mean_label(sets), *[score_cell(m) for m in sets["mean"]],
                 *([score_cell(sets["mean_change"], "+")] if "change" in sets else []))
    return view
