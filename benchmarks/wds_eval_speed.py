"""A shard set in CLIP_benchmark's layout through clipfit and through CLIP_benchmark, side by side:
images/s and peak memory, with identical numbers.

    python benchmarks/wds_eval_speed.py --clip-benchmark DIR [--images 10000] [--per-shard 10000]
        [--format jpg] [--workers 2] [--batch-size 64] [--threads 0] [--repeats 1] [--json out.json]

The set is written from the pictures of examples/pairs (benchmarks/wds_sets.py): --images
images (the pictures and seeded variants of them, about 250 pixels a side, 40 classes, the set's
own five templates) in shards of --per-shard (CLIP_benchmark's exporter writes 10,000 a shard,
so 10,000 images are one shard). The model is the starter with its aligned weights, saved as a
run folder both load (benchmarks/eval_speed.py). Each evaluator runs as one fresh process, timed
end to end (imports, model loading, reading and decoding the shards, encoding, metrics):

  clipfit         `clipfit eval zeroshot wds/speed --data DIR --model RUN --json`, feature cache empty
  clipfit, cached the same command again: the feature cache holds the set's embeddings
  CLIP_benchmark  its own code path for `clip_benchmark eval --dataset wds/speed` with amp off
                  (benchmarks/clip_benchmark_eval.py, task wds)

Both get the same --batch-size and OMP_NUM_THREADS (--threads; 0 leaves torch's default, every
core), and --workers DataLoader workers, CLIP_benchmark at most one per shard: with webdataset 1.0
a worker without a shard stops its run ("No samples found in dataset; perhaps you have fewer
shards than workers"), so on a one-shard set it decodes in one worker, where clipfit's workers
share the shard sample by sample. Peak memory is the largest total resident memory of the process and its
DataLoader workers (PSS: pages a forked worker shares with its parent count once), sampled every
100 ms (psutil); CPU seconds are those of the process and its workers. The repeats alternate the order. The last
lines are a markdown table for docs/performance.md; top-1, top-5 and mean per-class recall must
agree (the same counts, within 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import wds_sets  # noqa: E402
from eval_speed import save_models  # noqa: E402
from wds_crosscheck import hub_config_cache  # noqa: E402

NAME = "wds/speed"
SAMPLE_SECONDS = 0.1
KEYS = ("acc1", "acc5", "mean_per_class_recall")


def environment(threads: int, extra_path: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(extra_path or ""), env.get("PYTHONPATH", "")) if p)
    return env


def tree_memory(process) -> int:
    """Proportional resident bytes (PSS) of a process and all its descendants: pages forked
    DataLoader workers share with their parent count once, not once per process (0 once it has ended)."""
    import psutil

    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:  # it has ended
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_full_info().pss
        except psutil.Error:  # ended between the listing and the reading
            pass
    return total


def measured(command: list[str], env: dict) -> dict:
    """Run `command`: its JSON output, wall seconds, CPU seconds (it and its workers) and peak memory."""
    import psutil

    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watched, peak, done = psutil.Process(child.pid), [0], threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            peak[0] = max(peak[0], tree_memory(watched))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = child.communicate()
    done.set()
    sampler.join()
    wall, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu_started
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({child.returncode}):\n{err[-3000:]}")
    return {"output": json.loads(out), "wall_s": wall, "cpu_s": cpu, "peak_bytes": peak[0]}


def children_cpu_seconds() -> float:
    """User and system seconds of the ended children, their own ended children (workers) included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def clipfit_command(args, root: Path, model: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "clipfit", "eval", "zeroshot", NAME, "--data", str(root), "--model", str(model),
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", "cpu", "--json",
            "--quiet", "--cache-dir", str(cache)]


