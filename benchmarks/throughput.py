"""Training throughput: clipfit against open_clip's own trainer, and each method against contrastive.

    python benchmarks/throughput.py [--repeats 3] [--steps 20] [--batch-size 32] [--workers 1]

Both trainers get the same random-init model (a reduced ViT, below), batch size, precision,
steps, DataLoader workers and data (generated JPEGs, as a sidecar folder for clipfit and a CSV
for `python -m open_clip_train.main`). Contenders run alternately, in a rotating order, and
the medians over repeats are compared, because a shared machine's load drifts during a run.

What is compared is the median per-step training throughput (pairs/s) each trainer logs for
every step after the first two (warm-up): both measure the time from one step's end to the
next, data waiting included. Wall time per process (start-up, data check, evaluation) is
printed too but is not the comparison. clipfit runs with --augment here because open_clip's
trainer always applies its training augmentation.

Methods are whatever clipfit.methods.REGISTRY holds at run time, run with clipfit's defaults
(no augmentation, so a frozen teacher's features are precomputed once).

The real-caption case (`--real-captions`) gives every pair a caption of a typical length (8-25
CLIP tokens, drawn evenly) instead of the short fixed one, and races clipfit against open_clip's
trainer on two models whose context is 77: the reduced ViT above, and the offline starter
`lite0-minilm` (open_clip's trainer gets it as a `local-dir:` config pointing at the same
installed MiniLM folder). `--lock-image-pairs PAIRS --baseline-src DIR` trains the starter with
--lock-image on a real pairs folder with this checkout and with an older one (DIR, e.g. the
release before sequence trimming, unpacked with `git archive`), alternately.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODEL_CFG = {  # a reduced ViT-B/32: same structure, small enough for a CPU benchmark
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
LOCKED_MODEL_CFG = {  # the starter's shape, small: a timm EfficientNet-Lite0 trunk with a projection head
    "embed_dim": 128,
    "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                   "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
VIT_77_CFG = {**MODEL_CFG, "text_cfg": {**MODEL_CFG["text_cfg"], "context_length": 77}}
WARMUP_STEPS = 2
CAPTION_TOKENS = (8, 25)  # typical captions, start and end tokens included
WORDS = ("a photo of the small red old dog cat car boat house tree man woman child bird horse bike street "
         "table chair window door sky field river road city park beach snow grass water light sitting standing "
         "running near under next to with on in at and two three large white black green blue wooden").split()
OPEN_CLIP_RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s,")


def typical_captions(n: int, seed: int = 0) -> list[str]:
    """n captions whose CLIP token counts (start and end included) are spread evenly over CAPTION_TOKENS."""
    from clipfit.data.tokens import count_tokens

    rng = np.random.default_rng(seed)
    captions = []
    for i in range(n):
        target = CAPTION_TOKENS[0] + i % (CAPTION_TOKENS[1] - CAPTION_TOKENS[0] + 1)
        words = list(rng.choice(WORDS, size=target - 2))
        while count_tokens(" ".join(words)) > target:
            words.pop()
        captions.append(" ".join(words))
    return captions


def write_data(folder: Path, n: int, size: int = 96, captions: list[str] | None = None) -> tuple[Path, Path]:
    """n JPEG/caption pairs as a sidecar folder, and the same pairs as an open_clip CSV."""
    rng = np.random.default_rng(0)
    pairs = folder / "pairs"
    pairs.mkdir(parents=True)
    rows = ["filepath,title"]
    for i in range(n):
        image = pairs / f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(image, quality=90)
        caption = captions[i] if captions else f"photo number {i} of a random texture"
        (pairs / f"{i:05d}.txt").write_text(caption + "\n")
        rows.append(f"{image},{caption}")
    csv = folder / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return pairs, csv


def write_locked_model(folder: Path) -> Path:
    config = folder / "bench-lite0.json"
    config.write_text(json.dumps(LOCKED_MODEL_CFG))
    return config


def write_model(folder: Path, model_cfg: dict = MODEL_CFG, name: str = "bench-vit") -> tuple[Path, Path]:
    """The model as a config JSON (clipfit --model) and as an open_clip `local-dir:` folder."""
    config = folder / f"{name}.json"
    config.write_text(json.dumps(model_cfg))
    local_dir = folder / name
    local_dir.mkdir()
    (local_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return config, local_dir


def write_starter_dir(folder: Path) -> Path:
    """The starter as an open_clip `local-dir:` folder for open_clip's trainer (same installed towers)."""
    sys.path.insert(0, str(REPO))
    from clipfit import starter

    local_dir = folder / "bench-starter"
    local_dir.mkdir()
    preprocess = {**starter.PREPROCESS, "size": 224}
    (local_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": starter.starter_model_config(),
                                                                 "preprocess_cfg": preprocess}))
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(starter.text_model_dir() / file, local_dir / file)  # open_clip reads a local-dir's tokenizer here
    return local_dir


