"""Regenerate the "Labelled folders: FLYP-style fine-tuning" section of docs/results.md (issue 23).

The labelled target set is Fashion-MNIST's *training* split (Debian's dataset-fashion-mnist; the
starter was never aligned on Fashion-MNIST) at --sizes images per class, one folder per class, each
seed drawing its own images (examples/datasets/fashion_mnist_classes.py --seed). Every row is
measured on the same two sets, which no row trains on:

- in-distribution (ID): a fixed, balanced subset of Fashion-MNIST's *test* split
  (examples/datasets/fashion_mnist.py, seed 0), prompted with open_clip's 80 ImageNet templates;
- held-out: the emoji `heldout/` split as 9 category classes (examples/datasets/emoji.py
  --by category, prompt "an emoji of {c}"): what fine-tuning forgets.

Rows, for each size and seed: zero-shot (the starting model: every run's `before`); a linear probe
(`clipfit eval linear-probe` on the same images, tested on the ID set); and `clipfit refine
--layout classes` of `lite0-minilm`, every weight trained, the same steps, batch and lr for each:
naive contrastive on bare class names with one-hot targets, FLYP (contrastive on prompts from the
80 templates) with and without multi-positive targets, refine and dclip (multi-positive). Both sets
are `--eval-zeroshot folder=...`, so a run's `before` is the zero-shot row and every row is
measured on the same images. Reported per size: ID top-1 and ECE (mean ± sd over seeds), held-out
top-1 kept (after/before) and its change, and a verdict drawn from these numbers.

Defaults: 40 steps of batch 32 (about 3 other items of an image's class in its batch, so one-hot
targets have negatives to get wrong; 13 epochs at 10 per class, 0.6 at 200), 30 ID test images per
class (300), 2 runs at once with one torch thread each. On 2 idle CPU cores a trained run costs
about 2 minutes, 40% of it start-up and the before/after measurements of some 900 images, and
dclip several more at 50 per class (SKIP: not run at 200 unless asked); the whole default run,
about 2 hours.

Data: the builders read the packages their headers name, into WORK/data (nothing else to prepare):

    sudo apt-get install -y dataset-fashion-mnist
    npm install --prefix ~/.cache/clipfit/npm emoji-datasource-google@16.0.0

Then, from the repository root:

    python examples/label_results.py                 # runs what --work lacks, rewrites the section
    python examples/label_results.py --collect-only  # the section from the runs finished so far
    python examples/label_results.py --sizes 4 --seeds 0 --steps 2 --batch-size 8 --test-per-class 3 \\
        --work /tmp/w --markdown /tmp/r.md           # a smoke test

Finished runs are reused (their folders are named after the settings); a finished run's
`checkpoints/` (resume state, about 320 MB) is removed, leaving about 100 MB a run, and dclip's
token cache is about 260 MB per 50-per-class seed.

Arguments after `--` go to every `clipfit refine` call unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent / "datasets"))
import emoji  # noqa: E402  (examples/datasets/emoji.py, the builder)
import fashion_mnist  # noqa: E402
import fashion_mnist_classes  # noqa: E402
import promises  # noqa: E402
from results import REPO, count_images, cpu_name, noise, split_passthrough  # noqa: E402
from selection_results import difference, drop_checkpoints, finished, is_clear, replace_section  # noqa: E402
from tradeoff_results import clipfit  # noqa: E402

START, END = "<!-- label-results:start -->", "<!-- label-results:end -->"
TITLE = "Labelled folders: FLYP-style fine-tuning"
BARE = "{c}"  # the naive row's one template: the bare class name
RUNS = {  # row -> clipfit refine flags ("TEMPLATES" is the bare-names file); zeroshot and probe train nothing
    "naive": ["--method", "contrastive", "--templates", "TEMPLATES", "--no-multi-positive"],
    "flyp-onehot": ["--method", "contrastive", "--no-multi-positive"],
    "flyp": ["--method", "contrastive"],
    "refine": ["--method", "refine"],
    "dclip": ["--method", "dclip"],
}
ROWS = ("zeroshot", "probe", *RUNS)
LABELS = {"zeroshot": "zero-shot (start)", "probe": "linear probe", "naive": "naive: class names, one-hot",
          "flyp-onehot": "FLYP, one-hot", "flyp": "FLYP (multi-positive)", "refine": "refine (multi-positive)",
          "dclip": "dclip (multi-positive)"}
NEVER = "1000000"  # --eval-every beyond --max-steps: measured before and after training only (0 is every epoch)
# dclip's stage 1 encodes the MiniLM token states of every caption of every training image (80 a
# labelled image: 160,000 rows at 200 per class), which on 2 CPU cores costs more than all other rows
# of that size together: not run there unless asked (--skip with nothing after it)
SKIP = ("dclip@200",)
PER_CLASS_DRAW = 0  # the ID test subset's seed: the same images for every row, size and seed


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, passthrough = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "label-results")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 50, 200], help="training images per class")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--skip", nargs="*", default=list(SKIP), metavar="ROW@SIZE",
                        help=f"rows not run at a size (default: {' '.join(SKIP)}; none with a bare --skip)")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of every trained row")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", default="1e-5", help="one lr for every trained row (FLYP's; clipfit's default)")
    parser.add_argument("--test-per-class", type=int, default=30, help="ID test images per class")
    parser.add_argument("--emoji-source", type=Path, default=emoji.DEFAULT_SOURCE,
                        help="the installed emoji-datasource-google package folder")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--collect-only", action="store_true", help="start nothing; write from the finished runs")
    args = parser.parse_args(own)
    args.data = args.work / "data"  # what promises.portable calls DATA
    args.skip = [parse_skip(parser, item) for item in args.skip]
    return args, passthrough


def parse_skip(parser, item: str) -> tuple[str, int]:
    row, _, size = item.partition("@")
    if row not in ROWS or row == "zeroshot" or not size.isdigit():
        parser.error(f"--skip {item}: expected ROW@SIZE with ROW one of {', '.join(ROWS[1:])}")
    return row, int(size)




# --- data: built once into WORK/data by the builders of examples/datasets ----------------------

def built(out: Path, build) -> Path:
    """`out`, made by `build(folder)` into a temporary folder first, so an interrupted build is not kept."""
    if not out.is_dir():
        scratch = out.with_name(f".{out.name}.partial")
        build(scratch)  # the builders replace a leftover scratch folder (force=True)
        scratch.rename(out)
    return out


def id_test(args) -> Path:
    return built(args.data / f"fashion-mnist-test-{args.test_per_class}-per-class",
                 lambda out: fashion_mnist.build(out, args.test_per_class, PER_CLASS_DRAW, True))


def heldout(args) -> Path:
    categories = built(args.data / "emoji-categories",
                       lambda out: emoji.build(out, args.emoji_source, emoji.DEFAULT_SEED,
                                               emoji.DEFAULT_HELDOUT_FRACTION, True, by="category"))
    return categories / "heldout"


def training_set(args, size: int, seed: int) -> Path:
    return built(args.data / f"fashion-mnist-train-{size}-per-class-seed{seed}",
                 lambda out: fashion_mnist_classes.build(out, size, seed, True))


def probe_data(args, size: int, seed: int, test: Path) -> Path:
    """The linear probe's folder: train/ (the run's labelled images) and test/ (the ID set), as links."""
    folder = args.data / f"probe-{size}-per-class-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (("train", training_set(args, size, seed)), ("test", test)):
        if not (folder / name).exists():
            (folder / name).symlink_to(target.resolve(), target_is_directory=True)
    return folder


def bare_templates(args) -> Path:
    path = args.work / "bare-class-names.txt"
    path.write_text(BARE + "\n", encoding="utf-8")
    return path


# --- runs --------------------------------------------------------------------------------------

def output(args, row: str, size: int, seed: int) -> Path:
    """A run folder; the probe's JSON file. Named after the settings, so a rerun with others makes new runs."""
    test = f"test{args.test_per_class}"
    settings = f"probe-{test}" if row == "probe" else f"steps{args.steps}-batch{args.batch_size}-lr{args.lr}-{test}"
    name = f"{row}-seed{seed}" + (".json" if row == "probe" else "")
    return args.work / "runs" / settings / f"{size}-per-class" / name


