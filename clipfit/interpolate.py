"""`clipfit interpolate RUN --alpha ...`: WiSE-FT (Wortsman et al., CVPR 2022) towards the starting weights.

    θ(α) = (1 − α) · θ_start + α · θ_tuned

θ_start is the run's starting model as run.json records it (--model, --pretrained, seed), θ_tuned
its model.safetensors (with LoRA: the merged model, so the adapter's delta is scaled by α). Each α
is measured with the run's own validation split and --eval-* sets, by the code that measured the
run (clipfit.run.measure_model); the α that clipfit.selection's rule picks is written as a new
run folder with its report.
"""

from __future__ import annotations

import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from clipfit.errors import UsageError


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


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise UsageError(f"--alpha {text!r}: expected numbers separated by commas, e.g. 0.25,0.5,0.75") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise UsageError(f"--alpha {text!r}: every α must be in [0, 1]")
    return alphas


def saved_config(saved: dict[str, Any]):
    from clipfit.config import RefineConfig

    known = {f.name for f in fields(RefineConfig)}
    return RefineConfig(**{k: v for k, v in saved["config"].items() if k in known})


def rule_for(saved_cfg, alphas: list[float], select_best: str | None, max_drop: float | None, data, suite):
    from clipfit.selection import MEAN_R1, Rule, check_metric, selectable_metrics

    metric = select_best or saved_cfg.select_best or (MEAN_R1 if data.val else None)
    if metric is None:
        if len(alphas) > 1:
            raise UsageError("choosing among several --alpha values needs --select-best METRIC (the run has no "
                             "validation split for the default, mean-R@1)")
        metric = next(iter(suite_metric_names(suite)), MEAN_R1)
    check_metric(metric, selectable_metrics(bool(data.val), list(suite.zeroshot), list(suite.retrieval)))
    limit = max_drop if max_drop is not None else saved_cfg.max_zeroshot_drop
    if limit is not None and not suite.zeroshot:
        raise UsageError("--max-zeroshot-drop needs the run's --eval-zeroshot sets; this run measured none")
    return Rule(metric, limit)


def suite_metric_names(suite) -> list[str]:
    return [f"zeroshot/{name}/acc1" for name in suite.zeroshot] + [f"retrieval/{name}/text_retrieval_recall@1"
                                                                    for name in suite.retrieval]


def load_start(cfg):
    """The run's starting model, seeded as refine seeds it (random-init tests depend on it)."""
    from clipfit import models

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return models.load_model(cfg.model, cfg.pretrained)


TUNED_FILES = {"model": "model.safetensors", "last": "last.safetensors"}


def load_tuned(run_dir: Path, which: str):
    """The run's model; `last`: its last step's weights (written by --select-best) in its place."""
    from clipfit import models

    tuned = models.load_model(str(run_dir))
    if which == "last":
        path = run_dir / TUNED_FILES["last"]
        if not path.is_file():
            raise UsageError(f"{path}: not found; only runs with --select-best keep the last step apart")
        models.load_weights_into(tuned.model, path)
    return tuned


def interpolate(run_dir: Path, alphas: list[float], out: Path | None, overwrite: bool, select_best: str | None,
                max_drop: float | None, device_name: str | None, argv: list[str], progress,
                which: str = "model") -> dict[str, Any]:
    from clipfit.eval.compare import read_run
    from clipfit.rundir import RUN_JSON, claim_run_dir

    saved = read_run(run_dir)
    if not saved.get("after"):
        raise UsageError(f"{run_dir}: the run has not finished (no after measurement); finish it with --resume first")
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}-wise"
    folder = claim_run_dir(out, False, overwrite, {"the run being interpolated": run_dir}, progress.warn)
    try:
        info = interpolate_into(out, run_dir, saved, alphas, select_best, max_drop, device_name, argv, progress, which)
    except BaseException:
        if not (out / RUN_JSON).is_file():
            folder.abandon()
        raise
    folder.commit()
    folder.release()
    return info


def interpolate_into(out_dir: Path, run_dir: Path, saved: dict, alphas: list[float], select_best: str | None,
                     max_drop: float | None, device_name: str | None, argv: list[str], progress, which: str):
    from clipfit import models
    from clipfit.data.training import load_data, same_data
    from clipfit.eval.suite import deltas, load_suite
    from clipfit.report import write_report
    from clipfit.frozen.measure import freeze_unchanged
    from clipfit.run import measure_model, measurement_rows
    from clipfit.rundir import write_run_json
    from clipfit.selection import choose, metric_value, record

    started = time.time()
    cfg = saved_config(saved)
    data = load_data(saved["pairs"], cfg, out_dir, progress)
    if not same_data(saved.get("data_hash"), data):
        raise UsageError(f"{saved['pairs']}: the pairs changed since {run_dir} was trained; its validation split "
                         "cannot be rebuilt")
    suite = load_suite(cfg.eval_zeroshot, cfg.eval_retrieval, data.val, cfg.workers, progress.warn)
    rule = rule_for(cfg, alphas, select_best, max_drop, data, suite)
    device = models.resolve_device(device_name or cfg.device)
    start_state = {k: v.detach().clone() for k, v in load_start(cfg).model.state_dict().items()}
    tuned = load_tuned(run_dir, which)
    tuned_state = {k: v.detach().clone() for k, v in tuned.model.state_dict().items()}
    model = tuned.model.to(device)
    freeze_unchanged(model, start_state, tuned_state)  # what no α changes is encoded once (clipfit.frozen.measure)
    frozen = measurement_rows(model, tuned, cfg, device, progress)
    measured = []
    for alpha in alphas:
        model.load_state_dict(interpolate_state(start_state, tuned_state, alpha))
        progress.info(f"measuring α = {alpha:g}")
        measured.append(measure_model(model, tuned, data, cfg, device, suite, f"{run_dir} interpolated at α = {alpha:g}",
                                      frozen=frozen))
    labels = [f"α={a:g}" for a in alphas]
    choice = choose(measured, saved["before"], rule, labels)
    index = choice.index if choice.index is not None else len(alphas) - 1
    model.load_state_dict(interpolate_state(start_state, tuned_state, alphas[index]))
    models.save_model(tuned, model, out_dir)
    before, after = saved["before"], measured[index]
    info = {**{k: saved[k] for k in ("pairs", "config", "resolved", "model", "data_hash", "skipped", "environment",
                                     "steps", "eval_split") if k in saved},
            "clipfit": "interpolate", "run_dir": str(out_dir), "argv": argv,
            "interpolation": {"source_run": str(run_dir.resolve()), "alpha": alphas[index], "alphas": alphas,
                              "tuned_weights": TUNED_FILES[which],
                              "formula": "(1 - alpha) * start + alpha * tuned",
                              "start": {"model": cfg.model, "pretrained": cfg.pretrained, "seed": cfg.seed},
                              "measured": dict(zip(labels, measured))},
            "before": before, "after": after, "delta": deltas(before, after),
            "selection": {**record(choice, rule), "start_score": metric_value(before, rule.metric)},
            "wall_seconds": time.time() - started, "train_seconds": 0.0, "methods": {}}
    write_run_json(out_dir, info)
    write_report(out_dir, info)
    return info
