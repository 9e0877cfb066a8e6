"""`clipfit compare RUN_DIR...`: the metrics of several runs, side by side."""

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


def run_summary(run_dir: Path) -> dict[str, Any]:
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
    return {"runs": runs, "metrics": metrics}


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