def refine_command(args, row: str, size: int, seed: int, sets: list[Path], passthrough: list[str]) -> list[str]:
    flags = [str(bare_templates(args)) if f == "TEMPLATES" else f for f in RUNS[row]]
    return ["refine", str(training_set(args, size, seed)), "--layout", "classes", *flags, "--model", "lite0-minilm",
            "--seed", str(seed), "--lr", args.lr, "--batch-size", str(args.batch_size), "--epochs", "100000",
            "--max-steps", str(args.steps), "--eval-every", NEVER, "--keep-checkpoints", "1", "--workers", "0",
            "--log-every", "10", *(x for s in sets for x in ("--eval-zeroshot", f"folder={s}")),
            "--cache-dir", str(args.work / "cache"), "--out", str(output(args, row, size, seed)), "--overwrite",
            "--quiet", *passthrough]


def probe_command(args, size: int, seed: int, test: Path) -> list[str]:
    return ["eval", "linear-probe", "--data", str(probe_data(args, size, seed, test)), "--model", "lite0-minilm",
            "--seed", str(seed), "--workers", "0", "--quiet", "--json", "--out", str(output(args, "probe", size, seed))]


def done(path: Path) -> bool:
    return path.is_file() if path.suffix == ".json" else finished(path)


ELAPSED_LOCK = threading.Lock()


