"""`clipfit sweep PAIRS --method refine,contrastive --lr 1e-6,1e-5 ...`: a grid of refine runs.

Every refine setting may be given as a comma list; the grid is their product, run one at a time,
each a normal run folder under --out. Runs share the feature cache, so frozen features (locked
towers, the frozen teacher, feature banks) are encoded by the first run that needs them. The runs
are compared with `clipfit compare`'s table and one is chosen by clipfit.selection's rule.
Rerunning the same command continues: finished runs are skipped, an interrupted one resumes
(one killed before its first checkpoint starts again). The sweep folder follows the run-folder
contract (clipfit.rundir: marker, lock, its own names, staged replacement under --overwrite).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import typing
from pathlib import Path
from typing import Any

from clipfit.errors import Interrupted, UsageError
from clipfit.rundir import SOUP_DIR, SWEEP_HTML, SWEEP_JSON, SWEEP_MD, SWEEP_PNG, WISE_DIR, grid_point_name

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
    label = "-".join(f"{name.replace('_', '-')}={shown_value(combo[name])}" for name in varying)
    return grid_point_name(index, re.sub(r"[^A-Za-z0-9_.=+-]", "_", label))


def shown_value(value: Any) -> str:
    """A setting's value in a folder name: a file or folder by its stem, never its path."""
    text = str(value)
    if "/" in text or os.sep in text or Path(text).exists():
        return Path(text).stem or text
    return text


def run_status(run_dir: Path) -> str:
    """finished (run.json has an after measurement), started (run.json and a checkpoint to resume
    from), unstarted (run.json but no checkpoint: killed before its first one), or new."""
    from clipfit.checkpoint import checkpoint_paths

    path = run_dir / "run.json"
    if not path.is_file():
        return "new"
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("after"):
            return "finished"
    except (OSError, json.JSONDecodeError):
        pass
    return "started" if checkpoint_paths(run_dir) else "unstarted"


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
          progress, soups: list[str] = (), wise: list[float] = ()) -> dict[str, Any]:
    """Run (or continue) every run of the grid, make the `soups` and the WiSE-FT `wise` α of the
    chosen one, then compare and choose."""
    from clipfit.config import build_config
    from clipfit.rundir import claim_sweep_dir

    combos = grid(axes)
    varying = [n for n in axes if len(axes[n]) > 1] or list(axes)[:1]
    rule = sweep_rule(values, axes)
    run_dirs = [out / run_name(index, combo, varying) for index, combo in enumerate(combos, 1)]
    named = sorted(explicit | set(axes) | {"out"})
    settings = [{**values, **combo, "out": str(run_dir), "resume": False, "overwrite": False, "quiet": True,
                 "json": False} for combo, run_dir in zip(combos, run_dirs)]
    configs = [build_config(s, set(named) | {"quiet"}, None) for s in settings]  # every point checked first
    folder = claim_sweep_dir(out, bool(values.get("overwrite")), sweep_protected(configs, pairs), progress.warn)
    folder.commit()  # every grid point's settings are valid: a replaced sweep's staged files go
    try:
        for index, (run_dir, config, point) in enumerate(zip(run_dirs, configs, settings), 1):
            run_point(f"sweep {index}/{len(combos)}: {run_dir.name}", pairs, config, refine_argv(pairs, point, named),
                      progress)
        soup_dirs = [d for d in (make_soup(out, run_dirs, recipe, rule, progress) for recipe in soups) if d]
        wise_dir = make_wise(out, chosen_dir(run_dirs + soup_dirs, rule), wise, rule, progress) if wise else None
        return write_summary(out, run_dirs, combos, rule, soup_dirs, wise_dir)
    finally:
        folder.release()


def sweep_protected(configs: list, pairs: str) -> dict[str, Path]:
    """What no grid point's --out may touch, for every grid point: PAIRS, cache folders, --model folders."""
    from clipfit.run import protected_paths

    protected: dict[str, Path] = {}
    for config in configs:
        for what, path in protected_paths(config, pairs).items():
            if protected.setdefault(what, path) != path:
                protected[f"{what} {path}"] = path
    return protected


