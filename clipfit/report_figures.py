"""The pictures beside report.md: loss curves and a before/after bar chart (PNG, Agg).

matplotlib's object API with an Agg canvas: no pyplot, no global backend, no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipfit.rundir import BEFORE_AFTER, CONFUSION_PLOT, LOSS_CURVES, SELECTION_PLOT

NOT_TERMS = ("step", "epoch", "lr", "pairs_per_s")
HEADLINE_MEASURES = ("clip_loss", "modality_gap", "alignment")  # charted beside the rates; the tables hold the rest


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure, path: Path) -> None:
    from clipfit.io import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})


def loss_curves(rows: list[dict[str, Any]], path: Path) -> bool:
    steps = [r for r in rows if "loss" in r]
    validation = [r for r in rows if "val_clip_loss" in r]
    if not steps:
        return False
    figure = new_figure(7, 3.5)
    axes = figure.add_subplot()
    terms = [k for k in steps[0] if k not in NOT_TERMS and isinstance(steps[0][k], (int, float))]
    if len(terms) == 2:  # one method term: it is the loss, no need to draw it twice
        terms = ["loss"]
    for term in terms:
        points = [(r["step"], r[term]) for r in steps if term in r]
        axes.plot(*zip(*points), label=term, linewidth=2 if term == "loss" else 1)
    if validation:
        axes.plot([r["step"] for r in validation], [r["val_clip_loss"] for r in validation], "o--",
                  label="validation clip_loss")
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("loss")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    save(figure, path)
    return True


def before_after_bars(before: dict[str, float], after: dict[str, float], path: Path) -> bool:
    """Horizontal bars: rates (percent) on one axis, the headline measures on another."""
    from clipfit.eval.metrics import is_number
    from clipfit.eval.results import is_rate, listed_once

    names = [k for k in listed_once(after) if is_number(after[k]) and is_number(before.get(k))]
    measures = [n for n in names if n.rpartition("/")[2] in HEADLINE_MEASURES]
    panels = [("percent", [n for n in names if is_rate(n)]), ("lower is better", measures)]
    panels = [(unit, group) for unit, group in panels if group]
    if not panels:
        return False
    figure = new_figure(8, 1 + 0.32 * sum(len(group) for _, group in panels) + 0.6 * len(panels))
    grid = figure.add_gridspec(len(panels), 1, height_ratios=[len(group) for _, group in panels])
    for row, (unit, group) in enumerate(panels):
        axes = figure.add_subplot(grid[row])
        positions = range(len(group))
        axes.barh([p + 0.2 for p in positions], [before[n] for n in group], height=0.4, label="before")
        axes.barh([p - 0.2 for p in positions], [after[n] for n in group], height=0.4, label="after")
        axes.set_yticks(list(positions), group, fontsize="small")
        axes.invert_yaxis()
        axes.set_xlabel(unit)
        axes.grid(axis="x", alpha=0.3)
        axes.legend(fontsize="small")
    save(figure, path)
    return True


def write_figures(run_dir: Path, run_info: dict[str, Any], rows: list[dict]) -> list[tuple[str, str]]:
    """(caption, file name) of each picture written; none without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    pictures = []
    if loss_curves(rows, run_dir / LOSS_CURVES):
        pictures.append(("Loss curves", LOSS_CURVES))
    if before_after_bars(run_info.get("before", {}), run_info.get("after", {}), run_dir / BEFORE_AFTER):
        pictures.append(("Before and after", BEFORE_AFTER))
    if selection_figure(run_dir, run_info):
        what = "along α" if run_info.get("interpolation") else "every evaluated step"
        pictures.append((f"Target gain against held-out zero-shot change, {what}", SELECTION))
    if confusion_figure(run_info.get("classes_before"), run_info.get("classes_after"), run_dir / CONFUSION_PLOT):
        pictures.append(("Confusion matrices before and after (rows: true class, columns: predicted)", CONFUSION_PLOT))
    return pictures


def confusion_figure(before: dict | None, after: dict | None, path: Path) -> bool:
    """The confusion matrices side by side, each row as fractions of its class's images."""
    import numpy as np

    if not after:
        return False
    panels = [(title, facts) for title, facts in (("before", before), ("after", after)) if facts]
    names = after["classes"]
    side = min(14.0, 2.5 + 0.35 * len(names))
    figure = new_figure(side * len(panels), side * 0.85)
    for column, (title, facts) in enumerate(panels):
        matrix = np.array(facts["confusion"], dtype=float)
        rows = np.divide(matrix, matrix.sum(axis=1, keepdims=True), out=np.zeros_like(matrix),
                         where=matrix.sum(axis=1, keepdims=True) > 0)
        axes = figure.add_subplot(1, len(panels), column + 1)
        axes.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        if len(names) <= 30:  # above, the tick labels would overlap
            axes.set_xticks(range(len(names)), names, rotation=90, fontsize="x-small")
            axes.set_yticks(range(len(names)), names, fontsize="x-small")
        axes.set_title(f"{title}: top-1 {100 * np.trace(matrix) / max(matrix.sum(), 1):.1f}%")
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
    save(figure, path)
    return True


