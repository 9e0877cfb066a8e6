"""`clipfit soup RUN RUN... --out DIR`: average the weights of runs that share a start.

Recipes (θ_i the runs' weights, θ_0 the starting model's, per floating-point tensor; integer
buffers are the first run's):

- uniform (Wortsman et al., *Model soups*, ICML 2022): θ = (1/N) Σ θ_i.
- greedy (the same paper): runs sorted by the target metric, best first; the soup starts with
  the best run whose held-out zero-shot top-1 is within the limit (the best run if none is), and
  each next run joins when the uniform soup with it scores no worse on the target and stays
  within the limit (clipfit.selection's rule).
- stock (Jang et al., *Model Stock*, ECCV 2024), per tensor: θ = t·θ_avg + (1 − t)·θ_0 with
  t = N·cosθ / (1 + (N − 1)·cosθ), cosθ the cosine between the runs' updates θ_i − θ_0 (the mean
  over pairs for N > 2), clipped to [0, 1]: updates that point apart keep the tensor at the
  start, where the formula would extrapolate beyond it.

Averages are summed in float64 and rounded once to the tensor's dtype, so the uniform soup of
two runs is exactly (θ_1 + θ_2) / 2 in float32. LoRA runs are merged first: every run folder's
model.safetensors holds its merged weights, so the soup averages whole updates B·A (averaging
the adapters' A and B apart would not), and writes a full model without adapter/.

Runs must share the architecture and the starting weights (run.json's `start`, written by
clipfit.run; older runs' identity is computed from their settings). The soup is measured as the
first run was (clipfit.derived.Bench) and written as a normal run folder with its report.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from clipfit.errors import UsageError
from clipfit.rundir import SOUP_RECIPES

RECIPES = SOUP_RECIPES  # clipfit.rundir: a sweep's soup folders are named after them


# --- the maths, on state dicts --------------------------------------------------------------

def uniform_soup(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(1/N) Σ θ_i for every floating-point tensor (float64 sum, one rounding); integer buffers of the first."""
    out = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        total = sum((s[name].to(torch.float64) for s in states[1:]), first.to(torch.float64))
        out[name] = (total / len(states)).to(first.dtype)
    return out


def update_cosine(deltas: list[torch.Tensor]) -> float:
    """The mean cosine over pairs of updates (flattened); 0 for a pair where either update is zero."""
    flat = [d.reshape(-1).to(torch.float64) for d in deltas]
    norms = [f.norm() for f in flat]
    cosines = [0.0 if norms[i] == 0 or norms[j] == 0 else float(flat[i] @ flat[j] / (norms[i] * norms[j]))
               for i, j in itertools.combinations(range(len(flat)), 2)]
    return sum(cosines) / len(cosines)


def stock_ratio(cosine: float, n: int) -> float:
    """Model Stock's t = N·cosθ / (1 + (N − 1)·cosθ), cosθ clipped to [0, 1]."""
    c = min(max(cosine, 0.0), 1.0)
    return n * c / (1 + (n - 1) * c)


def stock_soup(start: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]
               ) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """Model Stock per tensor, and each floating tensor's t (None where no run changed it)."""
    average = uniform_soup(states)
    out, ratios = {}, {}
    for name, mean in average.items():
        if not mean.is_floating_point():
            out[name] = mean
            continue
        base = start[name].to(torch.float64)
        deltas = [s[name].to(torch.float64) - base for s in states]
        if all(not bool(d.any()) for d in deltas):
            out[name], ratios[name] = start[name].to(mean.dtype).clone(), None
            continue
        t = stock_ratio(update_cosine(deltas), len(states))
        ratios[name] = t
        total = sum(deltas[1:], deltas[0])
        out[name] = (base + t * total / len(states)).to(mean.dtype)  # t·θ_avg + (1 − t)·θ_0
    return out, ratios


# --- greedy: which runs go in -----------------------------------------------------------------

@dataclass
class GreedyStep:
    """One soup tried: the runs in it, its target score and held-out drop, and whether it was kept."""

    label: str
    runs: list[str]
    score: float | None
    zeroshot_drop: float | None
    eligible: bool
    kept: bool


def greedy_order(scores: list[float | None], lower_is_better: bool) -> list[int]:
    """Best score first, ties in the given order; unmeasured last."""
    sign = 1.0 if lower_is_better else -1.0
    return sorted(range(len(scores)), key=lambda i: (scores[i] is None, sign * (scores[i] or 0.0), i))