def one_value(values: dict[str, Any], axes: dict[str, list[Any]], name: str) -> Any:
    """A setting the sweep itself uses: given once (then it is a one-value axis) or not at all."""
    from clipfit.config import flag

    given = axes.get(name, [values.get(name)])
    if len(given) > 1:
        raise UsageError(f"{flag(name)}: the sweep chooses among its runs by one value; give one, not {len(given)}")
    return given[0]


def run_point(title: str, pairs: str, config, argv: list[str], progress) -> None:
    """One grid point: skipped when finished, resumed when it has a checkpoint, else (re)started."""
    from dataclasses import replace

    from clipfit.run import refine

    run_dir = Path(config.out)
    status = run_status(run_dir)
    if status == "finished":
        check_same_settings(run_dir, config)
        progress.info(f"{title} finished earlier, skipped")
        return
    progress.info(title + {"started": " (resuming)", "unstarted": " (starting again: no checkpoint yet)"}.get(status, ""))
    try:
        refine(pairs, replace(config, resume=status == "started", overwrite=status == "unstarted"), argv, progress)
    except Interrupted as e:
        raise Interrupted(f"sweep stopped during {run_dir.name} ({str(e).split('; ')[0]}); rerun the same "
                          "clipfit sweep command to continue: finished runs are skipped, this one resumes") from None


def sweep_rule(values: dict[str, Any], axes: dict[str, list[Any]]):
    """--select-best (default: clipfit.selection.default_metric of what the runs measure) and
    --max-zeroshot-drop (default 1 point with held-out zero-shot sets: clipfit.selection.retention_limit)."""
    from clipfit.eval.suite import set_names
    from clipfit.selection import Rule, default_metric, retention_limit

    has_validation = any(v for v in axes.get("val_split", [values.get("val_split")]))
    zeroshot, retrieval = set_names(values.get("eval_zeroshot") or [], values.get("eval_retrieval") or [],
                                    has_validation)
    metric = one_value(values, axes, "select_best") or default_metric(has_validation, zeroshot, retrieval)
    if metric is None:
        raise UsageError("a sweep chooses among its runs by a metric they measure: give --val-split (mean-R@1 is the "
                         "default), --eval-retrieval PAIRS or --eval-zeroshot DATASET=PATH, or --select-best METRIC")
    # only zero-shot sets' top-1 is guarded: a retrieval-only suite given as --eval-zeroshot turns no limit on
    return Rule(metric, retention_limit(one_value(values, axes, "max_zeroshot_drop"), zeroshot))


# --- after the runs: soups and WiSE-FT (each a run folder in the sweep folder) -------------------

def derived_status(folder: Path, key: str, sources: list[str], extra: dict[str, Any]) -> bool:
    """Whether `folder` holds a finished soup/interpolation (run.json's `key`) of exactly these sources."""
    if run_status(folder) != "finished":
        return False
    record = json.loads((folder / "run.json").read_text(encoding="utf-8")).get(key) or {}
    made_from = [r["run_dir"] for r in record.get("runs", [])] or [record.get("source_run")]
    return made_from == sources and all(record.get(k) == v for k, v in extra.items())


def make_soup(out: Path, run_dirs: list[Path], recipe: str, rule, progress) -> Path | None:
    """`clipfit soup` of every run (greedy: by the sweep's rule); None, with a warning, when the
    runs cannot be souped (another start)."""
    from clipfit.soup import soup

    folder = out / SOUP_DIR.format(recipe=recipe)
    if derived_status(folder, "soup", [str(d.resolve()) for d in run_dirs], {"recipe": recipe}):
        progress.info(f"sweep: {folder.name} made earlier, kept")
        return folder
    greedy = recipe == "greedy"
    try:
        soup(run_dirs, folder, recipe, rule.metric if greedy else None, rule.max_zeroshot_drop if greedy else None,
             None, ["soup", *map(str, run_dirs), "--out", str(folder), "--recipe", recipe], progress, overwrite=True)
    except UsageError as e:
        progress.warn(f"sweep --soup {recipe}: no soup ({e})")
        return None
    return folder


