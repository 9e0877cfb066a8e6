"""Regenerate the "Choosing the trade-off" section of docs/results.md and the README's "Which method
should I use?" paragraph, which is drawn from that section's table and nothing else.

The regime is docs/results.md's `full` one, where contrastive forgets: `clipfit refine --model
lite0-minilm` (the aligned starter) on the emoji `heldout/` pairs, every weight trained, 100
steps of batch 32. For every method (contrastive, refine, lite, ping, dclip, and refine without
its rafa or its hycd term, to see which term widens the gap and forgets) and seed (0, 1, 2), one

    clipfit sweep --lr 1e-5,3e-5,1e-4,3e-4 --select-best mean-R@1 --eval-every 25 --soup uniform,greedy

measures the validation split and held-out Fashion-MNIST zero-shot every 25 steps, keeps each
run's best step, and averages the four runs into a uniform and a greedy soup (greedy under the
default 1-point held-out guard); then

    clipfit interpolate RUN-at-1e-4 --tuned last --alpha 0.25,0.5,0.75

is WiSE-FT of the forgetting run's last weights under the default rule (the best mean-R@1 among
the α whose held-out top-1 stays within 1 point of the start's, else the start). Five points per
method and seed: the last step and the selected step of the lr 1e-4 run, WiSE-FT, the uniform
and the greedy soup; each as target mean R@1 and held-out zero-shot top-1, with the modality gap.

Data: the builders of examples/datasets (see examples/results.py's header), then

    python examples/tradeoff_results.py                # runs what --work lacks, rewrites the section
    python examples/tradeoff_results.py --collect-only # the section from the runs finished so far
    python examples/tradeoff_results.py --variants contrastive refine --seeds 0 --steps 4 --eval-every 2 \
        --lrs 1e-4,3e-4 --zeroshot-per-class 2 --work /tmp/w --markdown /tmp/r.md --readme /tmp/README.md

Arguments after `--` go to every `clipfit sweep` call unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import promises  # noqa: E402
from results import DEFAULT_DATA, REPO, TARGET, ZEROSHOT, balanced_subset, count_images, cpu_name, noise, split_passthrough  # noqa: E402
from selection_results import difference, drop_checkpoints, finished, is_clear, flags, mean_r1, mean_sd, replace_section, zeroshot_top1  # noqa: E402

START, END = "<!-- tradeoff-results:start -->", "<!-- tradeoff-results:end -->"
README_START, README_END = "<!-- which-method:start -->", "<!-- which-method:end -->"
README_BEFORE = "## Evaluation"  # where the README paragraph goes the first time
VARIANTS = {  # name -> clipfit flags
    "contrastive": ["--method", "contrastive"], "refine": ["--method", "refine"], "lite": ["--method", "lite"],
    "ping": ["--method", "ping"], "dclip": ["--method", "dclip"],
    "refine rafa=0": ["--method", "refine", "--weight", "rafa=0"],
    "refine hycd=0": ["--method", "refine", "--weight", "hycd=0"],
}
ABLATIONS = ("refine rafa=0", "refine hycd=0")  # diagnose refine's terms; not a method a user picks
LRS, FORGETTING_LR = "1e-5,3e-5,1e-4,3e-4", "1e-4"  # docs/results.md's search: contrastive forgets at 1e-4
ALPHAS = "0.25,0.5,0.75"
METRIC = "mean-R@1"
TEMPLATE = "a photo of a {c}."  # one prompt: every measurement re-encodes the class prompts
TOOLS = ("last step", "selected step", "WiSE-FT", "uniform soup", "greedy soup")
KINDS = {"last step": "run", "selected step": "run", "WiSE-FT": "wise", "uniform soup": "soup", "greedy soup": "soup"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, passthrough = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the root the data builders wrote into")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "tradeoff-results")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--lrs", default=LRS, help="the sweep's lrs; the one given as --forgetting-lr is interpolated")
    parser.add_argument("--forgetting-lr", default=FORGETTING_LR)
    parser.add_argument("--eval-every", default="25")
    parser.add_argument("--zeroshot-per-class", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1, help="sweeps at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per sweep (OMP_NUM_THREADS)")
    parser.add_argument("--collect-only", action="store_true", help="start nothing; write from the finished runs")
    return parser.parse_args(own), passthrough


def slug(variant: str) -> str:
    return variant.replace(" ", "-").replace("=", "")


def folders(args, variant: str, seed: int) -> tuple[Path, Path]:
    """The sweep folder and the WiSE-FT folder of one variant and seed."""
    base = args.work / f"{slug(variant)}-seed{seed}"
    return base, base.with_name(base.name + "-wise")


def clipfit(args, *command: str) -> bool:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print("+ clipfit", promises.portable(shlex.join(command), args), file=sys.stderr, flush=True)
    promises.note_load()
    done = subprocess.run([sys.executable, "-m", "clipfit", *command], capture_output=True, text=True, cwd=REPO, env=env)
    promises.note_load()
    if done.returncode != 0:
        print(f"  exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr, flush=True)
    return done.returncode == 0


def sweep_command(args, variant: str, seed: int, zeroshot: Path, passthrough: list[str]) -> list[str]:
    settings = {"model": "lite0-minilm", "seed": str(seed), "lr": args.lrs, "val-split": "0.3",
                "batch-size": args.batch_size, "epochs": "1000", "max-steps": str(args.steps),
                "eval-every": args.eval_every, "select-best": METRIC, "workers": "0", "log-every": "10",
                "cache-dir": str(args.work / "cache"), "eval-zeroshot": f"folder={zeroshot}",
                "soup": "uniform,greedy", "out": str(folders(args, variant, seed)[0])}
    return ["sweep", str(args.data / TARGET), *VARIANTS[variant], *flags(settings), "--quiet", *passthrough]


def forgetting_run(sweep_dir: Path, lr: str) -> Path | None:
    """The sweep's run at the forgetting lr (named by clipfit.sweep.run_name)."""
    runs = [p for p in sweep_dir.glob("*-lr=*") if p.is_dir() and float(p.name.rpartition("lr=")[2]) == float(lr)]
    return runs[0] if runs else None


