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
        pictures.append(("Target gain against held-out zero-shot drop, every evaluated step", SELECTION))
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


def gain_vs_drop(points: list[tuple[str, float | None, float | None]], chosen: int | None, limit: float | None,
                 gain_label: str, path: Path) -> bool:
    """Target gain (up is better) against held-out zero-shot top-1 drop (right is worse) for each
    candidate (label, gain, drop); the chosen one starred, the --max-zeroshot-drop limit dashed."""
    drawn = [(i, label, gain, drop) for i, (label, gain, drop) in enumerate(points) if gain is not None and drop is not None]
    if not drawn:
        return False
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    axes.plot([d for *_, d in drawn], [g for _, _, g, _ in drawn], "o", color="tab:blue", label="evaluated")
    for _, label, gain, drop in drawn:
        axes.annotate(label, (drop, gain), textcoords="offset points", xytext=(4, 3), fontsize="x-small")
    picked = [(g, d) for i, _, g, d in drawn if i == chosen]
    if picked:
        axes.plot([picked[0][1]], [picked[0][0]], "*", markersize=18, color="tab:red", label="chosen")
    if limit is not None:
        axes.axvline(limit, linestyle="--", color="grey", label=f"--max-zeroshot-drop {limit:g}")
    axes.axhline(0, color="black", linewidth=0.5)
    axes.axvline(0, color="black", linewidth=0.5)
    axes.set_xlabel("held-out zero-shot top-1 drop from the start (points; right is worse)")
    axes.set_ylabel(gain_label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    save(figure, path)
    return True


def selection_figure(run_dir: Path, run_info: dict[str, Any]) -> bool:
    from clipfit.selection import gain_points

    selection = run_info.get("selection")
    if not selection:
        return False
    labels = [c["label"] for c in selection["candidates"]]
    chosen = labels.index(selection["chosen"]) if selection["chosen"] in labels else None
    return gain_vs_drop(gain_points(selection), chosen, selection.get("max_zeroshot_drop"),
                        f"{selection['metric']} gain over the starting model", run_dir / SELECTION)