def chosen_dir(candidates: list[Path], rule) -> Path | None:
    from clipfit.eval.compare import compare_runs
    from clipfit.selection import choose

    runs = compare_runs(candidates)["runs"]
    choice = choose([r["after"] for r in runs], runs[0]["before"], rule)
    return candidates[choice.index] if choice.index is not None else None


def make_wise(out: Path, source: Path | None, alphas: list[float], rule, progress) -> Path | None:
    """`clipfit interpolate` of the chosen run or soup at `alphas`, by the sweep's rule."""
    from clipfit.interpolate import interpolate

    folder = out / WISE_DIR
    if source is None:
        progress.warn("sweep --wise: no run or soup was chosen, so none is interpolated")
        return None
    if derived_status(folder, "interpolation", [str(source.resolve())], {"alphas": alphas}):
        progress.info(f"sweep: {folder.name} made earlier, kept")
        return folder
    argv = ["interpolate", str(source), "--alpha", ",".join(f"{a:g}" for a in alphas), "--out", str(folder)]
    try:
        interpolate(source, alphas, folder, True, rule.metric, rule.max_zeroshot_drop, None, argv, progress)
    except UsageError as e:
        progress.warn(f"sweep --wise: no interpolation ({e})")
        return None
    return folder


def check_same_settings(run_dir: Path, config) -> None:
    from clipfit.config import RESULT_NEUTRAL, saved_settings

    saved = saved_settings(json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["config"])
    changed = [k for k, v in config.to_dict().items() if k not in RESULT_NEUTRAL and saved.get(k) != v]
    if changed:
        raise UsageError(f"{run_dir}: a finished run with other settings ({', '.join(changed)}); "
                         "use a new --out for a different sweep")


def write_summary(out: Path, run_dirs: list[Path], combos: list[dict], rule, soup_dirs: list[Path] = (),
                  wise_dir: Path | None = None) -> dict[str, Any]:
    """sweep.json, sweep.md and sweep.html (with the trade-off plot). The rule chooses among the
    runs and the soups; the WiSE-FT folder has its own choice of α."""
    from clipfit.eval.compare import compare_runs, read_run
    from clipfit.io import write_json, write_text
    from clipfit.report_html import markdown_to_html
    from clipfit.selection import choose, metric_value, pareto_front, record

    table, soups = compare_runs(run_dirs), compare_runs(list(soup_dirs))["runs"] if soup_dirs else []
    candidates = list(run_dirs) + list(soup_dirs)
    start = table["runs"][0]["before"]
    choice = choose([r["after"] for r in table["runs"] + soups], start, rule, [d.name for d in candidates])
    selection = {**record(choice, rule, "none is chosen"), "start_score": metric_value(start, rule.metric)}
    wise = read_run(wise_dir) if wise_dir else None
    points, trajectory = sweep_points(selection, wise, start, rule.metric)
    summary = {"clipfit": "sweep", "out": str(out), "grid": combos, "runs": table["runs"], "metrics": table["metrics"],
               "soups": soups, "wise": wise_summary(wise_dir, wise), "selection": selection,
               "pareto": [points[i].label for i in pareto_front(points)] if any(p.placed for p in points) else None,
               "chosen_run": str(candidates[choice.index]) if choice.index is not None else None}
    write_json(out / SWEEP_JSON, summary)
    markdown = render(summary, combos, plot(out, points, trajectory, selection))
    write_text(out / SWEEP_MD, markdown)
    write_text(out / SWEEP_HTML, markdown_to_html(markdown, out, f"clipfit sweep {out.name}"))
    return summary


