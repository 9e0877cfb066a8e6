"""report.md: what was run, on what, how the loss went, and what changed before → after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipfit.config import saved_settings
from clipfit.eval.results import listed_once
from clipfit.io import read_jsonl, write_text
from clipfit.rundir import METRICS_JSONL, REPORT_HTML, REPORT_MD
from clipfit.selection import lower_is_better

DERIVED = ("interpolate", "soup")  # runs made without training: no loss to report
GAP_FORMS = ("modality_gap: L2 distance between the centroids of the normalised image and text embeddings; "
             "modality_gap_mse: the squared centroid difference averaged over dimensions.")


RATES_NOTE = "Rates (acc, recall) are percentages; their change is in points."


def fmt(value: Any) -> str:
    from clipfit.eval.metrics import is_number

    if value is None or (isinstance(value, float) and not is_number(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metric_rows(before: dict[str, float], after: dict[str, float]) -> list[tuple[str, str, str, str, str]]:
    """(metric, before, after, change, verdict) for each metric measured both times; the verdict is
    better, worse, or empty (no change, or no value)."""
    from clipfit.eval.metrics import is_number

    rows = []
    for name in before:
        if name not in after:
            continue
        if not (is_number(before[name]) and is_number(after[name])):
            rows.append((name, fmt(before[name]), fmt(after[name]), "n/a", ""))
            continue
        delta = after[name] - before[name]
        better = (delta < 0) if lower_is_better(name) else (delta > 0)
        verdict = "" if abs(delta) < 1e-12 else ("better" if better else "worse")
        rows.append((name, fmt(before[name]), fmt(after[name]), f"{delta:+.4f}", verdict))
    return rows


def metric_groups(before: dict[str, float], after: dict[str, float]) -> list[tuple[str, dict, dict]]:
    """(group, before, after) with the metrics' short names: the split's own yardsticks first (group
    ""), then one group per evaluation set (`group/set/metric` keys); each metric once."""
    before, after = listed_once(before), listed_once(after)
    names: dict[str, list[str]] = {}
    for name in before:
        names.setdefault(name.rpartition("/")[0], []).append(name)
    own = names.pop("", [])
    groups = [("", {k: before[k] for k in own}, after)]
    for group, keys in names.items():
        groups.append((group, {k.rpartition("/")[2]: before[k] for k in keys},
                       {k.rpartition("/")[2]: after[k] for k in keys if k in after}))
    return groups


def before_after_table(before: dict[str, float], after: dict[str, float]) -> list[str]:
    lines = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for name, old, new, change, verdict in metric_rows(before, after):
        lines.append(f"| {name} | {old} | {new} | {change}{f' ({verdict})' if verdict else ''} |")
    return lines


def sets_summary(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """One row per evaluation set, top-1 (or its score) and ECE before → after, and their means."""
    from clipfit.eval.suites import mean_label, side_by_side

    view = side_by_side([before, after])
    if not view:
        return []
    lines = ["", "### Evaluation sets: top-1 and calibration", "",
             "| set | top-1 before | after | change | ECE before | after | change |", "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [(name, cells, view["change"][name]) for name, cells in view["sets"].items()]
    rows.append((f"**{mean_label(view).replace(' (', '** (', 1)}", view["mean"], view["mean_change"]))
    for name, (first, second), change in rows:
        cells = [fmt(first.get(m)) + " | " + fmt(second.get(m)) + " | " + signed(change.get(m)) for m in ("score", "ece")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Top-1 is a multi-label set's mAP and a retrieval set's mean Recall@5; ECE is the expected "
                  "calibration error at the model's logit scale, lower is better."]
    return lines


def signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def grouped_before_after(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """The split's own yardsticks first, then the evaluation sets' top-1 and ECE in one table, then
    one table per evaluation set (`group/set/metric` keys); each metric once."""
    groups = metric_groups(before, after)
    lines = before_after_table(*groups[0][1:])
    lines += sets_summary(before, after) if after else []
    for group, old, new in groups[1:]:
        lines += ["", f"### {group.replace('/', ' · ')}", ""] + before_after_table(old, new)
    if any(new for _, _, new in groups[1:]):
        lines += ["", RATES_NOTE]
    return lines


def picture_lines(pictures: list[tuple[str, str]]) -> list[str]:
    lines = ["## Pictures", ""] if pictures else []
    for caption, file in pictures:
        lines += [f"![{caption}]({file})", ""]
    return lines


def gate_lines(gate: dict[str, Any] | None) -> list[str]:
    if not gate:
        return []
    verdict = "passed" if gate["passed"] else "FAILED (exit status 6)"
    drops = ", ".join(f"{name} {s['drop']:+.2f}" for name, s in gate["sets"].items())
    return ["", f"Regression gate `--fail-on-zeroshot-drop {gate['max_drop']:g}`: {verdict}; top-1 drop in points: {drops}."]


def interpolation_lines(interpolation: dict[str, Any] | None) -> list[str]:
    if not interpolation:
        return []
    start = interpolation["start"]
    return [f"- WiSE-FT interpolation of `{interpolation['source_run']}` at α = {interpolation['alpha']:g}: "
            f"θ = (1 − α)·θ_start + α·θ_tuned, θ_start = {start['model']} ({start['pretrained']}, seed {start['seed']}); "
            f"α tried: {', '.join(f'{a:g}' for a in interpolation['alphas'])}. Before is the starting model."]


FORMULAS = {"uniform": "θ = (1/N)·Σ θ_i over the N runs in the soup",
            "greedy": "θ = (1/N)·Σ θ_i over the N runs kept: best first by the target metric, each kept when the "
                      "soup with it scores no worse and keeps held-out zero-shot top-1 within the limit",
            "stock": "θ = t·θ_avg + (1 − t)·θ_start per tensor, t = N·cosθ / (1 + (N − 1)·cosθ), cosθ the mean "
                     "cosine between the runs' updates from the start (clipped to [0, 1])"}


def soup_lines(soup: dict[str, Any] | None) -> list[str]:
    """Which runs went into a soup, how, and (greedy) every soup tried."""
    if not soup:
        return []
    lines = ["", f"## Soup (`--recipe {soup['recipe']}`)", "", f"{FORMULAS[soup['recipe']]}. Before is the starting "
             "model; the numbers are measured as the first run's were.", "",
             "| run | method | lr | steps | seed | in the soup |", "|---|---|---:|---:|---:|---|"]
    for run in soup["runs"]:
        lines.append(f"| {run['label']} | {run['method']} | {fmt(run['lr'])} | {fmt(run['steps'])} | {run['seed']} | "
                     f"{'yes' if run['kept'] else 'no'} |")
    if soup.get("steps"):
        limit = soup["max_zeroshot_drop"]
        lines += ["", f"Greedy, by `{soup['metric']}`" + (f", held-out zero-shot top-1 at most {limit:g} points below "
                                                          "the start" if limit is not None else "") + ":", "",
                  f"| soup tried | {soup['metric']} | held-out top-1 drop | eligible | kept |", "|---|---:|---:|---|---|"]
        for step in soup["steps"]:
            drop = "" if step["zeroshot_drop"] is None else f"{step['zeroshot_drop']:+.2f}"
            lines.append(f"| {step['label']} | {fmt(step['score'])} | {drop} | {'yes' if step['eligible'] else 'no'} | "
                         f"{'yes' if step['kept'] else 'no'} |")
    ratios = [t for t in (soup.get("ratios") or {}).values() if t is not None]
    if soup.get("ratios"):
        untouched = len(soup["ratios"]) - len(ratios)
        spread = (f"mean {sum(ratios) / len(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f} over "
                  f"{len(ratios)} tensors" if ratios else "no tensor changed by any run")
        lines += ["", f"Model Stock's t per tensor: {spread}; {untouched} tensors no run changed keep the start's "
                      "(run.json `soup.ratios` has every t)."]
    return lines


def selection_lines(selection: dict[str, Any] | None) -> list[str]:
    """--select-best: which step model.safetensors holds, why, and every evaluated step."""
    if not selection:
        return []
    stopped = (f" Training stopped early: {selection['patience']} evaluations in a row without a new best "
               "(`--patience`)." if selection.get("stopped_early") else "")
    if "chosen_step" in selection:
        what = (f"`model.safetensors` holds step {selection['chosen_step']}, `last.safetensors` the last step "
                f"({selection['last_step']}); the after numbers above are step {selection['chosen_step']}'s.{stopped}")
    else:
        what = f"`model.safetensors` holds {selection['chosen']}; the after numbers above are its."
    lines = ["", f"## Selected (`--select-best {selection['metric']}`, {selection['direction']} is better)", "",
             f"Kept {selection['reason']}. {what}", ""]
    return lines + candidates_table(selection)


def candidates_table(selection: dict[str, Any]) -> list[str]:
    """One row per candidate; the held-out drop column only when a zero-shot set was measured."""
    with_drop = any(c["zeroshot_drop"] is not None for c in selection["candidates"])
    drop_head, drop_rule = (" held-out zero-shot top-1 drop |", "---:|") if with_drop else ("", "")
    lines = [f"| candidate | {selection['metric']} |{drop_head} eligible | kept |", f"|---|---:|{drop_rule}---|---|"]
    for c in selection["candidates"]:
        drop = ("" if c["zeroshot_drop"] is None else f" {c['zeroshot_drop']:+.2f}") + " |" if with_drop else ""
        kept = "★ kept" if c["label"] == selection["chosen"] else ""
        lines.append(f"| {c['label']} | {fmt(c['score'])} |{drop} {'yes' if c['eligible'] else 'no'} | {kept} |")
    return lines


CONFUSION_TABLE_MAX = 12  # classes up to which report.md spells the confusion matrix out; above, the picture only


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def classes_lines(run_info: dict[str, Any]) -> list[str]:
    """A folder of classes: each class's top-1 before → after on the evaluation split, and the
    confusion matrix (true class by row, predicted by column; cells `before → after`)."""
    before, after = run_info.get("classes_before"), run_info.get("classes_after")
    if not after:
        return []
    names, counts = after["classes"], [sum(row) for row in after["confusion"]]
    lines = ["", f"## Classes ({run_info.get('eval_split', 'validation')}, zero-shot from the model's own text tower)", "",
             "| class | images | top-1 before | top-1 after | change |", "|---|---:|---:|---:|---:|"]
    for i, name in enumerate(names):
        old, new = before["per_class_acc1"][i] if before else None, after["per_class_acc1"][i]
        change = f"{new - old:+.1f}" if old is not None and new is not None else "n/a"
        lines.append(f"| {name} | {counts[i]} | {percent(old)} | {percent(new)} | {change} |")
    if len(names) > CONFUSION_TABLE_MAX:
        return lines + ["", f"The confusion matrices of the {len(names)} classes are drawn below."]
    old_cells = before["confusion"] if before else [[None] * len(names)] * len(names)
    lines += ["", "Confusion matrix, images of each true class (row) by predicted class (column), before → after:", "",
              "| true \\ predicted | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for name, row_before, row_after in zip(names, old_cells, after["confusion"]):
        cells = [f"{b} → {a}" if b is not None and b != a else str(a) for b, a in zip(row_before, row_after)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def loss_summary(rows: list[dict]) -> list[str]:
    steps = [r for r in rows if "loss" in r]
    if not steps:
        return ["No training steps were logged."]
    terms = [k for k in steps[0] if k not in ("step", "epoch", "lr", "pairs_per_s")]
    lines = ["| term | first | last | min |", "|---|---:|---:|---:|"]
    for term in terms:
        values = [r[term] for r in steps if term in r]
        lines.append(f"| {term} | {fmt(values[0])} | {fmt(values[-1])} | {fmt(min(values))} |")
    speed = [r["pairs_per_s"] for r in steps if "pairs_per_s" in r]
    if speed:
        lines.append("")
        lines.append(f"Median throughput: {sorted(speed)[len(speed) // 2]:.1f} pairs/s over {len(steps)} logged steps.")
    return lines


def method_sections(methods: dict[str, dict]) -> list[str]:
    lines = []
    for name, facts in methods.items():
        if facts:
            lines += [f"### {name}", ""] + [f"- {key}: {fmt(value)}" for key, value in facts.items()] + [""]
    return lines


def targets_line(config: dict[str, Any]) -> str:
    if saved_settings(config)["multi_positive"]:
        return "multi-positive targets (items of one class or caption in a batch are not each other's negatives)"
    return "one-hot targets (--no-multi-positive)"


def render(run_info: dict[str, Any], rows: list[dict], pictures: list[tuple[str, str]] = (), pairs=None) -> str:
    from clipfit.report_gallery import gallery_markdown

    c, r = run_info["config"], run_info["resolved"]
    soup = run_info.get("soup")
    lines = [
        f"# clipfit soup: {soup['recipe']} of {len(soup['runs'])} runs" if soup else f"# clipfit run: {c['method']}", "",
        f"- data: `{run_info['pairs']}` ({r['layout']} layout), {r['train_pairs']} training pairs, "
        f"{r['val_pairs']} validation pairs, {run_info.get('skipped', 0)} skipped",
        f"- model: {run_info['model']['arch']} ({run_info['model']['pretrained']})",
    ]
    lines += [] if soup else [
        f"- loss weights: {', '.join(f'{k}={v:g}' for k, v in r['weights'].items())}; {targets_line(c)}",
        f"- {run_info.get('steps', 0)} steps of batch {c['batch_size']} × accumulation {c['grad_accum']}, "
        f"lr {r['lr']:g}, {'LoRA r=' + str(c['lora_rank']) if c['lora'] else 'all unlocked weights'}, "
        f"{r['parameters']['trainable']:,} of {r['parameters']['total']:,} parameters trained",
        f"- device {r['device']}, precision {c['precision']}, seed {c['seed']}, "
        f"wall time {run_info.get('wall_seconds', 0):.1f} s (training {run_info.get('train_seconds', 0):.1f} s)",
    ]
    lines += interpolation_lines(run_info.get("interpolation"))
    lines += soup_lines(soup)
    lines += ["", f"## Before → after ({run_info.get('eval_split', 'validation')})", ""]
    lines += grouped_before_after(run_info.get("before", {}), run_info.get("after", {}))
    if "modality_gap" in run_info.get("before", {}):
        lines += ["", GAP_FORMS]
    lines += gate_lines(run_info.get("gate"))
    lines += classes_lines(run_info)
    lines += selection_lines(run_info.get("selection"))
    lines += [""] if run_info.get("clipfit") in DERIVED else ["", "## Loss", ""] + loss_summary(rows) + [""]
    lines += picture_lines(list(pictures))
    sections = method_sections(run_info.get("methods", {}))
    if sections:
        lines += ["## Methods", ""] + sections
    lines += gallery_markdown(run_info.get("gallery_before"), run_info.get("gallery_after"), pairs)  # last: the
    # HTML page adds the pictures of the gallery after it
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: Path, run_info: dict[str, Any], pairs=None, max_pixels: int | None = None) -> Path:
    """report.md, and report.html with the pictures and, given the evaluation `pairs`, the gallery."""
    from clipfit.report_figures import write_figures
    from clipfit.report_gallery import gallery_html
    from clipfit.report_html import markdown_to_html

    path = run_dir / REPORT_MD
    rows = read_jsonl(run_dir / METRICS_JSONL)
    markdown = render(run_info, rows, write_figures(run_dir, run_info, rows), pairs)
    write_text(path, markdown)
    gallery = gallery_html(pairs, run_info.get("gallery_before"), run_info.get("gallery_after"), max_pixels)
    write_text(run_dir / REPORT_HTML, markdown_to_html(markdown, run_dir, f"clipfit run {run_dir.name}", gallery))
    return path