THREADS = {"value": 1}


def environment(source: Path = REPO) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"  # the starter's text tower loads from its installed folder
    # Same intra-op threads for both trainers; on a loaded machine more threads than free cores
    # make each step many times slower (OpenMP threads wait on each other).
    env["OMP_NUM_THREADS"] = str(THREADS["value"])
    return env


def run(command: list[str], source: Path = REPO) -> tuple[str, float]:
    started = time.perf_counter()
    # cwd: `python -m clipfit` imports the package of its working folder before any on PYTHONPATH
    result = subprocess.run(command, capture_output=True, text=True, env=environment(source), cwd=source)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr, seconds


def steady(rates: list[float]) -> float:
    return statistics.median(rates[WARMUP_STEPS:] or rates)


def clipfit_run(args, work: Path, pairs: Path, config: Path | str, method: str, *extra: str,
                pretrained: str = "none", source: Path = REPO) -> dict:
    out = work / f"clipfit-{method}-{time.time_ns()}"
    command = [sys.executable, "-m", "clipfit", "refine", str(pairs), "--model", str(config), "--pretrained", pretrained,
               "--method", method, "--out", str(out), "--batch-size", str(args.batch_size), "--workers",
               str(args.workers), "--precision", args.precision, "--log-every", "1", "--quiet",
               "--cache-dir", str(work / f"cache-{time.time_ns()}"), *extra]  # nothing reused between runs
    _, seconds = run(command, source)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((out / "run.json").read_text())
    rates = [r["pairs_per_s"] for r in rows if "pairs_per_s" in r]
    return {"pairs_per_s": steady(rates), "steps": len(rates), "wall_s": seconds,
            "train_s": info["train_seconds"], "teacher_forward_passes": info.get("teacher_forward_passes", 0),
            "peak_rss_mib": info["peak_memory"]["rss_mib"]}


def open_clip_run(args, work: Path, csv: Path, local_dir: Path) -> dict:
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[args.precision]
    command = [sys.executable, "-m", "open_clip_train.main", "--train-data", str(csv), "--dataset-type", "csv",
               "--csv-separator", ",", "--model", f"local-dir:{local_dir}", "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--precision", precision, "--epochs", "1", "--lr", "1e-5",
               "--wd", "0.1", "--warmup", "0", "--log-every-n-steps", "1", "--save-frequency", "0",
               "--logs", str(work / "open_clip-logs"), "--name", f"run-{time.time_ns()}", "--report-to", ""]
    output, seconds = run(command)
    rates = [float(m.group(1)) for m in OPEN_CLIP_RATE.finditer(output)]
    if not rates:
        raise SystemExit(f"no throughput lines in open_clip's output:\n{output[-2000:]}")
    return {"pairs_per_s": steady(rates), "steps": len(rates), "wall_s": seconds}