def wise_command(args, variant: str, seed: int) -> list[str]:
    sweep_dir, wise_dir = folders(args, variant, seed)
    run = forgetting_run(sweep_dir, args.forgetting_lr) if sweep_dir.is_dir() else None
    return ["interpolate", str(run or sweep_dir / f"NN-lr={args.forgetting_lr}"), "--tuned", "last", "--alpha", ALPHAS,
            "--out", str(wise_dir), "--overwrite", "--quiet"]


def run_one(args, variant: str, seed: int, zeroshot: Path, passthrough: list[str]) -> None:
    """The sweep (rerunning it skips what is finished) and the interpolation, unless --collect-only."""
    sweep_dir, wise_dir = folders(args, variant, seed)
    if args.collect_only:
        return
    if not (sweep_dir / "sweep.json").is_file():
        clipfit(args, *sweep_command(args, variant, seed, zeroshot, passthrough))
    run = forgetting_run(sweep_dir, args.forgetting_lr)
    if run is not None and finished(run) and not finished(wise_dir):
        clipfit(args, *wise_command(args, variant, seed))
    for run_dir in sweep_dir.glob("*-lr=*"):
        drop_checkpoints(run_dir)


def read(path: Path) -> dict | None:
    return json.loads((path / "run.json").read_text()) if finished(path) else None


def points(args, variant: str, seed: int) -> dict[str, dict] | None:
    """Each tool's (target, held-out, gap) for one variant and seed, with the start; None before the run finished."""
    sweep_dir, wise_dir = folders(args, variant, seed)
    run_dir = forgetting_run(sweep_dir, args.forgetting_lr) if sweep_dir.is_dir() else None
    run = read(run_dir) if run_dir else None
    if run is None:
        return None
    measured = {"start": run["before"], "last step": run["last"], "selected step": run["after"]}
    for tool, folder in (("WiSE-FT", wise_dir), ("uniform soup", sweep_dir / "soup-uniform"),
                         ("greedy soup", sweep_dir / "soup-greedy")):
        info = read(folder)
        if info is not None:
            measured[tool] = info["after"]
    return {name: {"target": mean_r1(m), "heldout": zeroshot_top1(m), "gap": m["modality_gap"]}
            for name, m in measured.items()}


def deltas(per_seed: list[dict], tool: str, key: str) -> list[float]:
    return [s[tool][key] - s["start"][key] for s in per_seed if tool in s]


