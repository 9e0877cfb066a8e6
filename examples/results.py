"""Regenerate docs/results.md: each method post-trains the offline starter model, before → after.

Every method (and one composition) is one `clipfit refine` run of `--model lite0-minilm` (the
aligned starter weights) on a target pairs set the starter was not aligned on: the emoji
`heldout/` split. Every run has the same seed, split and settings. Reported per method:
retrieval R@1 both ways on the run's own validation part of the target set, zero-shot top-1 on
held-out Fashion-MNIST (a seeded, per-class balanced subset of symlinks made in --work), the
modality gap on the validation part, and wall time.

The data come from the public-data builders (each script's header says what to install); the
starter's recipe, examples/align_starter.py, builds the same folders under the same root:

    python examples/datasets/emoji.py ~/.cache/clipfit/starter-align/emoji
    python examples/datasets/fashion_mnist.py ~/.cache/clipfit/starter-align/fashion-mnist
    python examples/datasets/imagenet_samples.py ~/.cache/clipfit/starter-align/imagenet-samples  # --imagenet only

Then, from the repository root (about 6 minutes a run on 2 shared CPU cores; longer for ping and dclip):

    python examples/results.py                      # writes docs/results.md
    python examples/results.py --pretrained none --methods refine --out /tmp/results.md -- --max-steps 2

Arguments after `--` go to every `clipfit refine` call unchanged.
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import run_method  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path.home() / ".cache" / "clipfit" / "starter-align"
TARGET = Path("emoji") / "heldout"
ZEROSHOT = "fashion-mnist"
METHODS = ("contrastive", "refine", "lite", "refine+lite", "ping", "dclip")
SEED = 0
SETTINGS = {  # shared by every run; everything else is clipfit's default
    "epochs": "1", "batch-size": "32", "lr": "1e-5", "seed": str(SEED), "dclip-teacher-epochs": "2",
    "lock-image": None, "workers": "0", "cache-images": None,
}
RETRIEVAL = (("image_to_text_R@1", "i→t R@1"), ("text_to_image_R@1", "t→i R@1"))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the root the data builders wrote into")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "results", help="run folders and subsets")
    parser.add_argument("--out", dest="markdown", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--model", default="lite0-minilm")
    parser.add_argument("--pretrained", default="aligned", help="'none' (random projections) only to debug")
    parser.add_argument("--val-split", default="0.3", help="part of the target set the retrieval numbers use")
    parser.add_argument("--zeroshot-per-class", type=int, default=10, help="Fashion-MNIST images per class")
    parser.add_argument("--imagenet", action="store_true", help="also the 20 ImageNet samples (a smoke test)")
    parser.add_argument("--reuse", action="store_true", help="rewrite the markdown from --work's runs")
    args = parser.parse_args(own)
    args.pairs, args.out = str(args.data / TARGET), args.work  # what compare_methods.run_method reads
    return args, passthrough


def flags(settings: dict[str, str | None]) -> list[str]:
    out = []
    for name, value in settings.items():
        out += [f"--{name}"] + ([value] if value is not None else [])
    return out


def balanced_subset(source: Path, target: Path, per_class: int, seed: int) -> Path:
    """A folder of symlinks: `per_class` seeded picks from every class folder of `source`."""
    shutil.rmtree(target, ignore_errors=True)
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        (target / class_dir.name).mkdir(parents=True)
        for image in random.Random(f"{seed}/{class_dir.name}").sample(files, min(per_class, len(files))):
            (target / class_dir.name / image.name).symlink_to(image.resolve())
    return target


def count_images(folder: Path) -> int:
    return sum(1 for class_dir in folder.iterdir() if class_dir.is_dir() for p in class_dir.iterdir() if p.is_file())


def zeroshot_sets(args: argparse.Namespace) -> dict[str, str]:
    """run.json group name → --eval-zeroshot spec."""
    subset = args.work / f"{ZEROSHOT}-{args.zeroshot_per_class}-per-class"
    if not args.reuse:  # the runs being reused were evaluated on the folder as it is
        balanced_subset(args.data / ZEROSHOT, subset, args.zeroshot_per_class, SEED)
    sets = {subset.name: f"folder={subset}"}
    if args.imagenet:
        sets["imagenet"] = f"imagenet={args.data / 'imagenet-samples'}"
    return sets


def refine_flags(args: argparse.Namespace, zeroshot: dict[str, str], passthrough: list[str]) -> list[str]:
    settings = {**SETTINGS, "cache-dir": str(args.work / "cache")}  # a fresh cache: timings include filling it
    return [*flags(settings), *(x for spec in zeroshot.values() for x in ("--eval-zeroshot", spec)), *passthrough]


def run_all(args: argparse.Namespace, zeroshot: dict[str, str], passthrough: list[str]) -> dict[str, dict]:
    from clipfit.eval.compare import read_run

    if args.reuse:
        return {method: read_run(args.work / method.replace("+", "-")) for method in args.methods}
    shutil.rmtree(args.work / "cache", ignore_errors=True)
    extra = refine_flags(args, zeroshot, passthrough)
    return {method: read_run(Path(run_method(method, args, extra)["run_dir"])) for method in args.methods}


def zeroshot_keys(run: dict) -> list[str]:
    return sorted(k for k in run["after"] if k.startswith("zeroshot/") and k.endswith("/acc1"))


def set_name(key: str) -> str:
    return key.split("/")[1]


def arrow(run: dict, key: str, digits: int = 1) -> str:
    return f"{run['before'][key]:.{digits}f} → {run['after'][key]:.{digits}f}"


def table(runs: dict[str, dict]) -> str:
    zeroshot = zeroshot_keys(next(iter(runs.values())))
    header = ["method", *(label for _, label in RETRIEVAL), *(f"{set_name(k)} top-1" for k in zeroshot),
              "modality gap", "train s", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, run in runs.items():
        cells = [f"`{method}`", *(arrow(run, key) for key, _ in RETRIEVAL), *(arrow(run, key) for key in zeroshot),
                 arrow(run, "modality_gap", 3), f"{run['train_seconds']:.0f}", f"{run['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise(rate: float, n: int) -> float:
    """Two binomial standard errors of a rate in points over n items, and at least one item."""
    return max(2 * math.sqrt(rate * (100 - rate) / n), 100 / n)


def is_clear(run: dict, key: str, n: int) -> bool:
    return abs(run["after"][key] - run["before"][key]) > noise(run["before"][key], n)


def change(run: dict, key: str, n: int) -> str:
    delta = run["after"][key] - run["before"][key]
    if not is_clear(run, key, n):
        return f"no clear change ({delta:+.1f})"
    return f"a clear {'rise' if delta > 0 else 'fall'} ({delta:+.1f})"


def gap_change(run: dict) -> str:
    before, after = run["before"]["modality_gap"], run["after"]["modality_gap"]
    word = "narrowed" if after < before else "widened"
    return f"gap {word} {before:.3f} → {after:.3f} ({(after - before) / before:+.1%})"


def sample_sizes(runs: dict[str, dict], zeroshot: dict[str, str]) -> dict[str, int]:
    """Items behind each rate: 'validation' pairs for R@1, images for each zero-shot key."""
    first = next(iter(runs.values()))
    counts = {name: count_images(Path(spec.partition("=")[2])) for name, spec in zeroshot.items()}
    return {"validation": first["resolved"]["val_pairs"], **{k: counts[set_name(k)] for k in zeroshot_keys(first)}}


def method_reading(method: str, run: dict, sizes: dict[str, int]) -> str:
    retrieval = [f"{label} {change(run, key, sizes['validation'])}" for key, label in RETRIEVAL]
    zeroshot = [f"{set_name(k)} top-1 {change(run, k, sizes[k])}" for k in zeroshot_keys(run)]
    return f"- `{method}`: " + "; ".join([*retrieval, *zeroshot, gap_change(run)]) + "."


def forgets(run: dict, key: str, n: int) -> bool:
    return is_clear(run, key, n) and run["after"][key] < run["before"][key]


def refine_verdict(runs: dict[str, dict], sizes: dict[str, int]) -> str:
    """CLIP-Refine's claim: the gap narrows and zero-shot is kept, where contrastive forgets."""
    if not {"contrastive", "refine"} <= runs.keys():
        return "The refine-versus-contrastive question needs both runs; this table lacks one."
    key = zeroshot_keys(runs["refine"])[0]
    refine, contrastive = runs["refine"], runs["contrastive"]
    narrows = refine["after"]["modality_gap"] < refine["before"]["modality_gap"]
    keeps, baseline_forgets = not forgets(refine, key, sizes[key]), forgets(contrastive, key, sizes[key])
    parts = [f"contrastive {'forgot' if baseline_forgets else 'did not clearly forget'} "
             f"({set_name(key)} top-1 {arrow(contrastive, key)})",
             f"refine {'narrowed' if narrows else 'did not narrow'} the gap ({arrow(refine, 'modality_gap', 3)}) "
             f"and {'kept' if keeps else 'lost'} zero-shot ({arrow(refine, key)})"]
    if narrows and keeps and baseline_forgets:
        claim = "These numbers agree with CLIP-Refine's claim."
    elif narrows and keeps:
        claim = ("Refine behaves as claimed, but contrastive does not forget at this scale either, so the run "
                 "cannot show refine's advantage over it.")
    else:
        claim = "These numbers do not show CLIP-Refine's claim at this scale."
    return f"At this scale, {parts[0]}; {parts[1]}. {claim}"


