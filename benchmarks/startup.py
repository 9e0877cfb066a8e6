"""Start-up: time from `clipfit refine` to its first training step, and `clipfit eval retrieval` end to end.

    python benchmarks/startup.py --retrieval PAIRS [--baseline-src DIR] [--repeats 3] [--threads N]

1. Time to first step: the README quickstart's command (read from README.md), with a feature cache
   warmed by one untimed run, from process start until metrics.jsonl holds step 1's row (the
   file is polled every 10 ms); wall seconds, and CPU seconds of the process and its children
   at that moment (from /proc, Linux). The run is then stopped (SIGTERM) and not timed further.
2. `clipfit eval retrieval PAIRS --model STARTER_RUN --json`: a fresh process, end to end (imports,
   model loading, data check, decoding, encoding, metrics); STARTER_RUN is the starter saved as
   a run folder, as benchmarks/eval_speed.py does. PAIRS: e.g. the first 150 held-out emoji
   pairs of examples/datasets/emoji.py.

With --baseline-src DIR (another clipfit checkout, e.g. `git archive COMMIT | tar -x -C DIR`) each
measurement also runs with DIR's clipfit, alternating with this one (order rotated each repeat).
Prints a markdown table with min and median over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))
TICKS = os.sysconf("SC_CLK_TCK")


def environment(src: Path, threads: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def process_cpu_seconds(pid: int) -> float:
    """utime + stime + children's (waited-for) of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


def first_step(src: Path, work: Path, cache: Path, threads: int | None, label: str) -> dict:
    from quickstart import readme_args

    out = work / f"first-step-{label}"
    command = [sys.executable, "-m", "clipfit", *readme_args(), "--out", str(out), "--overwrite",
               "--cache-dir", str(cache), "--quiet"]
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=out.parent, env=environment(src, threads), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    cpu = 0.0
    while not (metrics.is_file() and metrics.read_text().strip()):
        if process.poll() is not None:
            raise SystemExit(f"{label}: refine ended ({process.returncode}) before its first step:\n{process.stderr.read()[-3000:]}")
        cpu = process_cpu_seconds(process.pid)
        time.sleep(0.01)
    seconds = {"wall": time.perf_counter() - started, "cpu": cpu}
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=600)
    return seconds


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def eval_retrieval(src: Path, pairs: Path, model: Path, threads: int | None) -> dict:
    command = [sys.executable, "-m", "clipfit", "eval", "retrieval", str(pairs), "--model", str(model), "--device",
               "cpu", "--json"]
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True, env=environment(src, threads), cwd=model.parent)
    seconds = {"wall": time.perf_counter() - started, "cpu": children_cpu_seconds() - cpu_started}
    if done.returncode != 0:
        raise SystemExit(f"clipfit eval retrieval failed ({done.returncode}):\n{done.stderr[-3000:]}")
    seconds["metrics"] = json.loads(done.stdout)["metrics"]
    return seconds


def summary(runs: list[dict], clock: str) -> tuple[float, float]:
    values = [r[clock] for r in runs]
    return min(values), statistics.median(values)


def table(results: dict[str, dict[str, list[dict]]]) -> list[str]:
    lines = ["| measurement | clipfit | repeats | wall s, min | wall s, median | CPU s, min | CPU s, median |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for measurement, sources in results.items():
        for label, runs in sources.items():
            (wall_min, wall_med), (cpu_min, cpu_med) = summary(runs, "wall"), summary(runs, "cpu")
            lines.append(f"| {measurement} | {label} | {len(runs)} | {wall_min:.1f} | {wall_med:.1f} | {cpu_min:.1f} | "
                         f"{cpu_med:.1f} |")
    for measurement, sources in results.items():
        if "baseline" in sources:
            ratio = {clock: summary(sources["baseline"], clock)[1] / summary(sources["this"], clock)[1]
                     for clock in ("wall", "cpu")}
            lines.append(f"\n{measurement}: this checkout takes 1/{ratio['wall']:.2f} of the baseline's median wall time, "
                         f"1/{ratio['cpu']:.2f} of its CPU time (goal: at most half, 1/2.00).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrieval", type=Path, help="A pairs folder for `clipfit eval retrieval` (skipped without).")
    parser.add_argument("--baseline-src", type=Path, help="Another clipfit checkout to race against.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every process (default: unset, as a user runs).")
    parser.add_argument("--skip-first-step", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipfit-startup-"))
    sources = {"this": REPO, **({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})}
    results: dict[str, dict[str, list[dict]]] = {}
    load = [os.getloadavg()]
    if not args.skip_first_step:
        caches = {label: work / f"cache-{label}" for label in sources}
        for label, src in sources.items():  # warm each checkout's feature cache (untimed)
            first_step(src, work, caches[label], args.threads, label)
        results["refine: to the first step (warm cache)"] = race(
            sources, args.repeats, lambda label, src: first_step(src, work, caches[label], args.threads, label))
    if args.retrieval:
        from eval_speed import save_models

        model = save_models(work, ["starter"])["starter"]
        results[f"eval retrieval: {args.retrieval.name}, end to end"] = race(
            sources, args.repeats, lambda label, src: eval_retrieval(src, args.retrieval, model, args.threads))
        check_same_metrics(results[f"eval retrieval: {args.retrieval.name}, end to end"])
    load.append(os.getloadavg())
    lines = table(results) + [f"\nLoad average (1, 5, 15 min) before: {load[0][0]:.1f}, {load[0][1]:.1f}, {load[0][2]:.1f}; "
                              f"after: {load[1][0]:.1f}, {load[1][1]:.1f}, {load[1][2]:.1f}; {os.cpu_count()} CPUs."]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "load": load}, indent=2) + "\n")


def race(sources: dict[str, Path], repeats: int, measure) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {label: [] for label in sources}
    labels = list(sources)
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            runs[label].append(measure(label, sources[label]))
            print(f"  repeat {r + 1} {label}: wall {runs[label][-1]['wall']:.1f} s, CPU {runs[label][-1]['cpu']:.1f} s",
                  file=sys.stderr, flush=True)
    return runs


def check_same_metrics(sources: dict[str, list[dict]]) -> None:
    """Every run of every checkout gives the same retrieval metrics (to 1e-6)."""
    reference = next(iter(sources.values()))[0]["metrics"]
    for label, runs in sources.items():
        for run in runs:
            worst = max(abs(run["metrics"][k] - reference[k]) for k in reference if isinstance(reference[k], float))
            if worst > 1e-6:
                raise SystemExit(f"{label}: retrieval metrics differ by {worst:.2g}")


if __name__ == "__main__":
    main()
