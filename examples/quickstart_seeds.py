"""Does the README's quickstart show the same effect whatever the seed? Runs the README's own command.

The command is read from README.md (the line with `clipfit refine examples/pairs`), so what is
measured is what a new user types; only `--seed` and `--out` change per run. The seed also picks
which half of the 40 example pairs is held out for validation. Prints a markdown table of each
seed's validation numbers before → after, and on how many seeds each got better, stayed, got worse.

    python examples/quickstart_seeds.py --work runs/quickstart-seeds            # seeds 0-4, one at a time
    python examples/quickstart_seeds.py --work runs/quickstart-seeds --collect-only
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run.json key, label, digits, the direction that counts as better
METRICS = (("image_to_text_R@1", "image → text R@1", 0, +1), ("text_to_image_R@1", "text → image R@1", 0, +1),
           ("retrieval/validation/text_retrieval_recall@5", "image → text R@5", 0, +1),
           ("retrieval/validation/image_retrieval_recall@5", "text → image R@5", 0, +1),
           ("clip_loss", "validation CLIP loss", 2, -1), ("modality_gap", "modality gap (L2 of normalised centroids)", 2, -1))


def readme_command() -> list[str]:
    """The quickstart's `clipfit refine …` arguments, without --out and --overwrite."""
    line = next(li for li in (REPO / "README.md").read_text().splitlines() if "clipfit refine examples/pairs" in li)
    words = shlex.split(line[line.index("clipfit refine"):])[1:]
    out = words.index("--out")
    return [w for w in words[:out] + words[out + 2:] if w != "--overwrite"]


def run(work: Path, seed: int, collect_only: bool) -> dict:
    out = work / f"seed{seed}"
    if (out / "run.json").is_file():
        return json.loads((out / "run.json").read_text())
    if collect_only:
        return {}
    cmd = [sys.executable, "-m", "clipfit", *readme_command(), "--seed", str(seed), "--out", str(out), "--overwrite",
           "--json"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    return json.loads((out / "run.json").read_text()) if done.returncode == 0 else {}


def table(runs: dict[int, dict]) -> list[str]:
    seeds = [s for s, r in runs.items() if r]
    lines = ["| validation (20 pairs) | " + " | ".join(f"seed {s}" for s in seeds) + " | better / same / worse |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for key, label, digits, better in METRICS:
        cells, moved = [], [0, 0, 0]
        for s in seeds:
            before, after = runs[s]["before"][key], runs[s]["after"][key]
            cells.append(f"{before:.{digits}f} → {after:.{digits}f}")
            change = (after - before) * better
            moved[0 if change > 1e-9 else 2 if change < -1e-9 else 1] += 1
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {' / '.join(map(str, moved))} |")
    walls = [runs[s]["wall_seconds"] for s in seeds]
    lines += ["", f"Wall time per run: {statistics.mean(walls):.0f} s (mean; {min(walls):.0f}–{max(walls):.0f} s).",
              f"Command: `clipfit {shlex.join(readme_command())} --seed SEED --out … --overwrite`"]
    return lines


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quickstart-seeds")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--collect-only", action="store_true", help="start no run; tabulate the finished ones")
    args = parser.parse_args(argv)
    print("\n".join(table({s: run(args.work, s, args.collect_only) for s in args.seeds})))


if __name__ == "__main__":
    main(sys.argv[1:])