def alternate(contenders: dict, repeats: int) -> dict[str, list[dict]]:
    """Every contender once per repeat, the order rotated each time; results per contender."""
    names = list(contenders)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(contenders[name]())
            print(f"  repeat {r + 1}: {name:<22} {results[name][-1]['pairs_per_s']:8.1f} pairs/s", flush=True)
    return results


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def registered_methods() -> list[str]:
    sys.path.insert(0, str(REPO))
    from clipfit.methods import REGISTRY

    return list(REGISTRY)


def precomputed_vs_per_step(args, work: Path, pairs: Path, config: Path, label: str, flags: list[str]) -> dict:
    """refine with FLAGS, frozen outputs precomputed (default) against --no-precompute."""
    results = alternate({
        f"{label} precomputed": lambda: clipfit_run(args, work, pairs, config, "refine", *flags),
        f"{label} per step": lambda: clipfit_run(args, work, pairs, config, "refine", "--no-precompute", *flags),
    }, args.repeats)
    for name, runs in results.items():
        print(f"  {name:<20} teacher forward passes {runs[0]['teacher_forward_passes']:5d}, "
              f"training {median_of(runs, 'train_s'):6.1f} s, {median_of(runs, 'pairs_per_s'):7.1f} pairs/s, "
              f"wall {median_of(runs, 'wall_s'):6.1f} s")
    return results


def real_caption_case(args, work: Path) -> dict:
    """clipfit contrastive vs open_clip's trainer on captions of typical length, context 77."""
    folder = work / "real-captions"
    n = args.steps * args.batch_size
    pairs, csv = write_data(folder, n, captions=typical_captions(n))
    models = {"vit": write_model(folder, VIT_77_CFG, "bench-vit-77"), "starter": ("lite0-minilm", write_starter_dir(folder))}
    report = {}
    for name in [m for m in args.real_models.split(",") if m]:
        config, local_dir = models[name]
        print(f"real-length captions, {name}: clipfit contrastive vs open_clip_train.main:", flush=True)
        contenders = {
            "clipfit contrastive": lambda: clipfit_run(args, folder, pairs, config, "contrastive", "--augment"),
            "open_clip_train": lambda: open_clip_run(args, folder, csv, local_dir),
        }
        if args.length_buckets:
            contenders["clipfit --length-buckets"] = lambda: clipfit_run(args, folder, pairs, config, "contrastive",
                                                                         "--augment", "--length-buckets")
        results = alternate(contenders, args.repeats)
        ours, theirs = (median_of(results[k], "pairs_per_s") for k in ("clipfit contrastive", "open_clip_train"))
        print(f"  median pairs/s: clipfit {ours:.1f}, open_clip {theirs:.1f}, ratio {ours / theirs:.2f}", flush=True)
        report[name] = {"runs": results, "ratio": ours / theirs}
    return report


