"""`clipfit sweep PAIRS --method refine,contrastive --lr 1e-6,1e-5 ...`: a grid of refine runs.

Every refine setting may be given as a comma list; the grid is their product, run one at a time,
each a normal run folder under --out. Runs share the feature cache, so frozen features (locked
towers, the frozen teacher, feature banks) are encoded by the first run that needs them. The runs
are compared with `clipfit compare`'s table and one is chosen by clipfit.selection's rule.
Rerunning the same command continues: finished runs are skipped, an interrupted one resumes.
"""

from __future__ import annotations

import itertools
import json
import re
import typing
from pathlib import Path
from typing import Any

from clipfit.errors import Interrupted, UsageError

SWEEP_JSON, SWEEP_MD, SWEEP_HTML, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.html", "sweep.png"
# settings that are not a grid axis: where runs go, how they print, settings that are lists already, and
# the metric the sweep itself chooses by (each run keeps its best step by it, too)
NOT_GRIDDED = {"out", "overwrite", "resume", "quiet", "json", "lora_targets", "weight", "eval_zeroshot",
               "eval_retrieval", "select_best"}


def field_type(name: str) -> type:
    from clipfit.config import RefineConfig

    hint = typing.get_type_hints(RefineConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def gridded_fields() -> list[str]:
    """Settings a sweep may vary: every refine setting except flags, lists and output switches."""
    from clipfit.config import CONFIG_FIELDS

    return [n for n in CONFIG_FIELDS if n not in NOT_GRIDDED and field_type(n) in (int, float, str)]


def parse_values(name: str, text: str) -> list[Any]:
    from clipfit.config import flag

    kind = field_type(name)
    values = []
    for word in (w.strip() for w in text.split(",")):
        try:
            values.append(kind(word) if kind is not str else word)
        except ValueError:
            raise UsageError(f"{flag(name)} {text!r}: {word!r} is not a {kind.__name__}") from None
    if not values or "" in values:
        raise UsageError(f"{flag(name)} {text!r}: expected values separated by commas")
    return values


def grid(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def run_name(index: int, combo: dict[str, Any], varying: list[str]) -> str:
    parts = [f"{index:02d}"] + [f"{name.replace('_', '-')}={combo[name]}" for name in varying]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts))


def run_status(run_dir: Path) -> str:
    """finished (run.json has an after measurement), started (run.json without), or new."""
    path = run_dir / "run.json"
    if not path.is_file():
        return "new"
    try:
        return "finished" if json.loads(path.read_text(encoding="utf-8")).get("after") else "started"
    except (OSError, json.JSONDecodeError):
        return "started"


def refine_argv(pairs: str, values: dict[str, Any], names: list[str]) -> list[str]:
    """The `clipfit refine` command line equivalent to one run of the sweep."""
    from clipfit.config import flag

    argv = ["refine", pairs]
    for name in names:
        value = values[name]
        if isinstance(value, bool):
            argv += [flag(name)] if value else []
        elif isinstance(value, list):
            argv += [x for v in value for x in (flag(name), str(v))]
        elif value is not None:
            argv += [flag(name), str(value)]
    return argv


def sweep(pairs: str, values: dict[str, Any], explicit: set[str], axes: dict[str, list[Any]], out: Path,
          progress) -> dict[str, Any]:
    """Run (or continue) every run of the grid, then compare and choose."""
    from clipfit.config import build_config
    from clipfit.run import refine

    out.mkdir(parents=True, exist_ok=True)
    combos = grid(axes)
    varying = [n for n in axes if len(axes[n]) > 1] or list(axes)[:1]
    rule = sweep_rule(values, axes)
    run_dirs = []
    for index, combo in enumerate(combos, 1):
        run_dir = out / run_name(index, combo, varying)
        status = run_status(run_dir)
        settings = {**values, **combo, "out": str(run_dir), "resume": status == "started", "overwrite": False,
                    "quiet": True, "json": False}
        named = sorted(explicit | set(combo) | {"out"})
        config = build_config(settings, set(named) | {"resume", "quiet"}, None)
        run_dirs.append(run_dir)
        if status == "finished":
            check_same_settings(run_dir, config)
            progress.info(f"sweep {index}/{len(combos)}: {run_dir.name} finished earlier, skipped")
            continue
        progress.info(f"sweep {index}/{len(combos)}: {run_dir.name}" + (" (resuming)" if status == "started" else ""))
        try:
            refine(pairs, config, refine_argv(pairs, settings, named), progress)
        except Interrupted as e:
            raise Interrupted(f"sweep stopped during {run_dir.name} ({str(e).split('; ')[0]}); rerun the same "
                              "clipfit sweep command to continue: finished runs are skipped, this one resumes") from None
    return write_summary(out, run_dirs, combos, rule)


