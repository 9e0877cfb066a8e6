"""`clipfit interpolate RUN --alpha ...`: WiSE-FT (Wortsman et al., CVPR 2022) towards the starting weights.

    θ(α) = (1 − α) · θ_start + α · θ_tuned

θ_start is the run's starting model as run.json records it (--model, --pretrained, seed), θ_tuned
its model.safetensors (with LoRA: the merged model, so the adapter's delta is scaled by α). Each α
is measured as the run was (clipfit.derived.Bench: its validation split or training subset, its
--eval-* sets and any given to interpolate). One α is written as it is. Among several, the target
metric chooses (clipfit.selection.default_metric unless --select-best), and with held-out
zero-shot sets only α whose top-1 stays within --max-zeroshot-drop (default 1 point) of the start
may be chosen; when none does, the start (α = 0) is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipfit.errors import UsageError
from clipfit.rundir import INTERPOLATED

TUNED_FILES = {"model": "model.safetensors", "last": "last.safetensors"}
TUNED_RECORDS = {"model": "after", "last": "last"}  # run.json's measurement of each (α = 1)
KEEP_START = "the start (α = 0) is kept"


def interpolate_state(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """θ_start + α (θ_tuned − θ_start) for every floating-point tensor, through torch.lerp, which
    gives θ_start at α = 0 and θ_tuned at α = 1 exactly; integer buffers are the tuned model's."""
    if start.keys() != tuned.keys():
        different = sorted(start.keys() ^ tuned.keys())
        raise UsageError(f"the starting and tuned models differ in their tensors (e.g. {different[0]}); "
                         "interpolation needs the same architecture")
    out = {}
    for name, end in tuned.items():
        begin = start[name].to(end.device)
        out[name] = torch.lerp(begin.to(end.dtype), end, alpha) if end.is_floating_point() else end.clone()
    return out


def parse_alphas(text: str, flag: str = "--alpha") -> list[float]:
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected numbers separated by commas, e.g. 0.25,0.5,0.75") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise UsageError(f"{flag} {text!r}: every α must be in [0, 1]")
    return list(dict.fromkeys(alphas))


def alpha_label(alpha: float) -> str:
    return f"α={alpha:g}"


def alpha_rule(run_dir: Path, measured, alphas: list[float], select_best: str | None, saved_select_best: str | None,
               max_drop: float | None, saved_max_drop: float | None):
    """(target metric, rule): the metric the report plots α by (None when nothing is measured to
    score by) and the rule that chooses among `alphas` (None for one α: nothing to choose). Refused
    with one line saying what would work when several α have nothing to be chosen by."""
    from clipfit.selection import Rule, retention_limit

    metric = select_best or saved_select_best or measured.default_metric()
    if metric is None:
        if len(alphas) > 1:
            raise UsageError(f"{run_dir}: nothing to choose among {len(alphas)} α by: the run has no validation split "
                             "and no --eval-* sets; give one --alpha, or sets to measure each α on "
                             "(--eval-retrieval PAIRS or --eval-zeroshot DATASET=PATH given to interpolate)")
        return None, None
    measured.check(metric)
    limit = retention_limit(max_drop if max_drop is not None else saved_max_drop, measured.zeroshot)
    return metric, Rule(metric, limit) if len(alphas) > 1 else None


def choose_alpha(alphas: list[float], measured: list[dict[str, float]], before: dict[str, float], rule):
    """(α kept, its measurement, the Choice or None): the rule's choice among `alphas`; the start
    (α = 0, measured as `before`) when no α is eligible; the only α when there is no rule."""
    from clipfit.selection import choose

    if rule is None:
        return alphas[0], measured[0], None
    choice = choose(measured, before, rule, [alpha_label(a) for a in alphas])
    if choice.index is None:
        return 0.0, before, choice
    return alphas[choice.index], measured[choice.index], choice


def interpolate(run_dir: Path, alphas: list[float], out: Path | None, overwrite: bool, select_best: str | None,
                max_drop: float | None, device_name: str | None, argv: list[str], progress,
                which: str = "model", zeroshot: list[str] = (), retrieval: list[str] = ()) -> dict[str, Any]:
    from clipfit.derived import Measured, finished_run, into_new_folder, saved_config

    saved = finished_run(run_dir)
    if not (run_dir / TUNED_FILES[which]).is_file():
        raise UsageError(f"{run_dir / TUNED_FILES[which]}: not found" + (
            "; only runs with --select-best keep the last step apart" if which == "last" else ""))
    config = saved_config(saved, zeroshot, retrieval)
    metric, rule = alpha_rule(run_dir, Measured.of(config, saved), alphas, select_best, config.select_best, max_drop,
                              config.max_zeroshot_drop)
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}{INTERPOLATED}"
    return into_new_folder(out, {"the run being interpolated": run_dir}, saved, overwrite, progress, lambda folder: interpolate_into(
        folder, run_dir, saved, config, alphas, metric, rule, device_name, argv, progress, which))


def interpolate_into(out_dir: Path, run_dir: Path, saved: dict, config, alphas: list[float], metric: str | None,
                     rule, device_name: str | None, argv: list[str], progress, which: str) -> dict[str, Any]:
    import time

    from clipfit.derived import Bench, write_derived
    from clipfit.eval.suite import deltas
    from clipfit.selection import START, metric_value, record

    started = time.time()
    bench = Bench.open(run_dir, saved, config, out_dir, device_name, progress)
    start, tuned = bench.start(), bench.weights_of(run_dir, TUNED_FILES[which])
    bench.reuse_unchanged(tuned)  # what no α changes is encoded once (clipfit.frozen.measure)
    before = bench.before()
    measured = [before if alpha == 0 else
                bench.measure(interpolate_state(start, tuned, alpha), f"{run_dir} interpolated at α = {alpha:g}")
                for alpha in alphas]
    alpha, after, choice = choose_alpha(alphas, measured, before, rule)
    chosen = alpha_label(alpha) if choice is None or choice.index is not None else START
    selection = None if choice is None else {**record(choice, rule, KEEP_START), "chosen": chosen,
                                             "start_score": metric_value(before, rule.metric)}
    info = {"clipfit": "interpolate", "argv": argv,
            "interpolation": {"source_run": str(run_dir.resolve()), "alpha": alpha, "alphas": alphas,
                              "metric": metric, "chosen": chosen,
                              "tuned_weights": TUNED_FILES[which],
                              "formula": "(1 - alpha) * start + alpha * tuned",
                              "start": {"model": config.model, "pretrained": config.pretrained, "seed": config.seed},
                              "measured": {alpha_label(a): m for a, m in zip(alphas, measured)},
                              "tuned_measured": None if bench.added_sets else saved.get(TUNED_RECORDS[which])},
            "before": before, "after": after, "delta": deltas(before, after), "selection": selection,
            "added_sets": {"eval_zeroshot": config.eval_zeroshot, "eval_retrieval": config.eval_retrieval}
            if bench.added_sets else None}
    info["wall_seconds"] = time.time() - started
    return write_derived(out_dir, bench, interpolate_state(start, tuned, alpha), info)
