"""Regenerate docs/results.md: does each method keep its paper's promise on the offline starter?

Every run is `clipfit refine --model lite0-minilm` (the aligned starter) on the emoji `heldout/`
split, a target set the starter was never aligned on, with clipfit's defaults except the flags
of its regime, for several seeds. Before and after each run: retrieval R@1 on the run's
validation part of the target set, zero-shot top-1 on held-out Fashion-MNIST (a seeded, per-class
balanced subset), and the modality gap (L2 distance of the normalised embeddings' centroids).

The claims checked (issue 16): refine's mean gap goes down and its held-out zero-shot stays
within one binomial standard error of the start; dclip keeps at least 94% of held-out zero-shot;
ping's target retrieval is at least contrastive's; lite does not blow the gap open; and in the
high-lr regime contrastive visibly forgets (the script first searches that lr with contrastive).

Data, from the public-data builders (see each script's header for what to install):

    python examples/datasets/emoji.py DATA/emoji
    python examples/datasets/fashion_mnist.py DATA/fashion-mnist

Then (the defaults are issue 16's two regimes, 33 runs: 4 minutes on one GPU with --jobs 8 --threads 2,
many hours on 2 shared CPU cores; --steps, --seeds and --regimes cut it down):

    python examples/promises.py --data DATA    # runs what --work lacks, writes docs/results.md
    python examples/promises.py --data DATA --collect-only   # tables of the runs finished so far

Arguments after `--` go to every `clipfit refine` call unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
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
from results import balanced_subset, count_images, cpu_name, kept_sections, split_passthrough  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("contrastive", "refine", "lite", "ping", "dclip")
GAP = "gap (L2 of normalised centroids)"
# name -> (what it is, flags); "{lr}" is the regime's learning rate
REGIMES = {
    "projections": ("both trunks locked (their outputs precomputed): the projections, the logit scale and the "
                    "methods' own heads train, at clipfit's default lr", ["--lock-image", "--lock-text"]),
    "projections-forgetting": ("both trunks locked, at the lr (from the search above) where contrastive "
                               "visibly forgets held-out zero-shot", ["--lock-image", "--lock-text"]),
    "text-tower": ("image tower locked, the whole text tower trains (regime (a) of issue 16)", ["--lock-image"]),
    "full": ("full fine-tuning at the forgetting lr (regime (b) of issue 16)", []),
}
# lrs tried, lowest first, until contrastive forgets; the search runs with the flags of the regime it serves
SEARCH_LRS = {"projections-forgetting": ("1e-4", "1e-3", "1e-2"), "full": ("1e-5", "3e-5", "1e-4")}
FORGETTING = tuple(SEARCH_LRS)
METRICS = (("image_to_text_R@1", "i→t R@1"), ("text_to_image_R@1", "t→i R@1"))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, passthrough = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "clipfit" / "starter-align")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "promises")
    parser.add_argument("--out", dest="markdown", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--regimes", nargs="+", default=["text-tower", "full"], choices=REGIMES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--full-batch-size", default=None,
                        help="batch of the full fine-tuning regime and its lr search (default: --batch-size)")
    parser.add_argument("--eval-every", default="1000", help="passed to clipfit refine; above --steps the "
                        "validation and zero-shot sets are measured only before and after training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--zeroshot-per-class", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--collect-only", action="store_true", help="start no run; tabulate the finished ones")
    parser.add_argument("--note", default="", help="a paragraph put under the title (e.g. why runs are missing)")
    return parser.parse_args(own), passthrough


def run_dir(args, regime: str, method: str, seed: int, lr: str | None = None) -> Path:
    return args.work / regime / (f"{method}-seed{seed}" + (f"-lr{lr}" if lr else ""))


def batch_size(args, regime: str) -> str:
    return args.full_batch_size if args.full_batch_size and regime in ("full", "search-full") else args.batch_size


def command(args, regime: str, method: str, seed: int, lr: str | None, zeroshot: Path, passthrough) -> list[str]:
    flags = REGIMES[regime][1] + (["--lr", lr] if lr else [])
    out = run_dir(args, regime, method, seed, lr if regime.startswith("search") else None)
    if regime in FORGETTING and method == "contrastive" and seed == args.seeds[0]:
        out = run_dir(args, f"search-{regime}", method, seed, lr)  # the search already ran this exact command
    return [sys.executable, "-m", "clipfit", "refine", str(args.data / "emoji" / "heldout"), "--method", method,
            "--model", "lite0-minilm", "--val-split", "0.3", "--seed", str(seed), "--batch-size", batch_size(args, regime),
            "--epochs", "1000", "--max-steps", str(args.steps), *flags, "--workers", "0", "--log-every", "10", "--eval-every", args.eval_every,
            "--cache-dir", str(args.work / "cache"), "--eval-zeroshot", f"folder={zeroshot}",
            "--out", str(out),
            "--overwrite", "--json", *passthrough]


COLLECT_ONLY = False  # --collect-only: write the markdown from the finished runs, start none
THREADS = 1
LOADS: Path | None = None  # file of the 1-minute load averages sampled when runs start and end


def run(cmd: list[str]) -> dict:
    out = Path(cmd[cmd.index("--out") + 1])
    if (out / "run.json").is_file() and "after" in json.loads((out / "run.json").read_text()):
        return json.loads((out / "run.json").read_text())  # finished earlier: keep it
    if COLLECT_ONLY:
        return {}
    print(f"running {out.relative_to(out.parents[1])} ...", file=sys.stderr, flush=True)
    note_load()
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    note_load()
    if done.returncode != 0:
        print(f"{out}: exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {}
    return json.loads((out / "run.json").read_text())


def run_many(commands: list[list[str]], jobs: int) -> list[dict]:
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(run, commands))


def zeroshot_key(info: dict) -> str:
    return next(k for k in info["after"] if k.startswith("zeroshot/") and k.endswith("/acc1"))


def retrieval(info: dict, when: str) -> float:
    return statistics.mean(info[when][key] for key, _ in METRICS)


def standard_error(rate: float, n: int) -> float:
    """One binomial standard error of a rate in points over n items."""
    return math.sqrt(rate * (100 - rate) / n)


def search_lr(args, regime: str, zeroshot: Path, passthrough) -> dict[str, dict]:
    """contrastive with the regime's flags (first seed) at each of the regime's lrs, lowest first, --jobs at a
    time, until one forgets; lrs above the first forgetting chunk are not run."""
    REGIMES[f"search-{regime}"] = REGIMES[regime]
    found: dict[str, dict] = {}
    values = SEARCH_LRS[regime]
    for start in range(0, len(values), args.jobs):
        chunk = values[start:start + args.jobs]
        commands = [command(args, f"search-{regime}", "contrastive", args.seeds[0], v, zeroshot, passthrough)
                    for v in chunk]
        found.update(zip(chunk, run_many(commands, args.jobs)))
        if forgets(found, count_images(zeroshot)):
            break
    return found


def forgets(search: dict[str, dict], n: int) -> bool:
    return any(info and dropped(info, n) for info in search.values())


def dropped(info: dict, n: int) -> bool:
    key = zeroshot_key(info)
    return info["before"][key] - info["after"][key] > 2 * standard_error(info["before"][key], n)


def forgetting_lr(search: dict[str, dict], n: int) -> str:
    """The smallest searched lr at which contrastive's zero-shot fell by more than two standard errors."""
    for lr, info in search.items():
        if info and dropped(info, n):
            return lr
    return list(search)[-1] if any(search.values()) else None