def timed(args, command: list[str], out: Path) -> None:
    """One clipfit call, its wall time (start-up and measurements included) appended to WORK/elapsed.jsonl."""
    started = time.time()
    ok = clipfit(args, *command)
    line = json.dumps({"out": str(out.relative_to(args.work)), "seconds": round(time.time() - started, 1), "ok": ok,
                       "load": round(os.getloadavg()[0], 2)})
    with ELAPSED_LOCK, (args.work / "elapsed.jsonl").open("a") as f:
        f.write(line + "\n")
    if out.suffix != ".json":
        drop_checkpoints(out)


def jobs(args, sets: list[Path], passthrough: list[str]) -> list[tuple[list[str], Path]]:
    """(command, output) of every probe and run not finished yet, seed by seed (a run cut short
    still covers every size), smallest size first."""
    todo = []
    for seed in args.seeds:
        for size in args.sizes:
            for row in (r for r in args.rows if r != "zeroshot" and (r, size) not in args.skip):
                out = output(args, row, size, seed)
                if not done(out):
                    command = (probe_command(args, size, seed, sets[0]) if row == "probe"
                               else refine_command(args, row, size, seed, sets, passthrough))
                    todo.append((command, out))
    return todo


# --- numbers -----------------------------------------------------------------------------------

def set_key(folder: Path) -> str:
    """run.json's prefix of a `--eval-zeroshot folder=` set (clipfit names it after the folder)."""
    return f"zeroshot/{folder.resolve().name}"


def numbers(args, row: str, size: int, seed: int, sets: list[Path]) -> dict | None:
    """ID top-1 and ECE, held-out top-1 before and after (percent) of one row, size and seed; None
    until it finished. The zero-shot row is the `before` of the trained runs of that size and seed."""
    test, held = (set_key(s) for s in sets)
    if row == "probe":
        path = output(args, row, size, seed)
        return {"id": 100 * json.loads(path.read_text())["metrics"]["lp_acc1"]} if done(path) else None
    if row == "zeroshot":
        runs = [output(args, r, size, seed) for r in RUNS]
        path = next((r for r in runs if done(r)), None)
        when = "before"
    else:
        path, when = output(args, row, size, seed), "after"
        path = path if done(path) else None
    if path is None:
        return None
    run = json.loads((path / "run.json").read_text())
    return {"id": run[when][f"{test}/acc1"], "ece": run[when][f"{test}/ece"],
            "held_before": run["before"][f"{held}/acc1"], "held_after": run[when][f"{held}/acc1"],
            "templates": len(run["resolved"]["classes"]["templates"]),
            "step_seconds": run["train_seconds"] / max(run["steps"], 1), "steps": run["steps"]}


def collect(args, sets: list[Path]) -> dict[int, dict[str, dict[int, dict]]]:
    """size -> row -> seed -> numbers, finished ones only."""
    return {size: {row: {seed: n for seed in args.seeds if (n := numbers(args, row, size, seed, sets))}
                   for row in args.rows} for size in args.sizes}