def greedy_soup(labels: list[str], afters: list[dict[str, float]], start: dict[str, float], rule,
                measure: Callable[[list[int]], dict[str, float]]) -> tuple[list[int], dict[str, float], list[GreedyStep]]:
    """Wortsman et al.'s greedy soup under clipfit.selection's rule. `afters` are the runs' own
    measurements, `measure(indices)` measures the uniform soup of those runs. Returns the runs
    kept (in the order they joined), the kept soup's measurement, and every step."""
    from clipfit.selection import is_eligible, lower_is_better, metric_value, zeroshot_drop

    lower = lower_is_better(rule.metric)

    def judged(metrics: dict[str, float]) -> tuple[float | None, float | None, bool]:
        score, drop = metric_value(metrics, rule.metric), zeroshot_drop(start, metrics)
        return score, drop, score is not None and is_eligible(drop, rule.max_zeroshot_drop)

    order = greedy_order([metric_value(a, rule.metric) for a in afters], lower)
    first = next((i for i in order if judged(afters[i])[2]), order[0])
    kept, best = [first], afters[first]
    score, drop, ok = judged(best)
    steps = [GreedyStep(labels[first], [labels[first]], score, drop, ok, True)]
    for i in (i for i in order if i != first):
        metrics = measure(kept + [i])
        score, drop, ok = judged(metrics)
        best_score = metric_value(best, rule.metric)
        better_or_equal = best_score is None or (score is not None and (score <= best_score if lower else score >= best_score))
        joins = ok and better_or_equal
        steps.append(GreedyStep(f"+ {labels[i]}", [labels[j] for j in kept + [i]], score, drop, ok, joins))
        if joins:
            kept, best = kept + [i], metrics
    return kept, best, steps


# --- the command -----------------------------------------------------------------------------

def start_of(saved: dict[str, Any]) -> dict[str, Any]:
    """run.json's start identity, computed from the settings for runs made before it was recorded."""
    from clipfit.cache import start_identity

    config = saved["config"]
    return saved.get("start") or start_identity(config["model"], config["pretrained"], config["seed"])


def described(saved: dict[str, Any]) -> str:
    start = start_of(saved)
    seed = f", seed {start['seed']}" if start.get("seed") is not None else ""
    return f"{saved['model']['arch']} from {start['model']} ({start['pretrained']}{seed})"


def check_same_start(run_dirs: list[Path], saveds: list[dict[str, Any]]) -> None:
    """One line naming the first run whose architecture or starting weights differ from the first run's."""
    first = saveds[0]
    for run_dir, saved in zip(run_dirs[1:], saveds[1:]):
        same_arch = saved["model"]["arch"] == first["model"]["arch"]
        if not same_arch or start_of(saved)["fingerprint"] != start_of(first)["fingerprint"]:
            what = "another architecture" if not same_arch else "other starting weights"
            raise UsageError(f"{run_dir}: {what} ({described(saved)}) than {run_dirs[0]} "
                             f"({described(first)}); a soup averages runs of one architecture and one start")


def check_same_split(run_dirs: list[Path], saveds: list[dict[str, Any]]) -> None:
    """A soup is measured on the first run's validation pairs (clipfit.derived.Bench), which a run
    that held out others trained on: one line naming the first such run."""
    from clipfit.derived import same_split

    first = saveds[0]
    if not first["config"].get("val_split"):
        return
    for run_dir, saved in zip(run_dirs[1:], saveds[1:]):
        if not same_split(saved, first):
            raise UsageError(f"{run_dir}: held out other validation pairs than {run_dirs[0]} (other data, --seed or "
                             "--val-split), so it trained on some of the pairs the soup is measured on; soup runs "
                             "that share their data, --seed and --val-split")