SELECTION = SELECTION_PLOT
# kind -> (marker, colour, legend label) of a point on the trade-off plane
KIND_STYLE = {"start": ("s", "black", "start"), "candidate": ("o", "tab:blue", "evaluated"),
              "run": ("o", "tab:blue", "runs"), "soup": ("D", "tab:green", "soups"),
              "wise": ("^", "tab:orange", "WiSE-FT α")}
GAIN_LABEL = "{metric} gain over the starting model"
MAX_LABELS = 12  # beyond this many points the labels overlap: only the Pareto front's and the chosen one's
CHANGE_LABEL = "held-out zero-shot top-1 change from the start (worst set, points; right is better)"


def labelled(placed: list, front: list, chosen: str | None) -> list:
    """The points whose labels a trade-off plot prints: all of them, or beyond MAX_LABELS (where
    labels overlap) the Pareto front's and the chosen one's."""
    if len(placed) <= MAX_LABELS:
        return placed
    return [p for p in placed if p in front or p.label == chosen]


def tradeoff_figure(points: list, chosen: str | None, limit: float | None, gain_label: str, path: Path,
                    trajectory: list[int] = (), size: tuple[float, float] = (7, 4.5)) -> bool:
    """Target gain (up is better) against held-out change (right is better) for each
    clipfit.selection.TradeoffPoint, drawn by kind; `trajectory` (indices) joined in order (steps,
    α), the Pareto front dashed, the `chosen` label starred, the --max-zeroshot-drop limit dotted;
    every point labelled, or with more than MAX_LABELS points the front's and the chosen one's."""
    from clipfit.selection import pareto_front

    placed = [p for p in points if p.placed]
    if not placed:
        return False
    figure = new_figure(*size)
    axes = figure.add_subplot()
    line = [points[i] for i in trajectory if points[i].placed]
    if len(line) > 1:
        axes.plot([p.change for p in line], [p.gain for p in line], "-", color="lightgrey", zorder=1)
    for kind, (marker, colour, label) in KIND_STYLE.items():
        group = [p for p in placed if p.kind == kind]
        if group:
            axes.plot([p.change for p in group], [p.gain for p in group], marker, color=colour, label=label, zorder=3)
    front = sorted((points[i] for i in pareto_front(points)), key=lambda p: (p.change, -p.gain))
    for p in labelled(placed, front, chosen):
        axes.annotate(p.label, (p.change, p.gain), textcoords="offset points", xytext=(4, 3), fontsize="x-small")
    axes.plot([p.change for p in front], [p.gain for p in front], "--", color="tab:purple", label="Pareto front", zorder=2)
    picked = [p for p in placed if p.label == chosen]
    if picked:
        axes.plot([picked[0].change], [picked[0].gain], "*", markersize=18, color="tab:red", label="chosen", zorder=4)
    if limit is not None:
        axes.axvline(-limit, linestyle=":", color="grey", label=f"--max-zeroshot-drop {limit:g}")
    axes.axhline(0, color="black", linewidth=0.5)
    axes.axvline(0, color="black", linewidth=0.5)
    axes.set_xlabel(CHANGE_LABEL)
    axes.set_ylabel(gain_label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    save(figure, path)
    return True


def selection_figure(run_dir: Path, run_info: dict[str, Any]) -> bool:
    """The trade-off of every evaluated step (refine --select-best), or of every α (interpolate)."""
    from clipfit.selection import tradeoff_points

    if run_info.get("interpolation"):
        return alpha_figure(run_dir, run_info)
    selection = run_info.get("selection")
    if not selection:
        return False
    points = tradeoff_points(selection)
    return tradeoff_figure(points, selection["chosen"], selection.get("max_zeroshot_drop"),
                           GAIN_LABEL.format(metric=selection["metric"]), run_dir / SELECTION, range(len(points)))


def alpha_figure(run_dir: Path, run_info: dict[str, Any]) -> bool:
    """WiSE-FT: the start and every α, in order of α."""
    from clipfit.selection import alpha_points

    interpolation, selection = run_info["interpolation"], run_info.get("selection") or {}
    if not interpolation.get("metric"):
        return False
    points = alpha_points(interpolation, run_info["before"])
    return tradeoff_figure(points, interpolation.get("chosen"), selection.get("max_zeroshot_drop"),
                           GAIN_LABEL.format(metric=interpolation["metric"]), run_dir / SELECTION, range(len(points)))