def shards(args) -> int:
    return -(-args.images // args.per_shard)


def clip_benchmark_command(args, work: Path, root: Path, model: Path) -> list[str]:
    spec = work / "spec-speed.json"
    spec.write_text(json.dumps({"task": "wds", "wds_task": "zeroshot_classification", "dataset": NAME, "root": str(root),
                                "model": str(model), "batch_size": args.batch_size,
                                "workers": min(args.workers, shards(args))}))
    return [sys.executable, str(REPO / "benchmarks" / "clip_benchmark_eval.py"), str(spec)]


def run_all(args, work: Path, root: Path, model: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"clipfit": [], "clipfit, cached": [], "CLIP_benchmark": []}
    for repeat in range(args.repeats):
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
        order = ["clipfit", "CLIP_benchmark"] if repeat % 2 == 0 else ["CLIP_benchmark", "clipfit"]
        for label in order:
            if label == "clipfit":
                runs[label].append(measured(clipfit_command(args, root, model, cache), environment(args.threads, None)))
                runs["clipfit, cached"].append(measured(clipfit_command(args, root, model, cache),
                                                        environment(args.threads, None)))
            else:
                runs[label].append(measured(clip_benchmark_command(args, work, root, model),
                                            environment(args.threads, args.clip_benchmark)))
            print(f"  repeat {repeat + 1}: {label:<15} {runs[label][-1]['wall_s']:7.1f} s", flush=True)
    return runs


def metrics_of(run: dict) -> dict:
    output = run["output"]
    return output.get("metrics", output)


def agreement(runs: dict[str, list[dict]], images: int) -> tuple[bool, float]:
    ours, theirs = metrics_of(runs["clipfit"][0]), metrics_of(runs["CLIP_benchmark"][0])
    cached = metrics_of(runs["clipfit, cached"][0])
    differences = [abs(ours[k] - theirs[k]) for k in KEYS] + [abs(ours[k] - cached[k]) for k in KEYS]
    same_counts = all(round(ours[k] * images) == round(theirs[k] * images) for k in KEYS)
    return same_counts and max(differences) <= 1e-6, max(differences)


def table(runs: dict[str, list[dict]], images: int, identical: bool) -> list[str]:
    base = {clock: statistics.median(r[clock] for r in runs["CLIP_benchmark"]) for clock in ("wall_s", "cpu_s")}
    lines = ["| evaluator | wall s | images/s | × CLIP_benchmark (wall) | CPU s | × CLIP_benchmark (CPU) | "
             "peak memory (PSS), MiB | top-1 | top-5 | mean per-class recall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, measured_runs in runs.items():
        wall, cpu = (statistics.median(r[clock] for r in measured_runs) for clock in ("wall_s", "cpu_s"))
        peak = max(r["peak_bytes"] for r in measured_runs) / 2**20
        m = metrics_of(measured_runs[0])
        lines.append(f"| {label} | {wall:.1f} | {images / wall:.1f} | {base['wall_s'] / wall:.2f} | {cpu:.1f} | "
                     f"{base['cpu_s'] / cpu:.2f} | {peak:.0f} | {100 * m['acc1']:.2f}% | {100 * m['acc5']:.2f}% | "
                     f"{100 * m['mean_per_class_recall']:.2f}% |")
    lines.append("")
    lines.append(f"Numbers identical (the same counts, within 1e-6): {'yes' if identical else 'NO'}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-benchmark", type=Path, required=True, help="A folder holding clip_benchmark==1.6.2.")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--format", choices=wds_sets.FORMATS, default="jpg")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every process (0: torch's default).")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipfit-wds-speed-"))
    started = time.perf_counter()
    root = wds_sets.write_classification(work / "speed", args.images, args.per_shard, formats=(args.format,))
    print(f"wrote {args.images} images in {shards(args)} shard(s) in {time.perf_counter() - started:.0f} s", flush=True)
    models = save_models(work, ["starter"])
    hub_config_cache(work, models)
    load_before = os.getloadavg()
    runs = run_all(args, work, root, models["starter"])
    identical, largest = agreement(runs, args.images)
    lines = table(runs, args.images, identical)
    setting = (f"{args.images} images ({args.format}, {shards(args)} shard(s)), starter, batch {args.batch_size}, "
               f"workers: clipfit {args.workers}, CLIP_benchmark {min(args.workers, shards(args))}, "
               f"OMP_NUM_THREADS {args.threads or 'unset'}, {os.cpu_count()} CPUs, "
               f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
               f"largest metric difference {largest:.2g}")
    print("\n".join(["", setting, "", *lines]))
    if args.json:
        args.json.write_text(json.dumps({"setting": setting, "identical": identical, "largest_difference": largest,
                                         "runs": {k: [{**r, "output": metrics_of(r)} for r in v] for k, v in runs.items()},
                                         "table": lines}, indent=2) + "\n")


if __name__ == "__main__":
    main()