def paired(by_row: dict[str, dict[int, dict]], a: str, b: str, value) -> list[float]:
    """value(a) − value(b) for each seed both rows finished (the same training images)."""
    return [value(by_row[a][s]) - value(by_row[b][s]) for s in by_row.get(a, {}) if s in by_row.get(b, {})]


def kept(n: dict) -> float:
    return 100 * n["held_after"] / n["held_before"]


def change(n: dict) -> float:
    return n["held_after"] - n["held_before"]


def cell(values: list[float], same: bool = False) -> str:
    """mean ± sd (one seed: its value); with `same`, the one value every run measured (the starting
    model) when they agree."""
    if not values:
        return "–"
    return f"{values[0]:.1f}" if same and max(values) - min(values) < 1e-9 else promises.mean_std(values, 1)


# --- the section -------------------------------------------------------------------------------

def targets_text(row: str, n: dict | None) -> str:
    """Which case of multi-positive targets a row is in (docs/methods.md, "What changes where")."""
    if row in ("zeroshot", "probe"):
        return "–"
    templates = f"{n['templates']} template(s)" if n else "?"
    if row == "naive":
        return f"one-hot; {templates}: a class's captions are identical"
    if row == "flyp-onehot":
        return f"one-hot; {templates}: a class's captions mostly differ"
    return f"uniform over the class; {templates}"