def reading(runs: dict[str, dict], sizes: dict[str, int]) -> str:
    rule = (f"R@1 is measured on {sizes['validation']} validation pairs, zero-shot top-1 on "
            + ", ".join(f"{n} images ({set_name(k)})" for k, n in sizes.items() if k != "validation")
            + ". A change is called clear when it exceeds two binomial standard errors of the before value "
              "(and at least one item); anything smaller is within what one seed and this many items can tell.")
    methods = [method_reading(m, r, sizes) for m, r in runs.items()]
    return "\n".join([refine_verdict(runs, sizes), "", rule, "", *methods])


def command_line(run: dict) -> str:
    return "python -m clipfit " + shlex.join(run["argv"]).replace(f"{REPO}/", "")


def machine(run: dict) -> str:
    import os

    import torch

    env = run["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return (f"{cpu_name()}, {os.cpu_count()} cores visible (shared with other jobs), {torch.get_num_threads()} "
            f"torch threads, device `{run['resolved']['device']}`; Python {env['python']}, {versions}")


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown CPU"


def header(args: argparse.Namespace, runs: dict[str, dict], sizes: dict[str, int]) -> str:
    first = next(iter(runs.values()))
    resolved = first["resolved"]
    data = (f"target `{TARGET}` under `--data` ({resolved['train_pairs']} training + {resolved['val_pairs']} "
            f"validation pairs, `--val-split {args.val_split}`; the starter was aligned on the emoji `align/` "
            f"split and openclipart, never on these); zero-shot on "
            + ", ".join(f"`{set_name(k)}` ({n} images)" for k, n in sizes.items() if k != "validation"))
    script = "python examples/results.py " + shlex.join(a for a in sys.argv[1:] if a != "--reuse")
    minutes = sum(run["wall_seconds"] for run in runs.values()) / 60
    return "\n".join([
        "# Results: each method on the offline starter model",
        "",
        f"Generated by `{script.strip()}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; the runs took "
        f"{minutes:.1f} minutes together. Edit the script, not this file.",
        "",
        f"- **Model**: `--model {args.model} --pretrained {args.pretrained}` (docs/starter-model.md).",
        f"- **Data**: {data}. The Fashion-MNIST subset is {args.zeroshot_per_class} images per class, picked "
        f"with seed {SEED} from the builder's 1000-image test folder; every run evaluates it before and after.",
        "- **Scale**: cut down for 2 shared CPU cores (the aim was about 25 minutes for all runs): "
        f"{first['steps']} optimiser steps per run "
        "and a zero-shot subset; the reading says which changes exceed their noise.",
        f"- **Seed**: {SEED} for every run (data order, split, random draws). Settings shared by every run: "
        f"`{shlex.join(flags(SETTINGS))}`: the image trunk is frozen (its projection trains; its backward "
        "pass would cost most of the time on CPU), the text tower and logit scale train in full; clipfit's other "
        "defaults (AdamW, weight decay 0.1, constant lr, fp32).",
        f"- **Machine**: {machine(first)}.",
        "",
        "Commands (one `clipfit refine` run per method):",
        "",
        "```bash",
        *(command_line(run) for run in runs.values()),
        "```",
    ])