def sweep_points(selection: dict, wise: dict | None, start: dict[str, float], metric: str):
    """Every point of the trade-off plane (the start, each run, soup and WiSE-FT α) and the
    trajectory from the start through the α to the interpolated model."""
    from dataclasses import replace

    from clipfit.selection import START, TradeoffPoint, alpha_points, tradeoff_points

    points = [TradeoffPoint(START, 0.0, 0.0 if any(c["zeroshot_drop"] is not None for c in selection["candidates"])
                            else None, "start")]
    points += [replace(p, kind="soup" if p.label.startswith(SOUP_DIR.format(recipe="")) else "run")
               for p in tradeoff_points(selection)]
    if wise is None:
        return points, []
    first = len(points)
    points += alpha_points(wise["interpolation"], start, metric, f"{WISE_DIR} ", "wise")[1:]
    return points, [0, *range(first, len(points))]


def wise_summary(wise_dir: Path | None, wise: dict | None) -> dict | None:
    if wise is None:
        return None
    interpolation = wise["interpolation"]
    return {"run_dir": str(wise_dir), "source_run": interpolation["source_run"], "alphas": interpolation["alphas"],
            "alpha": interpolation["alpha"],
            "reason": (wise.get("selection") or {}).get("reason", "the only α given"), "after": wise["after"]}


def plot(out: Path, points: list, trajectory: list[int], selection: dict) -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from clipfit.report_figures import GAIN_LABEL, tradeoff_figure

    drawn = tradeoff_figure(points, selection["chosen"], selection["max_zeroshot_drop"],
                            GAIN_LABEL.format(metric=selection["metric"]), out / SWEEP_PNG, trajectory)
    return SWEEP_PNG if drawn else None


def render(summary: dict, combos: list[dict], picture: str | None) -> str:
    from clipfit.eval.compare import cell
    from clipfit.report import candidates_table
    from clipfit.selection import points_text

    runs, soups, selection = summary["runs"], summary["soups"], summary["selection"]
    columns = runs + soups
    names = [Path(r["run_dir"]).name for r in columns]
    blank = [""] * len(soups)
    lines = [f"# clipfit sweep: {len(runs)} runs" + (f" and {len(soups)} soups" if soups else ""), "",
             f"Chosen by `{selection['metric']}` ({selection['direction']} is better"
             + (f", held-out zero-shot top-1 at most {points_text(selection['max_zeroshot_drop'])} below the start"
                if selection["max_zeroshot_drop"] is not None else "") + f"): {selection['reason']}.", "",
             "## Runs", "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(columns)]
    for setting in combos[0]:
        lines.append(f"| {setting} | " + " | ".join([str(c[setting]) for c in combos] + blank) + " |")
    lines.append("| steps | " + " | ".join([str(r["steps"]) for r in runs] + blank) + " |")
    for metric in summary["metrics"]:
        lines.append(f"| {metric} | " + " | ".join(cell(r, metric) for r in columns) + " |")
    lines += ["", "After (change from each run's own before); rates in %, changes in points."
              + (" Each soup's folder has its report and the runs in it." if soups else ""), "",
              "## Selection", ""] + candidates_table(selection)
    lines += wise_lines(summary["wise"])
    lines += tradeoff_lines(summary["pareto"], picture)
    return "\n".join(lines) + "\n"


def wise_lines(wise: dict | None) -> list[str]:
    if wise is None:
        return []
    return ["", "## WiSE-FT", "", f"`{WISE_DIR}/` interpolates `{Path(wise['source_run']).name}` towards the start at "
            f"α = {', '.join(f'{a:g}' for a in wise['alphas'])}: kept α = {wise['alpha']:g} ({wise['reason']})."]


def tradeoff_lines(pareto: list[str] | None, picture: str | None) -> list[str]:
    if pareto is None:
        return ["", "## Trade-off", "", "No held-out zero-shot set was measured, so there is no trade-off to show "
                "(add --eval-zeroshot DATASET=PATH)."]
    lines = ["", "## Trade-off: target gain against held-out zero-shot change", "",
             "Pareto-optimal (no other point gains more on the target without losing more held-out top-1): "
             + ", ".join(f"`{label}`" for label in pareto) + "."]
    if picture:
        lines += ["", f"![target gain against held-out change]({picture})"]
    return lines
