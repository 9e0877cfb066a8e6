"""The README quickstart's main job, with its 20 per-epoch validations and without them.

    python benchmarks/quickstart.py [--repeats 3] [--baseline-src DIR] [--threads N] [--json out.json]

Runs the README's own `clipfit refine examples/pairs ...` command (read from README.md, as
examples/quickstart_seeds.py does) as a fresh process each time, and the same command with
`--eval-every 100000` (measured only before and after training), alternating, the order rotated
each repeat. The feature cache is warm: each checkout's cache folder is filled by one untimed run
first (install and a cold cache excluded, as the goal says). Wall seconds, CPU seconds (the
process and its DataLoader workers) and peak resident memory (run.json) per run.

Checks that every run's before and after numbers are the README's seed-0 column (the quickstart
table, at its printed digits), and prints a markdown table with min and median over the repeats,
then the two goals: per-epoch validation at most 1.3x the run without it, the main job at most
12 s (wall, median; meaningful on an idle machine only).

With --baseline-src DIR (another clipfit checkout, e.g. `git archive COMMIT | tar -x -C DIR`) both
commands also run with DIR's clipfit (its own warm cache), in the same rotation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
GOAL_RATIO, GOAL_SECONDS = 1.3, 12.0
VARIANTS = {"README command (20 per-epoch validations)": [], "with --eval-every 100000": ["--eval-every", "100000"]}


def environment(src: Path, threads: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def readme_args() -> list[str]:
    """The README's command with its pairs folder made absolute: every run starts in a folder of its
    own, so that `python -m clipfit` imports the checkout on PYTHONPATH, not one in the current folder."""
    from quickstart_seeds import readme_command

    return [str(REPO / word) if word == "examples/pairs" else word for word in readme_command()]


def run(src: Path, extra: list[str], out: Path, cache: Path, threads: int | None) -> dict:
    command = [sys.executable, "-m", "clipfit", *readme_args(), *extra, "--out", str(out), "--overwrite",
               "--cache-dir", str(cache), "--quiet"]
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    done = subprocess.run(command, cwd=out.parent, env=environment(src, threads), capture_output=True, text=True)
    seconds = {"wall": time.perf_counter() - started, "cpu": children_cpu_seconds() - cpu_started}
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:6])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    info = json.loads((out / "run.json").read_text())
    return {**seconds, "rss_mib": info["peak_memory"]["rss_mib"], "before": info["before"], "after": info["after"]}


def readme_seed0() -> dict[str, str]:
    """The quickstart table's seed-0 cells, by row label: '35 → 40'."""
    cells = {}
    for line in (REPO / "README.md").read_text().splitlines():
        match = re.match(r"\| (.+?) \| (\S+ → \S+) \|", line)
        if match:
            cells[match.group(1)] = match.group(2)
    return cells


def differences_from_readme(result: dict) -> list[str]:
    from quickstart_seeds import METRICS

    expected = readme_seed0()
    found = []
    for key, label, digits, _ in METRICS:
        cell = f"{result['before'][key]:.{digits}f} → {result['after'][key]:.{digits}f}"
        if expected.get(label) != cell:
            found.append(f"{label}: {cell}, README {expected.get(label)}")
    return found


def stats(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return min(values), statistics.median(values)


def table(results: dict[tuple[str, str], list[dict]]) -> list[str]:
    lines = ["| command | clipfit | repeats | wall s, min | wall s, median | CPU s, min | CPU s, median | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (variant, label), runs in results.items():
        (wall_min, wall_med), (cpu_min, cpu_med) = stats(runs, "wall"), stats(runs, "cpu")
        lines.append(f"| {variant} | {label} | {len(runs)} | {wall_min:.1f} | {wall_med:.1f} | {cpu_min:.1f} | "
                     f"{cpu_med:.1f} | {max(r['rss_mib'] for r in runs):.0f} |")
    lines.append("")
    with_eval, without = VARIANTS
    for label in sorted({label for _, label in results}, reverse=True):
        ratio = {clock: stats(results[with_eval, label], clock)[1] / stats(results[without, label], clock)[1]
                 for clock in ("wall", "cpu")}
        main_job = stats(results[with_eval, label], "wall")[1]
        lines.append(f"- {label}: per-epoch validation {ratio['wall']:.2f}x the run without (wall, median; CPU "
                     f"{ratio['cpu']:.2f}x; goal at most {GOAL_RATIO}x); the main job {main_job:.1f} s wall "
                     f"(median; goal at most {GOAL_SECONDS:.0f} s on the idle machine)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-src", type=Path, help="Another clipfit checkout to run side by side.")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every run (default: unset, as the README runs it).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipfit-quickstart-"))
    sources = {"this": REPO, **({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})}
    load = [os.getloadavg()]
    for label, src in sources.items():  # warm each checkout's feature cache (untimed)
        run(src, [], work / "warm", work / f"cache-{label}", args.threads)
    contenders = [(variant, label) for label in sources for variant in VARIANTS]
    results: dict[tuple[str, str], list[dict]] = {c: [] for c in contenders}
    for r in range(args.repeats):
        for variant, label in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            result = run(sources[label], VARIANTS[variant], work / "run", work / f"cache-{label}", args.threads)
            results[variant, label].append(result)
            print(f"  repeat {r + 1} {label}, {variant}: wall {result['wall']:.1f} s, CPU {result['cpu']:.1f} s",
                  file=sys.stderr, flush=True)
    load.append(os.getloadavg())
    differing = {f"{label}, {variant}, repeat {i + 1}": d for (variant, label), runs in results.items()
                 for i, run_ in enumerate(runs) for d in [differences_from_readme(run_)] if d}
    lines = table(results) + ["- numbers: " + ("every run gives the README's seed-0 column" if not differing else
                                                f"differ from the README's seed-0 column: {differing}"),
                              f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in load[0])}; "
                              f"after: {', '.join(f'{x:.1f}' for x in load[1])}; {os.cpu_count()} CPUs"]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"results": {f"{v} | {l}": r for (v, l), r in results.items()}, "load": load},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
