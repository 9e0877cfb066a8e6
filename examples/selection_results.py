"""Regenerate the "Last step, selected step, WiSE-FT" section of docs/results.md.

For contrastive and refine, three seeds each: one `clipfit refine` run of the offline starter on
the emoji `heldout/` pairs (which the starter was never aligned on) that measures the validation
split and held-out Fashion-MNIST zero-shot every few steps and keeps the best step by mean-R@1
(`--select-best`), then one `clipfit interpolate --tuned last` of that run's last weights towards
the starting weights (WiSE-FT) at several α, choosing α by the same rule. Reported: the starting
model, the last step, the selected step and WiSE-FT at the chosen α (and at every α), each on the
target's validation pairs (mean R@1) and on held-out zero-shot top-1.

Data: the builders of examples/datasets (see examples/results.py's header), then

    python examples/selection_results.py                 # rewrites the section in docs/results.md
    python examples/selection_results.py --reuse         # rewrite it from --work's finished runs

Arguments after `--` go to every `clipfit refine` call unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import DEFAULT_DATA, REPO, TARGET, ZEROSHOT, balanced_subset, count_images, machine, noise, split_passthrough  # noqa: E402

START, END = "<!-- selection-results:start -->", "<!-- selection-results:end -->"
METHODS = ("contrastive", "refine")
SEEDS = (0, 1, 2)
ALPHAS = "0.25,0.5,0.75"  # each α is one more measurement of every set; the rule below picks one
METRIC = "mean-R@1"
# One prompt instead of the 80 default ones: every measurement re-encodes the class prompts, and on
# 2 shared CPU cores 800 prompts per measurement cost more than everything else in these runs.
TEMPLATE = "a photo of a {c}."
EVAL_EVERY = "10"
SETTINGS = {  # every run; clipfit's defaults otherwise. Both towers locked: only the projections and the
    # logit scale train, so a step costs next to nothing and the evaluations are the run's cost
    "epochs": "5", "batch-size": "32", "lr": "5e-4", "val-split": "0.3", "lock-image": None, "lock-text": None,
    "workers": "0", "cache-images": None, "eval-every": EVAL_EVERY, "select-best": METRIC,
}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, passthrough = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the root the data builders wrote into")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "selection-results")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--zeroshot-per-class", type=int, default=10)
    parser.add_argument("--reuse", action="store_true", help="only rewrite the section from --work's runs")
    parser.add_argument("--skip-finished", action="store_true", help="keep runs that finished earlier")
    parser.add_argument("--no-section", action="store_true", help="only make the runs (e.g. one seed per process)")
    return parser.parse_args(own), passthrough


def flags(settings: dict[str, str | None]) -> list[str]:
    return [x for name, value in settings.items() for x in ([f"--{name}"] + ([value] if value is not None else []))]


def clipfit(*args: str) -> list[str]:
    command = [sys.executable, "-m", "clipfit", *args]
    print("+", shlex.join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    return command


def run_pair(args, method: str, seed: int, subset: Path, passthrough: list[str]) -> tuple[dict | None, dict | None]:
    """The refine run and its WiSE-FT interpolation (run.json of each, None where not finished),
    made unless --reuse (or, with --skip-finished, already there)."""
    run_dir, wise_dir = args.work / f"{method}-seed{seed}", args.work / f"{method}-seed{seed}-wise"
    if not args.reuse and not (args.skip_finished and finished(run_dir)):
        clipfit("refine", str(args.data / TARGET), "--model", "lite0-minilm", "--method", method, "--seed", str(seed),
                *flags(SETTINGS), "--eval-zeroshot", f"folder={subset}", "--cache-dir", str(args.work / "cache"),
                "--out", str(run_dir), "--overwrite", "--quiet", *passthrough)
    if not args.reuse and not (args.skip_finished and finished(wise_dir)):
        clipfit("interpolate", str(run_dir), "--tuned", "last", "--alpha", ALPHAS, "--out", str(wise_dir),
                "--overwrite", "--quiet")
    return tuple(json.loads((d / "run.json").read_text()) if finished(d) else None for d in (run_dir, wise_dir))


def finished(run_dir: Path) -> bool:
    path = run_dir / "run.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("after"))


def drop_checkpoints(run_dir: Path) -> None:
    """A finished run's resume state (weights and optimiser, about 320 MB with the starter) serves no
    measurement and would fill the disk over dozens of runs: removed; the weights and run.json stay."""
    if finished(run_dir) and (run_dir / "checkpoints").is_dir():
        shutil.rmtree(run_dir / "checkpoints")


def mean_r1(metrics: dict) -> float:
    return (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"]) / 2


def zeroshot_top1(metrics: dict) -> float:
    return next(v for k, v in metrics.items() if k.startswith("zeroshot/") and k.endswith("/acc1"))


WISE = "WiSE-FT (chosen α)"
MODELS = ("start", "last step", "selected step", WISE)


def points(run: dict, wise: dict | None) -> dict[str, dict]:
    """(mean R@1, zero-shot top-1) of each model of one seed; no WiSE-FT entry before it is measured."""
    models = {"start": run["before"], "last step": run["last"], "selected step": run["after"]}
    if wise is not None:
        models[WISE] = wise["after"]
        models.update({f"WiSE-FT {alpha}": m for alpha, m in wise["interpolation"]["measured"].items()})
    return {name: {"target": mean_r1(m), "heldout": zeroshot_top1(m)} for name, m in models.items()}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def method_table(per_seed: list[dict[str, dict]]) -> list[str]:
    lines = ["| model | seeds | mean R@1 (target) | Δ vs start | zero-shot top-1 (held-out) | Δ vs start |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys([*MODELS, *(k for s in per_seed for k in s)]):  # then each α measured
        seeds = [s for s in per_seed if name in s]
        if not seeds:
            continue
        cells = [[s[name][k] for s in seeds] for k in ("target",)] + [[s[name]["target"] - s["start"]["target"] for s in seeds]]
        cells += [[s[name]["heldout"] for s in seeds], [s[name]["heldout"] - s["start"]["heldout"] for s in seeds]]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(mean_sd(c) for c in cells) + " |")
    return lines


def seed_lines(method: str, runs: list[tuple[int, dict, dict | None]]) -> list[str]:
    out = []
    for seed, run, wise in runs:
        sel = run["selection"]
        wise_part = (f"WiSE-FT α = {wise['interpolation']['alpha']:g}" if wise else "WiSE-FT not measured (ran out of time)")
        out.append(f"- `{method}` seed {seed}: {run['steps']} steps, measured at steps "
                   f"{', '.join(map(str, sel['steps']))}; kept step {sel['chosen_step']}; {wise_part}.")
    return out


def is_clear(values: list[float]) -> bool:
    """Paired differences make a finding when every seed agrees in sign and the mean exceeds two
    standard errors over the seeds."""
    if len(values) < 2:
        return False
    se = statistics.stdev(values) / math.sqrt(len(values))
    return abs(statistics.mean(values)) > 2 * se and (all(v > 0 for v in values) or all(v < 0 for v in values))


def difference(values: list[float], digits: int = 1, floor: float = 0.0) -> str:
    """A mean paired difference, marked *not clear* unless it `is_clear` and is at least `floor` (e.g. one item)."""
    mean = statistics.mean(values)
    return f"{mean:+.{digits}f}" + ("" if is_clear(values) and abs(mean) >= floor else " (not clear)")


def verdict(per_seed: list[dict[str, dict]]) -> str:
    facts = []
    for a, b in (("last step", "start"), ("selected step", "last step"), (WISE, "last step"), (WISE, "selected step"),
                 (WISE, "start")):
        both = [s for s in per_seed if a in s and b in s]
        if not both:
            continue
        target = difference([s[a]["target"] - s[b]["target"] for s in both])
        heldout = difference([s[a]["heldout"] - s[b]["heldout"] for s in both])
        facts.append(f"{a} − {b} ({len(both)} seeds): target {target}, held-out {heldout}")
    return "; ".join(facts)


def section(args, results: dict[str, list[tuple[int, dict, dict | None]]], commands: list[str], minutes: float) -> str:
    first_run = next(run for runs in results.values() for _, run, _ in runs)
    n_val, subset = first_run["resolved"]["val_pairs"], args.work / f"{ZEROSHOT}-{args.zeroshot_per_class}-per-class"
    n_zeroshot = count_images(subset)
    lines = [START, "## Last step, selected step, WiSE-FT", "",
             f"Generated by `python examples/selection_results.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
             f"({minutes:.0f} minutes of run wall time in all, several runs at once); edit that script, not this section.", "",
             f"- **Runs**: for each method and seed ({', '.join(map(str, args.seeds))}), one `clipfit refine` of "
             f"`lite0-minilm` (aligned) on the emoji `heldout/` pairs ({first_run['resolved']['train_pairs']} training, "
             f"{n_val} validation pairs; the split depends on the seed), settings `{shlex.join(flags(SETTINGS))}` "
             "(both towers frozen: the two projections and the logit scale train): "
             f"the validation split and held-out zero-shot are measured every {EVAL_EVERY} steps and at the last, "
             f"and `--select-best {METRIC}` keeps the best (the starting model included). Then `clipfit interpolate "
             f"RUN --tuned last --alpha {ALPHAS}`: WiSE-FT of the *last* weights, the α kept by interpolate's default "
             f"rule (the best `{METRIC}` on the validation split among the α whose held-out top-1 stays within 1 point "
             "of the start's, else the start).",
             f"- **Held-out**: zero-shot top-1 on {n_zeroshot} Fashion-MNIST test images ({args.zeroshot_per_class} "
             f"per class) with the one prompt `{TEMPLATE}` (the folder's `templates.txt`; not the 80 of the table "
             "above, so its numbers differ), a set no run trains on; it guards WiSE-FT's α (1 point, interpolate's "
             "default) but not the selected step (no `--max-zeroshot-drop` given to refine).",
             f"- **Noise**: one measurement has two binomial standard errors of about {noise(50, n_val):.0f} points "
             f"on {n_val} validation pairs and {noise(35, n_zeroshot):.0f} points on {n_zeroshot} zero-shot images. "
             "The differences below are paired (same seed, same split) and averaged over seeds; one is called "
             "clear only when every seed agrees in sign and the mean exceeds two standard errors over the seeds, "
             "otherwise it is marked *not clear*. Three seeds make that a weak test: read *clear* as a "
             "consistent direction at this scale, not as a general result.",
             f"- **Machine**: {machine(first_run)}; the machine was shared with other jobs (load average above 20 "
             "on 2 cores), which is why the runs are this small.", "",
             "Mean ± standard deviation over the seeds that finished (column *seeds*); Δ is each seed's change "
             "from its own starting model.", ""]
    for method, runs in results.items():
        per_seed = [points(run, wise) for _, run, wise in runs]
        lines += [f"### `{method}`", "", *method_table(per_seed), "", *seed_lines(method, runs), "",
                  f"Mean paired differences in points: {verdict(per_seed)}.", ""]
    missing = [f"`{m}` seed {s}" for m in args.methods for s in args.seeds
               if s not in [seed for seed, _, _ in results.get(m, [])]]
    if missing:
        lines += [f"Not finished in time, so not in the tables: {', '.join(missing)}.", ""]
    lines += ["Commands:", "", "```bash", *commands, "```", END]
    return "\n".join(lines)


def replace_section(markdown: str, text: str, start: str = START, end: str = END, before: str | None = None) -> str:
    """`text` (which begins with `start` and ends with `end`) in place of the marked section; the
    first time, just before the heading `before` when given and present, else at the end."""
    if start in markdown and end in markdown:
        head, rest = markdown.split(start, 1)
        return head + text + rest.split(end, 1)[1]
    if before and before in markdown:
        head, rest = markdown.split(before, 1)
        return head + text + "\n\n" + before + rest
    return markdown.rstrip() + "\n\n" + text + "\n"


def main(argv: list[str]) -> None:
    from clipfit.io import write_text

    args, passthrough = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    subset = args.work / f"{ZEROSHOT}-{args.zeroshot_per_class}-per-class"
    if not args.reuse and not subset.is_dir():  # seeded: the same folder every time; kept for parallel seeds
        balanced_subset(args.data / ZEROSHOT, subset, args.zeroshot_per_class, 0)
    if not args.reuse:
        (subset / "templates.txt").write_text(TEMPLATE + "\n")
    started = time.time()
    made = {m: [(seed, *run_pair(args, m, seed, subset, passthrough)) for seed in args.seeds] for m in args.methods}
    if args.no_section:
        return
    results = {m: [r for r in runs if r[1] is not None] for m, runs in made.items()}
    results = {m: runs for m, runs in results.items() if runs}
    done = [r for runs in results.values() for _, *pair in runs for r in pair if r is not None]
    minutes = sum(r["wall_seconds"] for r in done) / 60
    commands = [f"python -m clipfit {shlex.join(r['argv'])}".replace(f"{REPO}/", "")
                .replace(str(args.data), "DATA").replace(str(args.work), "WORK") for r in done]  # no machine paths
    markdown = args.markdown.read_text(encoding="utf-8") if args.markdown.exists() else ""
    write_text(args.markdown, replace_section(markdown, section(args, results, commands, minutes)))
    print(f"wrote the section into {args.markdown} ({(time.time() - started) / 60:.1f} minutes)")


if __name__ == "__main__":
    main(sys.argv[1:])