def sweep_rule(values: dict[str, Any], axes: dict[str, list[Any]]):
    from clipfit.selection import MEAN_R1, Rule

    metric = values.get("select_best") or (MEAN_R1 if any(v for v in axes.get("val_split", [values.get("val_split")])) else None)
    if metric is None:
        raise UsageError("a sweep chooses among its runs by a validation metric: give --val-split (mean-R@1 is the "
                         "default) or --select-best METRIC")
    return Rule(metric, values.get("max_zeroshot_drop"))


def check_same_settings(run_dir: Path, config) -> None:
    from clipfit.config import RESULT_NEUTRAL

    saved = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["config"]
    changed = [k for k, v in config.to_dict().items() if k not in RESULT_NEUTRAL and saved.get(k) != v]
    if changed:
        raise UsageError(f"{run_dir}: a finished run with other settings ({', '.join(changed)}); "
                         "use a new --out for a different sweep")


def write_summary(out: Path, run_dirs: list[Path], combos: list[dict], rule) -> dict[str, Any]:
    """sweep.json, sweep.md and sweep.html (with the gain-vs-retention plot)."""
    from clipfit.eval.compare import compare_runs
    from clipfit.io import write_json, write_text
    from clipfit.report_html import markdown_to_html
    from clipfit.selection import choose, metric_value, record

    table = compare_runs(run_dirs)
    start = table["runs"][0]["before"]
    choice = choose([r["after"] for r in table["runs"]], start, rule, [d.name for d in run_dirs])
    selection = {**record(choice, rule), "start_score": metric_value(start, rule.metric)}
    summary = {"clipfit": "sweep", "out": str(out), "grid": combos, "runs": table["runs"], "metrics": table["metrics"],
               "selection": selection,
               "chosen_run": str(run_dirs[choice.index]) if choice.index is not None else None}
    write_json(out / SWEEP_JSON, summary)
    markdown = render(summary, combos, plot(out, selection))
    write_text(out / SWEEP_MD, markdown)
    write_text(out / SWEEP_HTML, markdown_to_html(markdown, out, f"clipfit sweep {out.name}"))
    return summary


def plot(out: Path, selection: dict) -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from clipfit.report_figures import gain_vs_drop
    from clipfit.selection import gain_points

    labels = [c["label"] for c in selection["candidates"]]
    chosen = labels.index(selection["chosen"]) if selection["chosen"] in labels else None
    drawn = gain_vs_drop(gain_points(selection), chosen, selection["max_zeroshot_drop"],
                         f"{selection['metric']} gain over the starting model", out / SWEEP_PNG)
    return SWEEP_PNG if drawn else None


def render(summary: dict, combos: list[dict], picture: str | None) -> str:
    from clipfit.eval.compare import cell
    from clipfit.report import candidates_table

    runs, selection = summary["runs"], summary["selection"]
    names = [Path(r["run_dir"]).name for r in runs]
    lines = [f"# clipfit sweep: {len(runs)} runs", "",
             f"Chosen by `{selection['metric']}` ({selection['direction']} is better"
             + (f", held-out zero-shot top-1 at most {selection['max_zeroshot_drop']:g} points below the start"
                if selection["max_zeroshot_drop"] is not None else "") + f"): {selection['reason']}.", "",
             "## Runs", "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(runs)]
    for setting in combos[0]:
        lines.append(f"| {setting} | " + " | ".join(str(c[setting]) for c in combos) + " |")
    for label in ("steps",):
        lines.append(f"| {label} | " + " | ".join(str(r[label]) for r in runs) + " |")
    for metric in summary["metrics"]:
        lines.append(f"| {metric} | " + " | ".join(cell(r, metric) for r in runs) + " |")
    lines += ["", "After (change from each run's own before); rates in %, changes in points.", "",
              "## Selection", ""] + candidates_table(selection)
    if picture:
        lines += ["", "## Target gain against held-out zero-shot drop", "", f"![gain against drop]({picture})"]
    return "\n".join(lines) + "\n"