def variant_table(per_seed: list[dict]) -> list[str]:
    lines = ["| point | seeds | mean R@1 (target) | Δ vs start | zero-shot top-1 (held-out) | Δ vs start | gap |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for tool in ("start", *TOOLS):
        seeds = [s for s in per_seed if tool in s]
        if seeds:
            cells = [[s[tool]["target"] for s in seeds], deltas(seeds, tool, "target"),
                     [s[tool]["heldout"] for s in seeds], deltas(seeds, tool, "heldout")]
            gap = statistics.mean(s[tool]["gap"] for s in seeds)
            lines.append(f"| {tool} | {len(seeds)} | " + " | ".join(mean_sd(c) for c in cells) + f" | {gap:.3f} |")
    return lines


def summary_points(results: dict[str, list[dict]]) -> list:
    """Every variant's every tool, mean over seeds, on the trade-off plane (clipfit.selection.TradeoffPoint)."""
    from clipfit.selection import START, TradeoffPoint

    out = [TradeoffPoint(START, 0.0, 0.0, "start")]
    for variant, per_seed in results.items():
        for tool in TOOLS:
            target, heldout = deltas(per_seed, tool, "target"), deltas(per_seed, tool, "heldout")
            if target:
                out.append(TradeoffPoint(f"{variant}: {tool}", statistics.mean(target), statistics.mean(heldout),
                                         KINDS[tool]))
    return out


def recovery(results: dict[str, list[dict]]) -> list[tuple[float, str, str, list[float], list[float]]]:
    """(held-out points recovered per target point given up, variant, tool, recovered per seed,
    given up per seed) for each tool against its variant's last step; a tool that gives nothing up
    and recovers counts as infinitely efficient."""
    rows = []
    for variant, per_seed in results.items():
        for tool in TOOLS[1:]:
            both = [s for s in per_seed if tool in s]
            if not both:
                continue
            recovered = [s[tool]["heldout"] - s["last step"]["heldout"] for s in both]
            given_up = [s["last step"]["target"] - s[tool]["target"] for s in both]
            r, g = statistics.mean(recovered), statistics.mean(given_up)
            ratio = r / g if g > 0 else (float("inf") if r > 0 else float("-inf"))
            rows.append((ratio, variant, tool, recovered, given_up))
    return sorted(rows, key=lambda row: (-row[0], -statistics.mean(row[3])))  # among free ones: most recovered


def recovery_lines(results: dict[str, list[dict]]) -> list[str]:
    rows = recovery(results)
    if not rows:
        return []
    lines = ["| method | tool | held-out recovered vs last step | target given up (negative: gained) | per point given up |",
             "|---|---|---:|---:|---:|"]
    for ratio, variant, tool, recovered, given_up in rows:
        shown = "free (no target lost)" if ratio == float("inf") else ("–" if ratio == float("-inf") else f"{ratio:.2f}")
        lines.append(f"| `{variant}` | {tool} | {difference(recovered)} | {difference(given_up)} | {shown} |")
    best = next((row for row in rows if row[1] not in ABLATIONS), None)
    if best is None:
        return ["", *lines]
    word = (f"recovered {statistics.mean(best[3]):+.1f} points of held-out top-1 without giving up target accuracy"
            if best[0] == float("inf") else
            f"recovered {best[0]:.2f} points of held-out top-1 per point of target mean R@1 given up")
    return ["", *lines, "", f"**Most held-out accuracy per point of target gain given up**, among the methods (the "
            f"ablations of refine's terms aside): {best[2]} of `{best[1]}`, which {word} (mean over seeds; *not "
            "clear* marks a difference the seeds do not agree on)."]


def ablation_lines(results: dict[str, list[dict]]) -> list[str]:
    """refine against refine without one term, at the last step of the forgetting lr: which term widens
    the gap and forgets."""
    full = {i: s for i, s in enumerate(results.get("refine", []))}
    lines = []
    for variant in ("refine rafa=0", "refine hycd=0"):
        ablated = results.get(variant, [])
        pairs = [(full[i], s) for i, s in enumerate(ablated) if i in full and "last step" in s and "last step" in full[i]]
        if not pairs:
            continue
        gaps = [a["last step"]["gap"] - f["last step"]["gap"] for f, a in pairs]
        helds = [a["last step"]["heldout"] - f["last step"]["heldout"] for f, a in pairs]
        lines.append(f"- `{variant}` − `refine`, last step ({len(pairs)} seeds): gap {difference(gaps, 3)}, held-out "
                     f"top-1 {difference(helds)}. {term_reading(variant.split()[1].partition('=')[0], gaps, helds)}")
    if lines:
        lines = ["", "Which of refine's terms widens the gap and forgets at this lr (paired by seed; a term whose "
                     "removal narrows the gap and keeps more held-out accuracy is the one that does it):", "", *lines]
    return lines


def term_reading(term: str, gaps: list[float], helds: list[float]) -> str:
    """What refine's `term` does at this lr, read from the clear differences its removal makes."""
    facts = []
    if is_clear(gaps):
        facts.append(f"`{term}` {'narrows' if statistics.mean(gaps) > 0 else 'widens'} the gap")
    if is_clear(helds):
        facts.append(f"{'costs' if statistics.mean(helds) > 0 else 'keeps'} held-out accuracy")
    return (" and ".join(facts) + " here.") if facts else f"No clear effect of `{term}` here."


def plot(args, results: dict[str, list[dict]]) -> str | None:
    from clipfit.report_figures import GAIN_LABEL, tradeoff_figure

    picture = args.markdown.with_name("tradeoff.png")
    drawn = tradeoff_figure(summary_points(results), None, None, GAIN_LABEL.format(metric=METRIC + " (target)"),
                            picture, size=(10, 7))
    return picture.name if drawn else None


def section(args, results: dict[str, list[dict]], first: dict, zeroshot: Path, minutes: float) -> str:
    """The markdown section; `first` is one finished run's run.json (pair counts)."""
    from clipfit.selection import pareto_front

    n_zeroshot, n_val = count_images(zeroshot), first["resolved"]["val_pairs"]
    front = summary_points(results)
    picture = plot(args, results)
    lines = [START, "## Choosing the trade-off: last step, selected step, WiSE-FT, soups", "",
             f"Generated by `python examples/tradeoff_results.py "
             f"{promises.portable(shlex.join(promises.strip_notes(sys.argv[1:])), args)}` "
             f"on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({minutes:.0f} minutes of run wall time in all); "
             "edit that script, not this section.", "",
             f"- **Runs**: for each method and seed ({', '.join(map(str, args.seeds))}), one `clipfit sweep` of "
             f"`lite0-minilm` (aligned) on the emoji `heldout/` pairs ({first['resolved']['train_pairs']} training, "
             f"{n_val} validation pairs), every weight trained, {args.steps} steps of batch {args.batch_size} at each "
             f"lr of {args.lrs}, measured every {args.eval_every} steps and at the last, `--select-best {METRIC}`, "
             "and `--soup uniform,greedy` of its runs (greedy with the default 1-point held-out guard). Then "
             f"`clipfit interpolate` of the lr {args.forgetting_lr} run's last weights at α = {ALPHAS} under the "
             "default rule (best mean-R@1 within 1 point of the start's held-out top-1, else the start).",
             f"- **Points**: the last and the selected step of the lr {args.forgetting_lr} run (the lr where "
             "contrastive forgets in the `full` regime above), WiSE-FT of its last step, and the two soups of the "
             "sweep.",
             f"- **Held-out**: zero-shot top-1 on {n_zeroshot} Fashion-MNIST test images ({args.zeroshot_per_class} "
             f"per class) with the one prompt `{TEMPLATE}` (not the 80 of the tables above, so the numbers differ).",
             f"- **Noise**: two binomial standard errors are about {noise(25, n_val):.0f} points on {n_val} "
             f"validation pairs and {noise(30, n_zeroshot):.0f} points on {n_zeroshot} zero-shot images; paired "
             "differences are called clear only when every seed agrees in sign and the mean exceeds two standard "
             "errors over the seeds.",
             f"- **Machine**: {cpu_name()}, {os.cpu_count()} CPU cores ({promises.load_text()}), {args.jobs} sweep(s) at once "
             f"with {args.threads} torch thread(s) each.", ""]
    for variant, per_seed in results.items():
        lines += [f"### `{variant}`", "", *variant_table(per_seed), ""]
    lines += ["### Every point on one plane", "", "Mean over seeds of each point's change from its own start; "
              "Pareto-optimal: " + ", ".join(f"`{front[i].label}`" for i in pareto_front(front)) + "."]
    if picture:
        lines += ["", f"![target gain against held-out change, every method and tool]({picture})"]
    lines += recovery_lines(results) + ablation_lines(results)
    missing = [f"`{v}` seed {s}" for v in args.variants for s in args.seeds if points(args, v, s) is None]
    if missing:
        lines += ["", f"Not finished, so not in the tables: {', '.join(missing)}."]
    lines += ["", "Commands (one variant and seed; the others differ in `--method`/`--weight` and `--seed`):", "",
              "```bash", "python -m clipfit " + promises.portable(shlex.join(sweep_command(
                  args, args.variants[0], args.seeds[0], zeroshot, [])), args),
              "python -m clipfit " + promises.portable(shlex.join(wise_command(args, args.variants[0], args.seeds[0])),
                                                       args), "```", END]
    return "\n".join(lines)


def seed_count(results: dict[str, list[dict]]) -> str:
    counts = sorted({len(per_seed) for per_seed in results.values()})
    return f"{counts[0]}–{counts[-1]} seeds" if len(counts) > 1 else f"{counts[0]} seed" + ("s" if counts[0] > 1 else "")


def which_method(results: dict[str, list[dict]], args) -> str:
    """The README paragraph: drawn from the section's numbers only, for the methods (not the ablations)."""
    from clipfit.selection import pareto_front

    results = {v: s for v, s in results.items() if v not in ABLATIONS}
    last = {v: (statistics.mean(deltas(s, "last step", "target")), statistics.mean(deltas(s, "last step", "heldout")))
            for v, s in results.items() if deltas(s, "last step", "target")}
    if not last:
        return ""
    gains, keeps = max(last, key=lambda v: last[v][0]), max(last, key=lambda v: last[v][1])
    front = summary_points(results)
    best = recovery(results)
    tool = (f" Of the tools, {best[0][2]} of `{best[0][1]}` recovered the most held-out accuracy per point of target "
            "gain given up." if best else "")
    return (f"{README_START}\n**Which method should I use?** On the starter, fine-tuning every weight at the lr where "
            f"plain contrastive fine-tuning forgets ([results.md](docs/results.md#choosing-the-trade-off-last-step-"
            f"selected-step-wise-ft-soups), {args.steps} steps of batch {args.batch_size}, {seed_count(results)}), "
            f"`{gains}` gained the most "
            f"target retrieval by its last step ({last[gains][0]:+.1f} points of mean R@1) and `{keeps}` kept the most "
            f"held-out zero-shot accuracy ({last[keeps][1]:+.1f} points from the start). The points no other beats on both target "
            "gain and held-out change: " + ", ".join(f"{front[i].label}" for i in pareto_front(front))
            + f".{tool} These are directions at this scale (a few hundred pairs, one held-out set), not general "
            f"results.\n{README_END}")


def main(argv: list[str]) -> None:
    from clipfit.io import write_text

    args, passthrough = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    promises.LOADS = args.work / "loads.txt"
    zeroshot = args.work / f"{ZEROSHOT}-{args.zeroshot_per_class}-per-class"
    if not zeroshot.is_dir():  # seeded: the same folder every time
        balanced_subset(args.data / ZEROSHOT, zeroshot, args.zeroshot_per_class, 0)
        (zeroshot / "templates.txt").write_text(TEMPLATE + "\n")
    started = time.time()
    jobs = [(v, s) for s in args.seeds for v in args.variants]  # seed by seed: a cut-short run still covers every variant
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run_one(args, *job, zeroshot, passthrough), jobs))
    results = {v: [p for s in args.seeds if (p := points(args, v, s)) is not None] for v in args.variants}
    results = {v: per_seed for v, per_seed in results.items() if per_seed}
    if not results:
        sys.exit("no run finished: nothing to write")
    made = [read(d) for v in args.variants for s in args.seeds for d in folders(args, v, s)[1:]]
    made += [json.loads(p.read_text()) for v in args.variants for s in args.seeds
             for p in folders(args, v, s)[0].glob("*/run.json")]
    minutes = sum(r.get("wall_seconds", 0) for r in made if r) / 60
    first = next(r for r in made if r and r.get("clipfit") == "run")
    markdown = args.markdown.read_text(encoding="utf-8") if args.markdown.exists() else ""
    write_text(args.markdown, replace_section(markdown, section(args, results, first, zeroshot, minutes), START, END))
    paragraph = which_method(results, args)
    if paragraph:
        readme = args.readme.read_text(encoding="utf-8")
        write_text(args.readme, replace_section(readme, paragraph, README_START, README_END, README_BEFORE))
    print(f"wrote {args.markdown} and {args.readme} ({(time.time() - started) / 60:.1f} minutes)")


if __name__ == "__main__":
    main(sys.argv[1:])