def document(args: argparse.Namespace, runs: dict[str, dict], sizes: dict[str, int]) -> str:
    legend = ("R@1 and top-1 in %, higher is better; modality gap = ‖mean image − mean text embedding‖ on the "
              "validation pairs, lower is narrower; train s = training loop only, wall s = the whole run "
              "(loading, feature banks or teachers, before and after evaluation).")
    missing = [f"`{m}`" for m in METHODS if m not in runs]
    partial = [f"> Partial table: no runs of {', '.join(missing)} yet.", ""] if missing else []
    return "\n".join([header(args, runs, sizes), "", "## Before → after", "", *partial, table(runs), "", legend,
                      "", "## Reading", "", reading(runs, sizes), ""])


def kept_sections(markdown: Path) -> str:
    """Sections other scripts write into the same file (examples/selection_results.py), kept as they are."""
    start, end = "<!-- selection-results:start -->", "<!-- selection-results:end -->"
    text = markdown.read_text(encoding="utf-8") if markdown.exists() else ""
    if start not in text or end not in text:
        return ""
    return "\n" + start + text.split(start, 1)[1].split(end, 1)[0] + end + "\n"


def main(argv: list[str]) -> None:
    from clipfit.io import write_text

    args, passthrough = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    zeroshot = zeroshot_sets(args)
    runs = run_all(args, zeroshot, passthrough)
    sizes = sample_sizes(runs, zeroshot)
    write_text(args.markdown, document(args, runs, sizes) + kept_sections(args.markdown))
    print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main(sys.argv[1:])