def mean_std(values: list[float], digits: int) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "–"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cell(runs: list[dict], value, digits: int = 1) -> str:
    before = sorted({round(value(r, "before"), 6) for r in runs})
    start = f"{before[0]:.{digits}f}" if len(before) == 1 else mean_std([value(r, "before") for r in runs], digits)
    return f"{start} → {mean_std([value(r, 'after') for r in runs], digits)}"


def regime_table(by_method: dict[str, list[dict]]) -> list[str]:
    header = ["method", "seeds", *(label for _, label in METRICS), "Fashion-MNIST top-1", GAP]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in by_method.items():
        runs = [r for r in runs if r]
        if not runs:
            lines.append(f"| `{method}` | 0 | – | – | – | – |")
            continue
        key = zeroshot_key(runs[0])
        cells = [f"`{method}`", str(len(runs)),
                 *(cell(runs, lambda r, w, k=k: r[w][k]) for k, _ in METRICS),
                 cell(runs, lambda r, w: r[w][key]), cell(runs, lambda r, w: r[w]["modality_gap"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mean_of(runs: list[dict], value) -> float:
    return statistics.mean(value(r) for r in runs)


def verdicts(by_method: dict[str, list[dict]], n_zeroshot: int) -> list[str]:
    """Each claim, held or not, with the numbers behind it."""
    got = {m: [r for r in runs if r] for m, runs in by_method.items()}
    out = []

    def zs(r, when):
        return r[when][zeroshot_key(r)]

    if got.get("contrastive"):
        c = got["contrastive"]
        before, after = mean_of(c, lambda r: zs(r, "before")), mean_of(c, lambda r: zs(r, "after"))
        se = standard_error(before, n_zeroshot)
        word = "forgets visibly" if before - after > 2 * se else "does not visibly forget"
        out.append(f"- contrastive {word}: held-out zero-shot {before:.1f} → {after:.1f} (mean over seeds; two "
                   f"standard errors are {2 * se:.1f} points).")
    if got.get("refine"):
        r_ = got["refine"]
        gap_b, gap_a = mean_of(r_, lambda r: r["before"]["modality_gap"]), mean_of(r_, lambda r: r["after"]["modality_gap"])
        before, after = mean_of(r_, lambda r: zs(r, "before")), mean_of(r_, lambda r: zs(r, "after"))
        se = standard_error(before, n_zeroshot)
        narrows, keeps = gap_a < gap_b, abs(after - before) <= se
        chosen = sorted({r["methods"]["refine"].get("hycd_logits", "?") for r in r_})
        out.append(f"- refine: mean {GAP} {gap_b:.3f} → {gap_a:.3f}: {'goes down — holds' if narrows else 'does not go down — the claim does NOT hold'}; "
                   f"held-out zero-shot {before:.1f} → {after:.1f}, {'within' if keeps else 'NOT within'} one standard "
                   f"error ({se:.1f} points) of the start — {'holds' if keeps else 'the claim does NOT hold'}. "
                   f"HyCD logits chosen by --hycd-logits auto: {', '.join(chosen)}.")
    if got.get("dclip"):
        d = got["dclip"]
        before, after = mean_of(d, lambda r: zs(r, "before")), mean_of(d, lambda r: zs(r, "after"))
        kept = after / before if before else float("nan")
        out.append(f"- dclip keeps {kept:.0%} of held-out zero-shot ({before:.1f} → {after:.1f}): "
                   f"{'holds (≥ 94%)' if kept >= 0.94 else 'below 94% — the claim does NOT hold'}.")
    if got.get("ping") and got.get("contrastive"):
        p, c = mean_of(got["ping"], lambda r: retrieval(r, "after")), mean_of(got["contrastive"], lambda r: retrieval(r, "after"))
        out.append(f"- ping's target retrieval (mean of both R@1) {p:.1f} vs contrastive's {c:.1f}: "
                   f"{'holds (≥)' if p >= c else 'lower — the claim does NOT hold'}.")
    if got.get("lite"):
        li = got["lite"]
        gap_b, gap_a = mean_of(li, lambda r: r["before"]["modality_gap"]), mean_of(li, lambda r: r["after"]["modality_gap"])
        change = (gap_a - gap_b) / gap_b
        out.append(f"- lite: mean {GAP} {gap_b:.3f} → {gap_a:.3f} ({change:+.0%}): "
                   f"{'not blown open (within +10%)' if change <= 0.10 else 'widened by more than 10% — the claim does NOT hold'}.")
    return out


def step_costs(regimes: dict[str, dict], searches: dict[str, dict]) -> str:
    """Mean training seconds per optimiser step of each regime's finished runs (wall clock, under the load)."""
    parts = []
    for regime, by_method in regimes.items():
        runs = [r for rs in by_method.values() for r in rs if r] + [r for r in searches.get(regime, {}).values() if r]
        if runs:
            per_step = statistics.mean(r["train_seconds"] / r["resolved"].get("total_steps", 1) for r in runs)
            size = runs[0]["config"]["batch_size"]
            parts.append(f"{per_step:.1f} s per step of batch {size} in `{regime}` (mean over {len(runs)} runs)")
    return ("; ".join(parts) or "no run finished") + " (wall-clock training time on the machine below)"


def machine_text(args) -> str:
    """Where the runs ran: `machine.txt` in --work when they ran elsewhere (e.g. a GPU machine), else here."""
    elsewhere = args.work / "machine.txt"
    if elsewhere.is_file():
        return elsewhere.read_text().strip()
    return f"{cpu_name()}, {os.cpu_count()} CPU cores shared with other jobs ({load_text()}), under `nice -n 15`"


def note_load() -> None:
    with LOADS.open("a") as f:  # several invocations may share --work; one short line each
        f.write(f"{os.getloadavg()[0]:.2f}\n")


def load_text() -> str:
    """The 1-minute load averages sampled while runs went, over every invocation on --work."""
    loads = [float(x) for x in LOADS.read_text().split()] if LOADS.is_file() else []
    if not loads:
        return "load not recorded"
    return f"1-minute load average {min(loads):.1f}–{max(loads):.1f} sampled while the runs went"


def portable(text: str, args) -> str:
    """`text` with this machine's data and work folders named DATA and WORK."""
    return text.replace(str(args.data), "DATA").replace(str(args.work), "WORK")


def strip_notes(argv: list[str]) -> list[str]:
    """The command line as run, without --collect-only and --note TEXT."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--collect-only":
            skip = False
            continue
        if a == "--note":
            skip = True
            continue
        out.append(a)
    return out


def markdown(args, regimes: dict[str, dict], searches: dict[str, dict], lrs: dict[str, str | None], zeroshot: Path,
             minutes: float, example: list[str]) -> str:
    n = count_images(zeroshot)
    finished = [r for runs in regimes.values() for rs in runs.values() for r in rs if r]
    planned = sum(len(rs) for runs in regimes.values() for rs in runs.values())
    searched = [r for search in searches.values() for r in search.values() if r]
    pairs = len(list((args.data / "emoji" / "heldout").glob("*.txt")))
    val = max(1, round(pairs * 0.3))  # clipfit.run.split_val's count
    first = (finished or searched or [None])[0] or {"environment": {"python": sys.version.split()[0], "versions": {}},
                                          "resolved": {"train_pairs": pairs - val, "val_pairs": val}}
    env = first["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# Results: do the methods keep their papers' promises on the offline starter?", "",
        f"Generated by `python examples/promises.py {portable(shlex.join(strip_notes(sys.argv[1:])), args)}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; the runs took {minutes:.0f} minutes together. "
        "Edit the script, not this file.", "", *([args.note, ""] if args.note else []),
        "- **Model**: `--model lite0-minilm` with its aligned weights (docs/starter-model.md).",
        f"- **Target set**: the emoji `heldout/` split ({first['resolved']['train_pairs']} training + "
        f"{first['resolved']['val_pairs']} validation pairs with `--val-split 0.3`; the split depends on the seed); "
        "the starter was aligned on the emoji `align/` split and openclipart, never on these.",
        f"- **Held-out zero-shot**: Fashion-MNIST, {args.zeroshot_per_class} test images per class ({n} images; "
        f"one binomial standard error at 30% is {standard_error(30, n):.1f} points).",
        f"- **Scale**: {args.steps} optimiser steps of batch {args.batch_size} per run"
        + (f" (batch {args.full_batch_size} in the full fine-tuning regime and its lr search, to fit the time: "
           "see the cost line)" if args.full_batch_size else "")
        + ", seeds "
        f"{', '.join(map(str, args.seeds))}; clipfit's defaults otherwise (AdamW, lr 1e-5 unless the regime says, "
        "weight decay 0.1, constant lr, fp32, every method's defaults, including refine's `--hycd-logits auto`, "
        "lite's `--lite-critic heads` and dclip's `--dclip-vision proj`).",
        f"- **Validation thinned**: `--eval-every {args.eval_every}` (more than the {args.steps} steps), so the "
        "validation split and Fashion-MNIST are measured only before and after training, not after every epoch; "
        "measuring does not change the weights, so the after-values are those of a run that measured every epoch.",
        f"- **Cost**: {step_costs(regimes, searches)}.",
        f"- **Machine**: {machine_text(args)}, {args.jobs} runs at once with {args.threads} torch thread(s) each; "
        f"Python {env['python']}" + (f", {versions}." if versions else "."),
        f"- **{GAP}**: ‖mean of the normalised image embeddings − mean of the normalised text embeddings‖ on the "
        "validation pairs (run.json `modality_gap`; not `modality_gap_mse`, the squared form averaged over dimensions).",
        f"- **Finished**: {len(finished)} of the {planned} runs planned above"
        + ("." if len(finished) == planned else "; the rows say how many seeds each cell has, and the claims below "
           "are only judged where runs finished. What did not finish was NOT measured."),
        "", "Cells are before → after; after is mean ± std over seeds (before too where the seed changes the split).",
    ]
    for regime, search in searches.items():
        lr = lrs[regime]
        lines += ["", f"## Finding the lr where contrastive forgets ({regime})", "",
                  f"contrastive, seed {args.seeds[0]}, with the flags of the `{regime}` regime "
                  f"({REGIMES[regime][0]}), {args.steps} steps of batch {batch_size(args, regime)}; lrs tried lowest "
                  f"first ({', '.join(SEARCH_LRS[regime])}), {args.jobs} at a time, stopping once one forgets:", "",
                  "| lr | Fashion-MNIST top-1 | i→t R@1 | " + GAP + " |", "|---|---|---|---|"]
        for value, info in search.items():
            if info:
                key = zeroshot_key(info)
                lines.append(f"| {value} | {info['before'][key]:.1f} → {info['after'][key]:.1f} | "
                             f"{info['before']['image_to_text_R@1']:.1f} → {info['after']['image_to_text_R@1']:.1f} | "
                             f"{info['before']['modality_gap']:.3f} → {info['after']['modality_gap']:.3f} |")
            else:
                lines.append(f"| {value} | not run (or not finished) | – | – |")
        if any(search.values()):
            lines += ["", f"The `{regime}` regime uses lr {lr}: the smallest searched lr at which contrastive's "
                          "held-out zero-shot fell by more than two standard errors (the largest searched, if none did). "
                          f"Its contrastive seed-{args.seeds[0]} cell is that search run."]
        else:
            lines += ["", "No search run finished: the forgetting lr was NOT found."]
    for regime, by_method in regimes.items():
        what = REGIMES[regime][0] + (f" (lr {lrs[regime]})" if lrs.get(regime) else "")
        judged = verdicts(by_method, n) or ["- none judged: no run of this regime finished."]
        lines += ["", f"## Regime: {regime}", "", f"{what}.", "", *regime_table(by_method), "", "Claims:", "", *judged]
    shown = portable(shlex.join(["python", *example[1:]]), args)
    lines += ["", "## Commands", "", "One `clipfit refine` run per method, seed and regime, e.g.:", "", "```bash",
              shown, "```", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from clipfit.io import write_text

    global COLLECT_ONLY, THREADS, LOADS
    args, passthrough = parse_args(argv)
    COLLECT_ONLY, THREADS, LOADS = args.collect_only, args.threads, args.work / "loads.txt"
    args.work.mkdir(parents=True, exist_ok=True)
    zeroshot = args.work / f"fashion-mnist-{args.zeroshot_per_class}-per-class"
    if not zeroshot.is_dir():
        balanced_subset(args.data / "fashion-mnist", zeroshot, args.zeroshot_per_class, 0)
    n = count_images(zeroshot)
    started = time.time()
    searches, lrs, regimes, example = {}, {}, {}, []
    for regime in args.regimes:
        if regime in FORGETTING:
            searches[regime] = search_lr(args, regime, zeroshot, passthrough)
            lrs[regime] = forgetting_lr(searches[regime], n)
        value = lrs.get(regime)
        if regime in FORGETTING and value is None:  # no forgetting lr found: nothing to run
            regimes[regime] = {m: [{} for _ in args.seeds] for m in args.methods}
            continue
        commands = [command(args, regime, m, s, value, zeroshot, passthrough) for m in args.methods for s in args.seeds]
        example = example or commands[0]
        done = run_many(commands, args.jobs)
        regimes[regime] = {m: done[i * len(args.seeds):(i + 1) * len(args.seeds)] for i, m in enumerate(args.methods)}
    minutes = sum(r.get("wall_seconds", 0) for rs in regimes.values() for runs in rs.values() for r in runs) / 60
    minutes += sum(r.get("wall_seconds", 0) for search in searches.values() for r in search.values()) / 60
    write_text(args.markdown, markdown(args, regimes, searches, lrs, zeroshot, minutes, example) + kept_sections(args.markdown))
    print(f"wrote {args.markdown} ({(time.time() - started) / 60:.0f} minutes)")


if __name__ == "__main__":
    main(sys.argv[1:])
