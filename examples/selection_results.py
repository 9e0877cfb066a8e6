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
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import DEFAULT_DATA, REPO, TARGET, ZEROSHOT, balanced_subset, count_images, machine, noise  # noqa: E402

START, END = "<!-- selection-results:start -->", "<!-- selection-results:end -->"
METHODS = ("contrastive", "refine")
SEEDS = (0, 1, 2)
ALPHAS = "0.5,0.75"
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
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the root the data builders wrote into")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "selection-results")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--zeroshot-per-class", type=int, default=10)
    parser.add_argument("--reuse", action="store_true", help="only rewrite the section from --work's runs")
    parser.add_argument("--no-section", action="store_true", help="only make the runs (e.g. one seed per process)")
    return parser.parse_args(own), passthrough


def flags(settings: dict[str, str | None]) -> list[str]:
    return [x for name, value in settings.items() for x in ([f"--{name}"] + ([value] if value is not None else []))]


def clipfit(*args: str) -> list[str]:
    command = [sys.executable, "-m", "clipfit", *args]
    print("+", shlex.join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    return command


def run_pair(args, method: str, seed: int, subset: Path, passthrough: list[str]) -> tuple[dict, dict]:
    """The refine run and its WiSE-FT interpolation (run.json of each), made unless --reuse."""
    run_dir, wise_dir = args.work / f"{method}-seed{seed}", args.work / f"{method}-seed{seed}-wise"
    if not args.reuse:
        clipfit("refine", str(args.data / TARGET), "--model", "lite0-minilm", "--method", method, "--seed", str(seed),
                *flags(SETTINGS), "--eval-zeroshot", f"folder={subset}", "--cache-dir", str(args.work / "cache"),
                "--out", str(run_dir), "--overwrite", "--quiet", *passthrough)
        clipfit("interpolate", str(run_dir), "--tuned", "last", "--alpha", ALPHAS, "--out", str(wise_dir),
                "--overwrite", "--quiet")
    return tuple(json.loads((d / "run.json").read_text()) for d in (run_dir, wise_dir))


def mean_r1(metrics: dict) -> float:
    return (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"]) / 2


def zeroshot_top1(metrics: dict) -> float:
    return next(v for k, v in metrics.items() if k.startswith("zeroshot/") and k.endswith("/acc1"))


def points(run: dict, wise: dict) -> dict[str, dict]:
    """(mean R@1, zero-shot top-1) of each model of one seed."""
    models = {"start": run["before"], "last step": run["last"], "selected step": run["after"],
              "WiSE-FT (chosen α)": wise["after"]}
    models.update({f"WiSE-FT {label}": m for label, m in wise["interpolation"]["measured"].items()})
    return {name: {"target": mean_r1(m), "heldout": zeroshot_top1(m)} for name, m in models.items()}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def method_table(per_seed: list[dict[str, dict]]) -> list[str]:
    lines = ["| model | mean R@1 (target) | Δ vs start | zero-shot top-1 (held-out) | Δ vs start |",
             "|---|---:|---:|---:|---:|"]
    for name in per_seed[0]:
        target = [s[name]["target"] for s in per_seed]
        heldout = [s[name]["heldout"] for s in per_seed]
        d_target = [s[name]["target"] - s["start"]["target"] for s in per_seed]
        d_heldout = [s[name]["heldout"] - s["start"]["heldout"] for s in per_seed]
        lines.append(f"| {name} | {mean_sd(target)} | {mean_sd(d_target)} | {mean_sd(heldout)} | {mean_sd(d_heldout)} |")
    return lines


def seed_lines(method: str, seeds: list[int], runs: list[tuple[dict, dict]]) -> list[str]:
    out = []
    for seed, (run, wise) in zip(seeds, runs):
        sel = run["selection"]
        out.append(f"- `{method}` seed {seed}: {run['steps']} steps, evaluated at steps "
                   f"{', '.join(map(str, sel['steps']))}; kept step {sel['chosen_step']}; WiSE-FT chose "
                   f"α = {wise['interpolation']['alpha']:g}.")
    return out


def verdict(per_seed: list[dict[str, dict]], n_val: int, n_zeroshot: int) -> str:
    """What the means show, judged against two binomial standard errors of one measurement."""
    def delta(a: str, b: str, key: str) -> float:
        return statistics.mean(s[a][key] - s[b][key] for s in per_seed)

    start_t, start_h = (statistics.mean(s["start"][k] for s in per_seed) for k in ("target", "heldout"))
    t_noise, h_noise = noise(start_t, n_val), noise(start_h, n_zeroshot)
    facts = []
    for a, b in (("selected step", "last step"), ("WiSE-FT (chosen α)", "last step"),
                 ("WiSE-FT (chosen α)", "selected step")):
        dt, dh = delta(a, b, "target"), delta(a, b, "heldout")
        word = lambda d, n: f"{d:+.1f}" + (" (within noise)" if abs(d) <= n else "")  # noqa: E731
        facts.append(f"{a} − {b}: target {word(dt, t_noise)}, held-out {word(dh, h_noise)}")
    return "; ".join(facts)


def section(args, results: dict[str, list[tuple[dict, dict]]], commands: list[str], minutes: float) -> str:
    first_run = next(iter(results.values()))[0][0]
    n_val, subset = first_run["resolved"]["val_pairs"], args.work / f"{ZEROSHOT}-{args.zeroshot_per_class}-per-class"
    n_zeroshot = count_images(subset)
    lines = [START, "## Last step, selected step, WiSE-FT", "",
             f"Generated by `python examples/selection_results.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
             f"({minutes:.0f} minutes for all runs); edit that script, not this section.", "",
             f"- **Runs**: for each method and seed ({', '.join(map(str, args.seeds))}), one `clipfit refine` of "
             f"`lite0-minilm` (aligned) on the emoji `heldout/` pairs ({first_run['resolved']['train_pairs']} training, "
             f"{n_val} validation pairs; the split depends on the seed), settings `{shlex.join(flags(SETTINGS))}` "
             "(both towers frozen: the two projections and the logit scale train): "
             f"the validation split and held-out zero-shot are measured every {EVAL_EVERY} steps, and `--select-best {METRIC}` "
             "keeps the best step. Then `clipfit interpolate RUN --tuned last --alpha "
             f"{ALPHAS}` (WiSE-FT of the *last* weights) chooses α by the same rule.",
             f"- **Held-out**: zero-shot top-1 on {n_zeroshot} Fashion-MNIST test images ({args.zeroshot_per_class} "
             f"per class) with the one prompt `{TEMPLATE}` (the folder's `templates.txt`; not the 80 of the table "
             "above, so its numbers differ), a set no run trains on; nothing guards it here (no `--max-zeroshot-drop`).",
             f"- **Noise**: two binomial standard errors of one measurement are about {noise(50, n_val):.0f} points "
             f"on {n_val} validation pairs and {noise(35, n_zeroshot):.0f} points on {n_zeroshot} zero-shot images; "
             "means over 3 seeds are less noisy, but a difference smaller than that is not called a finding below.",
             f"- **Machine**: {machine(first_run)}.", "",
             "Mean ± standard deviation over the seeds; Δ is each seed's change from its own starting model.", ""]
    for method, runs in results.items():
        per_seed = [points(run, wise) for run, wise in runs]
        lines += [f"### `{method}`", "", *method_table(per_seed), "", *seed_lines(method, args.seeds, runs), "",
                  f"Reading (mean over seeds): {verdict(per_seed, n_val, n_zeroshot)}.", ""]
    lines += ["Commands:", "", "```bash", *commands, "```", END]
    return "\n".join(lines)


def replace_section(markdown: str, text: str) -> str:
    if START in markdown and END in markdown:
        head, rest = markdown.split(START, 1)
        return head + text + rest.split(END, 1)[1]
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
    results = {m: [run_pair(args, m, seed, subset, passthrough) for seed in args.seeds] for m in args.methods}
    if args.no_section:
        return
    minutes = sum(run["wall_seconds"] + wise["wall_seconds"] for runs in results.values() for run, wise in runs) / 60
    commands = [f"python -m clipfit {shlex.join(r['argv'])}".replace(f"{REPO}/", "")
                for runs in results.values() for pair in runs for r in pair]
    markdown = args.markdown.read_text(encoding="utf-8") if args.markdown.exists() else ""
    write_text(args.markdown, replace_section(markdown, section(args, results, commands, minutes)))
    print(f"wrote the section into {args.markdown} ({(time.time() - started) / 60:.1f} minutes)")


if __name__ == "__main__":
    main(sys.argv[1:])