def check_runs(run_dirs: list[Path], recipe: str) -> None:
    if recipe not in RECIPES:
        raise UsageError(f"--recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if len(run_dirs) < 2:
        raise UsageError(f"a soup averages two or more runs; got {len(run_dirs)}")
    resolved = [d.resolve() for d in run_dirs]
    twice = next((d for d, r in zip(run_dirs, resolved) if resolved.count(r) > 1), None)
    if twice is not None:
        raise UsageError(f"{twice}: named twice; a soup averages different runs")


def labels_of(run_dirs: list[Path]) -> list[str]:
    names = [d.name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def soup_rule(run_dir: Path, measured, select_best: str | None, max_drop: float | None):
    """The target metric and held-out limit greedy chooses by (the run's --select-best, else the
    default target metric; the limit as interpolate's)."""
    from clipfit.selection import Rule, retention_limit

    metric = select_best or measured.default_metric()
    if metric is None:
        raise UsageError(f"--recipe greedy keeps a run when the soup scores no worse, but {run_dir} measured nothing "
                         "to score by: use runs with --val-split, give --eval-retrieval PAIRS or --eval-zeroshot "
                         "DATASET=PATH to soup, or --recipe uniform or stock")
    measured.check(metric)
    return Rule(metric, retention_limit(max_drop, measured.zeroshot))


def soup(run_dirs: list[Path], out: Path, recipe: str, select_best: str | None, max_drop: float | None,
         device_name: str | None, argv: list[str], progress, overwrite: bool = False,
         zeroshot: list[str] = (), retrieval: list[str] = ()) -> dict[str, Any]:
    from clipfit.derived import Measured, finished_run, into_new_folder, saved_config

    run_dirs = [Path(d) for d in run_dirs]
    check_runs(run_dirs, recipe)
    saveds = [finished_run(d) for d in run_dirs]
    check_same_start(run_dirs, saveds)
    check_same_split(run_dirs, saveds)
    config = saved_config(saveds[0], zeroshot, retrieval)
    measured = Measured.of(config, saveds[0])
    if recipe != "greedy" and (select_best or max_drop is not None):
        raise UsageError(f"--select-best and --max-zeroshot-drop choose which runs --recipe greedy keeps; "
                         f"--recipe {recipe} averages every run")
    rule = soup_rule(run_dirs[0], measured, select_best or config.select_best, max_drop) if recipe == "greedy" else None
    sources = {f"run {i} of the soup": d for i, d in enumerate(run_dirs, 1)}
    return into_new_folder(Path(out), sources, saveds[0], overwrite, progress, lambda folder: soup_into(
        folder, run_dirs, saveds, config, recipe, rule, device_name, argv, progress))


def soup_into(out_dir: Path, run_dirs: list[Path], saveds: list[dict], config, recipe: str, rule,
              device_name: str | None, argv: list[str], progress) -> dict[str, Any]:
    import time

    from clipfit.derived import Bench, write_derived
    from clipfit.eval.suite import deltas

    started = time.time()
    bench = Bench.open(run_dirs[0], saveds[0], config, out_dir, device_name, progress)
    labels = labels_of(run_dirs)
    states = [bench.weights_of(d) for d in run_dirs]
    bench.reuse_unchanged(*states)  # what no run changed is encoded once (clipfit.frozen.measure)
    before = bench.before()
    facts: dict[str, Any] = {}
    kept = list(range(len(run_dirs)))
    if recipe == "greedy":
        afters = [bench.after_of(d, s) for d, s in zip(run_dirs, saveds)]
        kept, after, steps = greedy_soup(labels, afters, before, rule, lambda idx: bench.measure(
            uniform_soup([states[i] for i in idx]), f"the soup of {', '.join(labels[i] for i in idx)}"))
        state = uniform_soup([states[i] for i in kept])
        facts = {"metric": rule.metric, "max_zeroshot_drop": rule.max_zeroshot_drop,
                 "steps": [asdict(step) for step in steps]}
    else:
        state, ratios = stock_soup(bench.start(), states) if recipe == "stock" else (uniform_soup(states), None)
        after = bench.measure(state, f"the {recipe} soup of {len(states)} runs")
        if ratios is not None:
            facts = {"ratios": ratios, "formula": "t * mean(runs) + (1 - t) * start, t = N cos / (1 + (N - 1) cos)"}
    progress.info(f"{recipe} soup of {', '.join(labels[i] for i in kept)}")
    info = {"clipfit": "soup", "argv": argv,
            "soup": {"recipe": recipe, "ingredients": [labels[i] for i in kept],
                     "runs": [run_entry(d, s, label, i in kept) for i, (d, s, label) in
                              enumerate(zip(run_dirs, saveds, labels))], **facts},
            "before": before, "after": after, "delta": deltas(before, after), "wall_seconds": time.time() - started}
    return write_derived(out_dir, bench, state, info)


def run_entry(run_dir: Path, saved: dict, label: str, kept: bool) -> dict[str, Any]:
    config = saved["config"]
    return {"label": label, "run_dir": str(run_dir.resolve()), "method": config.get("method"),
            "lr": saved.get("resolved", {}).get("lr", config.get("lr")), "steps": saved.get("steps"),
            "seed": config.get("seed"), "kept": kept}
