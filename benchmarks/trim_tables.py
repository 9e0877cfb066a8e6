"""Markdown tables for docs/performance.md from the JSON of eval_speed.py and throughput.py.

    python benchmarks/trim_tables.py --eval eval.json --train train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

GOAL = 2.0


def verdict(ratio: float, goal: float = GOAL) -> str:
    return f"**met** ({ratio:.2f}× ≥ {goal:g}×)" if ratio >= goal else f"**not met** ({ratio:.2f}× < {goal:g}×)"


def eval_tables(report: dict) -> list[str]:
    lines = ["| model / task | clock | clipfit s (runs) | CLIP_benchmark s (runs) | clipfit faster | largest metric difference | goal ≥ 2× |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report.get("vs_clip_benchmark", {}).items():
        for clock in ("cpu", "wall"):
            runs = {label: ", ".join(f"{s[clock]:.1f}" for s in seconds) for label, seconds in row["all_seconds"].items()}
            lines.append(f"| {name} | {clock} | {row[clock]['clipfit']:.1f} ({runs['clipfit']}) | "
                         f"{row[clock]['CLIP_benchmark']:.1f} ({runs['CLIP_benchmark']}) | {row[f'speedup_{clock}']:.2f}× | "
                         f"{row['largest_difference']:.2g} | {verdict(row[f'speedup_{clock}'])} |")
    lines += ["", "| model / task | metric | clipfit | CLIP_benchmark |", "|---|---|---|---|"]
    for name, row in report.get("vs_clip_benchmark", {}).items():
        for metric, value in row["clipfit"].items():
            lines.append(f"| {name} | {metric} | {value:.6f} | {row['CLIP_benchmark'][metric]:.6f} |")
    build = report.get("imagenet_classifier")
    if build:
        lines += ["", "| ImageNet classifier, starter | measured "
                  f"({build['classes_measured']} classes × {build['templates']} templates) | scaled to 1,000 classes |",
                  "|---|---|---|",
                  f"| padded to 77 tokens (clipfit 0.1.0) | {build['padded_s']:.1f} s | {build['padded_s_1000_classes'] / 60:.1f} min |",
                  f"| trimmed, shortest first | {build['trimmed_s']:.1f} s | {build['trimmed_s_1000_classes'] / 60:.1f} min |",
                  f"| from the feature cache | {build['cache_hit_s'] * 1000:.0f} ms | (1,000 rows: a file read) |",
                  "", f"Trimmed / padded: {build['speedup']:.1f}× faster; largest difference between the two "
                  f"classifiers {build['largest_difference']:.2g}; the cached rows are bit-identical: "
                  f"{build['cache_identical']}."]
    return lines


def rates(runs: list[dict]) -> str:
    return ", ".join(f"{r['pairs_per_s']:.1f}" for r in runs)


def train_tables(report: dict) -> list[str]:
    lines = []
    real = report.get("real_captions", {})
    if real:
        lines += ["| model (context 77, captions 8-25 tokens) | clipfit contrastive pairs/s (runs) | "
                  "open_clip_train pairs/s (runs) | ratio | goal ≥ 2× |", "|---|---|---|---|---|"]
        for name, row in real.items():
            ours, theirs = row["runs"]["clipfit contrastive"], row["runs"]["open_clip_train"]
            lines.append(f"| {name} | {statistics.median(r['pairs_per_s'] for r in ours):.1f} ({rates(ours)}) | "
                         f"{statistics.median(r['pairs_per_s'] for r in theirs):.1f} ({rates(theirs)}) | "
                         f"{row['ratio']:.2f}× | {verdict(row['ratio'])} |")
        for name, row in real.items():
            buckets = row["runs"].get("clipfit --length-buckets")
            if buckets:
                rate = statistics.median(r["pairs_per_s"] for r in buckets)
                plain = statistics.median(r["pairs_per_s"] for r in row["runs"]["clipfit contrastive"])
                lines.append(f"\n{name}, clipfit --length-buckets: {rate:.1f} pairs/s ({rates(buckets)}), "
                             f"{rate / plain:.2f}× clipfit without it.")
    locked = report.get("lock_image")
    if locked:
        lines += ["", "| lite0-minilm --lock-image | pairs/s median (runs) | training s median | wall s median |",
                  "|---|---|---|---|"]
        for label, runs in locked["runs"].items():
            lines.append(f"| {label} | {locked['pairs_per_s'][label]:.1f} ({rates(runs)}) | "
                         f"{statistics.median(r['train_s'] for r in runs):.1f} | "
                         f"{statistics.median(r['wall_s'] for r in runs):.1f} |")
        values = list(locked["pairs_per_s"].values())
        if len(values) == 2:
            lines += ["", f"After / before: {values[0] / values[1]:.2f}× the pairs/s."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=Path)
    parser.add_argument("--train", type=Path)
    args = parser.parse_args()
    lines = []
    if args.eval:
        lines += eval_tables(json.loads(args.eval.read_text())) + [""]
    if args.train:
        lines += train_tables(json.loads(args.train.read_text()))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