def lock_image_case(args, work: Path) -> dict:
    """The starter with --lock-image on a real pairs folder: an older checkout against this one."""
    flags = ("--lock-image", "--epochs", str(args.lock_image_epochs))
    contenders = {"after (this checkout)": REPO}
    if args.baseline_src:
        contenders["before (--baseline-src)"] = args.baseline_src.resolve()
    print(f"lite0-minilm --lock-image on {args.lock_image_pairs}:", flush=True)
    results = alternate({label: (lambda source=source: clipfit_run(args, work, args.lock_image_pairs, "lite0-minilm",
                                                                   "contrastive", *flags, pretrained="aligned",
                                                                   source=source))
                         for label, source in contenders.items()}, args.repeats)
    rates = {label: median_of(runs, "pairs_per_s") for label, runs in results.items()}
    print("  median pairs/s: " + ", ".join(f"{label} {rate:.1f}" for label, rate in rates.items()), flush=True)
    return {"runs": results, "pairs_per_s": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="Training steps per run (one epoch).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--methods", default="", help="Comma-separated methods [default: all registered].")
    parser.add_argument("--skip-open-clip", action="store_true")
    parser.add_argument("--skip-methods", action="store_true")
    parser.add_argument("--teacher-epochs", type=int, default=3, help="Epochs of the refine teacher-cache run (0: skip).")
    parser.add_argument("--locked-epochs", type=int, default=3,
                        help="Epochs of the locked-towers run, precomputed vs --no-precompute (0: skip).")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every training process.")
    parser.add_argument("--real-captions", action="store_true",
                        help="Also race clipfit and open_clip's trainer on captions of typical length (context 77).")
    parser.add_argument("--real-models", default="vit,starter", help="Models of the real-caption case.")
    parser.add_argument("--length-buckets", action="store_true", help="Real-caption case: also clipfit --length-buckets.")
    parser.add_argument("--lock-image-pairs", type=Path, help="A real pairs folder: train the starter with --lock-image.")
    parser.add_argument("--baseline-src", type=Path, help="An older clipfit checkout to compare --lock-image-pairs with.")
    parser.add_argument("--lock-image-epochs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    args = parser.parse_args()

    THREADS["value"] = args.threads
    work = Path(tempfile.mkdtemp(prefix="clipfit-bench-"))
    pairs, csv = write_data(work, args.steps * args.batch_size)
    config, local_dir = write_model(work)
    report: dict = {"settings": vars(args) | {"json": None}, "cpu_count": os.cpu_count(), "model": MODEL_CFG}
    print(f"{args.steps * args.batch_size} pairs, batch {args.batch_size}, {args.steps} steps, {args.workers} "
          f"worker(s), {args.precision}, {os.cpu_count()} CPU(s); data in {work}", flush=True)

    if not args.skip_open_clip:
        print("clipfit contrastive vs open_clip_train.main:", flush=True)
        results = alternate({
            "clipfit contrastive": lambda: clipfit_run(args, work, pairs, config, "contrastive", "--augment"),
            "open_clip_train": lambda: open_clip_run(args, work, csv, local_dir),
        }, args.repeats)
        ours, theirs = median_of(results["clipfit contrastive"], "pairs_per_s"), median_of(results["open_clip_train"], "pairs_per_s")
        print(f"median pairs/s: clipfit {ours:.1f}, open_clip {theirs:.1f}, ratio clipfit/open_clip {ours / theirs:.3f}")
        print(f"median wall s per process: clipfit {median_of(results['clipfit contrastive'], 'wall_s'):.1f}, "
              f"open_clip {median_of(results['open_clip_train'], 'wall_s'):.1f}")
        report["vs_open_clip"] = {"runs": results, "ratio": ours / theirs}

    if not args.skip_methods:
        methods = [m for m in args.methods.split(",") if m] or registered_methods()
        print("per-step cost of each method relative to contrastive (no augmentation):", flush=True)
        results = alternate({m: (lambda m=m: clipfit_run(args, work, pairs, config, m)) for m in methods},
                            args.repeats)
        base = median_of(results["contrastive"], "pairs_per_s") if "contrastive" in results else None
        for method, runs in results.items():
            rate = median_of(runs, "pairs_per_s")
            relative = f"{base / rate:.3f}x contrastive" if base else ""
            print(f"  {method:<14} {rate:8.1f} pairs/s  {relative}")
        report["methods"] = results

    if args.teacher_epochs and "refine" in registered_methods():
        print(f"refine, {args.teacher_epochs} epochs: teacher features precomputed (default) vs per step (--no-precompute):")
        report["teacher_cache"] = precomputed_vs_per_step(args, work, pairs, config, "refine",
                                                          ["--epochs", str(args.teacher_epochs)])

    if args.locked_epochs:
        print(f"refine, {args.locked_epochs} epochs, --lock-image --lock-text on an EfficientNet-Lite0 trunk: "
              "locked towers and teacher precomputed (default) vs per step (--no-precompute):")
        report["locked_towers"] = precomputed_vs_per_step(
            args, work, pairs, write_locked_model(work), "locked",
            ["--epochs", str(args.locked_epochs), "--lock-image", "--lock-text"])

    if args.real_captions:
        report["real_captions"] = real_caption_case(args, work)

    if args.lock_image_pairs:
        report["lock_image"] = lock_image_case(args, work)

    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
