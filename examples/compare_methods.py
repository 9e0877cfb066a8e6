"""Compare post-training methods on the same pairs: validation R@1 and modality gap, before → after.

Each method is one `clipfit refine` run with the same model, data, split, seed and settings;
the numbers come from the run's own before/after evaluation on the held-out pairs.

    python examples/compare_methods.py ./pairs --model ViT-B-32 --pretrained openai
    python examples/compare_methods.py ./pairs --methods contrastive refine lite refine+lite -- --epochs 2 --lora

Arguments after `--` go to every `clipfit refine` call unchanged.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METRICS = (("image_to_text_R@1", "i→t R@1"), ("text_to_image_R@1", "t→i R@1"), ("modality_gap", "gap"))


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the script's own arguments, those after `--`, which go to every clipfit call unchanged)."""
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, passthrough = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", help="pairs folder (any layout clipfit reads)")
    parser.add_argument("--methods", nargs="+", default=["contrastive", "refine", "lite"])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="openai")
    parser.add_argument("--val-split", default="0.2", help="held-out fraction the numbers are measured on")
    parser.add_argument("--out", default="runs/compare", help="one run folder per method is made under this")
    return parser.parse_args(own), passthrough


def run_method(method: str, args: argparse.Namespace, passthrough: list[str]) -> dict:
    out = Path(args.out) / method.replace("+", "-")
    command = [sys.executable, "-m", "clipfit", "refine", args.pairs, "--method", method, "--model", args.model,
               "--pretrained", args.pretrained, "--val-split", args.val_split, "--out", str(out), "--overwrite",
               "--json", *passthrough]
    print(f"running {method} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method}: clipfit exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def table(results: dict[str, dict]) -> str:
    header = ["method", *(label for _, label in METRICS), "evaluated on"]
    rows = []
    for method, info in results.items():
        cells = [f"{info['before'][key]:.3f} → {info['after'][key]:.3f}" for key, _ in METRICS]
        rows.append([method, *cells, str(info.get("eval_split"))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str]) -> None:
    args, passthrough = parse_args(argv)
    results = {method: run_method(method, args, passthrough) for method in args.methods}
    print(table(results))
    print("\nR@1 in %, higher is better; gap = distance between image and text centroids, lower is narrower.")


if __name__ == "__main__":
    main(sys.argv[1:])