def size_table(args, size: int, by_row: dict[str, dict[int, dict]]) -> list[str]:
    lines = [f"### {size} images per class ({10 * size} training images)", "",
             "| row | targets | seeds | ID top-1 | ID ECE | held-out top-1 kept (after/before) "
             "| held-out change (points) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in args.rows:
        if (row, size) in args.skip:
            lines.append(f"| {LABELS[row]} | – | 0 | not run (`--skip`) | – | – | – |")
            continue
        seeds = list(by_row.get(row, {}).values())
        first, same = (seeds[0] if seeds else None), row == "zeroshot"
        ece = cell([n["ece"] for n in seeds], same) if seeds and "ece" in first else "–"
        if row == "probe":
            held = ["100% (model unchanged)", "0"]
        elif seeds:
            held = [f"{cell([kept(n) for n in seeds], same)}%", cell([change(n) for n in seeds], same)]
        else:
            held = ["–", "–"]
        lines.append(f"| {LABELS[row]} | {targets_text(row, first)} | {len(seeds)} | "
                     f"{cell([n['id'] for n in seeds], same)} | {ece} | {held[0]} | {held[1]} |")
    return lines


def comparison(results, a: str, b: str, value, floor: float = 0.0) -> tuple[str, list[int], list[int]]:
    """'10/class +3.1; 50/class +0.4 (not clear)' of value(a) − value(b) paired by seed, the sizes
    where a is clearly higher (and by at least `floor`: one image of the set), and the other sizes."""
    parts, higher, other = [], [], []
    for size, by_row in results.items():
        diffs = paired(by_row, a, b, value)
        if diffs:
            parts.append(f"{size}/class {difference(diffs, floor=floor)}")
            mean = statistics.mean(diffs)
            (higher if is_clear(diffs) and mean > 0 and mean >= floor else other).append(size)
    return "; ".join(parts), higher, other


def sizes_text(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) + " per class"


def beats(a: str, b: str, higher: list[int], other: list[int]) -> str:
    if not other:
        return f"{LABELS[a]} beats {LABELS[b]} on ID top-1 at every size."
    if not higher:
        return f"{LABELS[a]} does **not** beat {LABELS[b]} on ID top-1 at any size."
    return (f"{LABELS[a]} beats {LABELS[b]} on ID top-1 at {sizes_text(higher)}, and does **not** at "
            f"{sizes_text(other)}.")


COMPARED = (("flyp", "naive"), ("flyp", "flyp-onehot"), ("refine", "flyp"), ("dclip", "flyp"), ("flyp", "probe"))


def verdict_lines(results, n_test: int, n_held: int) -> list[str]:
    """For each pair of rows: the paired differences per size, and whether the first beats the second.
    A difference of less than one image of its set is not called clear, however well the seeds agree."""
    rows = {r for by_row in results.values() for r, seeds in by_row.items() if seeds}
    lines = []
    for a, b in (pair for pair in COMPARED if set(pair) <= rows):
        top1, higher, other = comparison(results, a, b, lambda n: n["id"], 100 / n_test)
        facts = [f"ID top-1 {top1}."]
        if b != "probe":
            facts += [f"Held-out change {comparison(results, a, b, change, 100 / n_held)[0]}.",
                      f"ID ECE {comparison(results, a, b, lambda n: n['ece'])[0]}."]
        lines.append(f"- **{LABELS[a]} − {LABELS[b]}** (points): {' '.join(facts)} {beats(a, b, higher, other)}")
    return lines


def step_costs(results) -> str:
    per_row: dict[str, list[float]] = {}
    for by_row in results.values():
        for row, seeds in by_row.items():
            if row in RUNS:
                per_row.setdefault(row, []).extend(n["step_seconds"] for n in seeds.values())
    return ", ".join(f"{row} {statistics.mean(v):.1f} s" for row, v in per_row.items() if v) or "none finished"


def elapsed_minutes(args) -> float:
    path = args.work / "elapsed.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return sum(json.loads(line)["seconds"] for line in lines) / 60


def example_commands(args, sets: list[Path]) -> list[str]:
    size, seed = args.sizes[0], args.seeds[0]
    commands = [probe_command(args, size, seed, sets[0])] if "probe" in args.rows else []
    commands += [refine_command(args, row, size, seed, sets, []) for row in args.rows if row in RUNS]
    return ["python -m clipfit " + promises.portable(shlex.join(c), args) for c in commands]


def start_text(results) -> str:
    befores = [n["held_before"] for by_row in results.values() for seeds in by_row.values() for n in seeds.values()
               if "held_before" in n]
    return cell(befores, same=True) + "%" if befores else "not measured yet"


def subcategories(args) -> str:
    """Why the held-out classes are categories: the subcategories of the same images."""
    sizes = emoji.class_sizes(args.emoji_source, "subcategory")
    images = sum(sizes.values())
    single = sum(1 for n in sizes.values() if n <= 1)
    return (f"the same {images} images fall into {len(sizes)} of them, {images / len(sizes):.1f} a class on average "
            f"and {single} with a single image, named by codes such as `av-symbol` and `person-role` (the starter "
            "scored 20% top-1 on them, against 60% on the categories, when this script was written)")


def skipped_lines(args) -> list[str]:
    skipped = [(row, size) for row, size in args.skip if row in args.rows and size in args.sizes]
    if not skipped:
        return []
    why = {"dclip": lambda size: (f": its stage 1 encodes MiniLM's token states for every caption of every "
                                  f"training image, 80 an image, {80 * 10 * size:,} rows at this size; 8,000 rows "
                                  "took 88 s on 2 CPU cores when this script was written")}
    reasons = [f"{LABELS[row]} at {size} per class{why[row](size) if row in why else ''}" for row, size in skipped]
    return ["Not run (`--skip`): " + "; ".join(reasons) + ".", ""]


def section(args, results, sets: list[Path]) -> str:
    test, held = sets
    n_test, n_held = count_images(test), count_images(held)
    classes_held = sum(1 for p in held.iterdir() if p.is_dir())
    same_class = (args.batch_size - 1) / 10
    missing = [f"{LABELS[r]} {size}/class seed {s}" for size, by_row in results.items() for r in args.rows
               for s in args.seeds if s not in by_row.get(r, {}) and (r, size) not in args.skip]
    lines = [START, f"## {TITLE}", "",
             f"Generated by `python examples/label_results.py "
             f"{promises.portable(shlex.join(promises.strip_notes(sys.argv[1:])), args)}` on "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({elapsed_minutes(args):.0f} minutes of clipfit "
             "wall time in all, start-up and measurements included); edit that script, not this section.", "",
             f"- **Labelled set**: Fashion-MNIST's *training* split (Debian's `dataset-fashion-mnist`; the starter "
             f"was never aligned on it) at {sizes_text(args.sizes)}, one folder per class "
             "(`examples/datasets/fashion_mnist_classes.py`); each seed draws its own images, and every row of a "
             "seed uses the same ones.",
             f"- **ID test**: {n_test} images of Fashion-MNIST's *test* split ({args.test_per_class} per class, "
             "the same for every row; `examples/datasets/fashion_mnist.py`), zero-shot with the 80 ImageNet templates "
             "the FLYP rows train with, for every row (the naive row included, which trained on bare names), through "
             "`--eval-zeroshot folder=`: a run's `before` is the zero-shot row.",
             f"- **Held-out**: the emoji `heldout/` split as its {classes_held} emoji.json categories "
             f"({n_held} images; `examples/datasets/emoji.py --by category`, prompt `{emoji.TEMPLATE}`), which no "
             f"row trains on; the starter's top-1 there is {start_text(results)}, so a loss can show. Not the "
             f"subcategories: {subcategories(args)}.",
             f"- **Training**: `clipfit refine --layout classes --model lite0-minilm`, every weight trained (FLYP's "
             f"full fine-tuning), {args.steps} steps of batch {args.batch_size} at lr {args.lr} for every trained "
             "row, clipfit's defaults otherwise (AdamW, weight decay 0.1, constant lr; every method's defaults), "
             "no validation split (every labelled image trains). The linear probe: `clipfit eval linear-probe` "
             "on the starting model's image features of the same images (L2 strength chosen on 20% of them), "
             "tested on the ID set; it reports no ECE and does not change the model.",
             f"- **Targets**: with {args.batch_size} items a batch and 10 classes, about {same_class:.1f} other items "
             "of an image's batch share its class. One-hot targets make them negatives; multi-positive targets "
             "spread each row's target over its class. Where positives' text embeddings are equal (an exactly "
             "repeated caption through a text tower without dropout) the two give the same gradient "
             "(docs/methods.md); here they differ in every multi-positive row, since a class's captions come "
             "from 80 templates and the starter's MiniLM text tower trains with dropout (0.1). The naive row's "
             "captions are identical within a class, so multi-positive targets would change it only through "
             "that dropout; it uses one-hot targets, as a plain CLIP trainer does.",
             f"- **Noise**: two binomial standard errors are about {noise(50, n_test):.0f} points on the ID set and "
             f"{noise(60, n_held):.0f} on the held-out set; a paired difference (same seed, same images) is called "
             "clear only when every seed agrees in sign, the mean exceeds two standard errors over the seeds, and "
             "it amounts to at least one image of its set.",
             f"- **Cost**: training seconds per step: {step_costs(results)}.",
             f"- **Machine**: {cpu_name()}, {os.cpu_count()} CPU cores ({promises.load_text()}), {args.jobs} run(s) "
             f"at once with {args.threads} torch thread(s) each.", "",
             "Mean ± standard deviation over seeds; top-1 and ECE in %, ECE (15 bins) lower is better. Held-out "
             "kept is after/before top-1 on the emoji categories.", ""]
    for size, by_row in results.items():
        lines += [*size_table(args, size, by_row), ""]
    verdicts = verdict_lines(results, n_test, n_held)
    if verdicts:
        lines += ["**Verdict** (generated from the tables):", "", *verdicts, ""]
    lines += skipped_lines(args)
    if missing:
        lines += [f"Not finished, so not in the tables: {', '.join(missing)}.", ""]
    lines += ["Commands (one size and seed; the others differ in the folder and `--seed`; DATA is WORK/data):", "",
              "```bash", *example_commands(args, sets), "```", END]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from clipfit.io import write_text

    args, passthrough = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    promises.LOADS = args.work / "loads.txt"
    sets = [id_test(args), heldout(args)]
    started = time.time()
    if not args.collect_only:
        todo = jobs(args, sets, passthrough)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: timed(args, *job), todo))
    results = collect(args, sets)
    if not any(seeds for by_row in results.values() for seeds in by_row.values()):
        sys.exit("no run finished: nothing to write")
    markdown = args.markdown.read_text(encoding="utf-8") if args.markdown.exists() else ""
    write_text(args.markdown, replace_section(markdown, section(args, results, sets), START, END))
    print(f"wrote {args.markdown} ({(time.time() - started) / 60:.1f} minutes)")


if __name__ == "__main__":
    main(sys.argv[1:])
