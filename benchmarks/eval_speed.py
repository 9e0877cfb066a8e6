"""`clipfit eval` against CLIP_benchmark, and the zero-shot classifier's build time.

    python benchmarks/eval_speed.py --zeroshot FOLDER --retrieval PAIRS --clip-benchmark DIR \
        [--models starter,vit] [--repeats 2] [--imagenet-every 50] [--json out.json]

1. Same model, data and templates through `clipfit eval zeroshot folder` / `clipfit eval
   retrieval` and through CLIP_benchmark's own code (benchmarks/clip_benchmark_eval.py; DIR holds
   `pip install --no-deps --target DIR clip_benchmark==1.6.2`). Each is one fresh process, timed
   end to end (imports, model loading, decoding, encoding, metrics), the two run alternately; the
   metrics must agree (top-1 and mean per-class recall exactly, R@k to 1e-6). Models are saved as
   clipfit run folders, which both load (open_clip reads them as `local-dir:`): the offline
   starter `lite0-minilm` (aligned weights), and the reduced ViT-B/32 of benchmarks/throughput.py
   with context 77 and random weights (seed 0), whose metrics mean nothing but must agree too.
   clipfit's feature cache starts empty in every run, so the classifier is built, not reused.
   Ends with a markdown table (min and median over the repeats) for docs/performance.md.
   CLIP_benchmark's loader builds the starter's text tower from its hub id's config.json: a local
   Hugging Face cache holding the packaged MiniLM under that id is laid out for it (no network).
2. ImageNet's classifier (1,000 classes x 80 templates) on the starter: every Nth class (N =
   --imagenet-every) is encoded padded to 77 tokens in class order, as clipfit 0.1.0 did, then
   with clipfit's trimming (shortest first), then read back from the feature cache; times are
   scaled by N to the 1,000 classes (encoding time is linear in the prompts). These are CPU
   seconds of this process (one thread), which a shared machine's load does not stretch.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RETRIEVAL_KEYS = [f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)]
ZEROSHOT_KEYS = ["acc1", "mean_per_class_recall"]


def environment(extra_path: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(THREADS["value"]))
    if HF_HOME["path"]:
        env["HF_HOME"] = HF_HOME["path"]
    paths = [str(REPO)] + ([str(extra_path)] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


THREADS = {"value": 1}
HF_HOME = {"path": ""}


def offline_hub_cache(work: Path) -> None:
    """A Hugging Face cache holding the starter's MiniLM under its hub id, which the starter's run
    folder names: CLIP_benchmark's loader builds the text tower from the hub's config.json, and
    the hub is off. Laid out as huggingface_hub writes it (snapshots/REVISION, refs/main)."""
    import shutil

    from clipfit.starter import TEXT_HUB_ID, text_model_dir

    repo = work / "hf" / "hub" / f"models--{TEXT_HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(text_model_dir() / file, snapshot / file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    HF_HOME["path"] = str(work / "hf")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], extra_path: Path | None = None) -> tuple[dict, dict]:
    """The command's JSON output, and its wall and CPU seconds (CPU: the process and its
    DataLoader workers; on a shared machine the fairer of the two)."""
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    result = subprocess.run(command, capture_output=True, text=True, env=environment(extra_path))
    seconds = {"wall": time.perf_counter() - started, "cpu": children_cpu_seconds() - cpu_started}
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:5])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout), seconds


def save_models(work: Path, names: list[str]) -> dict[str, Path]:
    """Each model as a clipfit run folder (model.safetensors + open_clip_config.json)."""
    import torch

    from clipfit.models import load_model, save_model
    from throughput import VIT_77_CFG

    folders = {}
    for name in names:
        if name == "starter":
            loaded = load_model("lite0-minilm", "aligned")
        else:
            config = work / "bench-vit-77.json"
            config.write_text(json.dumps(VIT_77_CFG))
            torch.manual_seed(0)
            loaded = load_model(str(config), "none")
        folders[name] = work / f"model-{name}"
        folders[name].mkdir()
        save_model(loaded, loaded.model, folders[name])
        if name == "starter":  # open_clip reads a local-dir's Hugging Face tokenizer from the folder itself
            import shutil

            from clipfit.starter import text_model_dir

            for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
                shutil.copy(text_model_dir() / file, folders[name] / file)
    return folders


def clipfit_eval(args, work: Path, task: str, model: Path) -> tuple[dict, dict]:
    data = ["zeroshot", "folder", "--data", str(args.zeroshot)] if task == "zeroshot" else ["retrieval", str(args.retrieval)]
    command = [sys.executable, "-m", "clipfit", "eval", *data, "--model", str(model), "--batch-size",
               str(args.batch_size), "--workers", str(args.workers), "--device", "cpu", "--json"]
    if task == "zeroshot":
        command += ["--cache-dir", tempfile.mkdtemp(prefix="cache-", dir=work)]
    record, seconds = timed(command)
    return record["metrics"], seconds


def clip_benchmark_spec(args, work: Path, task: str, model: Path) -> Path:
    """What clip_benchmark_eval.py needs: clipfit's own reading of the data, so both see the same items."""
    from clipfit.eval.sets import load_labelled
    from clipfit.eval.retrieval import load_eval_pairs

    spec = {"task": task, "model": str(model), "batch_size": args.batch_size, "workers": args.workers}
    if task == "zeroshot":
        labelled = load_labelled("folder", args.zeroshot)
        spec.update(root=str(args.zeroshot), classnames=labelled.classes, templates=labelled.templates)
    else:
        spec["items"] = [[str(p.image), list(p.captions)] for p in load_eval_pairs(args.retrieval, workers=1)]
    path = work / f"spec-{task}-{model.name}.json"
    path.write_text(json.dumps(spec))
    return path


def compare(args, work: Path, models: dict[str, Path]) -> dict:
    results = {}
    for name, folder in models.items():
        for task in [t for t in ("zeroshot", "retrieval") if getattr(args, t)]:
            spec = clip_benchmark_spec(args, work, task, folder)
            contenders = {
                "clipfit": lambda: clipfit_eval(args, work, task, folder),
                "CLIP_benchmark": lambda: timed([sys.executable, str(REPO / "benchmarks" / "clip_benchmark_eval.py"),
                                                 str(spec)], args.clip_benchmark),
            }
            runs: dict[str, list] = {label: [] for label in contenders}
            for r in range(args.repeats):
                for label in list(contenders)[r % 2:] + list(contenders)[:r % 2]:
                    runs[label].append(contenders[label]())
                    s = runs[label][-1][1]
                    print(f"  {name} {task} repeat {r + 1}: {label:<15} wall {s['wall']:7.1f} s, CPU {s['cpu']:7.1f} s",
                          flush=True)
            keys = ZEROSHOT_KEYS if task == "zeroshot" else RETRIEVAL_KEYS
            ours, theirs = runs["clipfit"][0][0], runs["CLIP_benchmark"][0][0]
            differences = {key: abs(mine[key] - other[key]) for key in keys  # every repeat of each against each
                           for mine, _ in runs["clipfit"] for other, _ in runs["CLIP_benchmark"]}
            row = {"clipfit": {k: ours[k] for k in keys}, "CLIP_benchmark": {k: theirs[k] for k in keys},
                   "largest_difference": max(differences.values()),
                   "all_seconds": {label: [s for _, s in r] for label, r in runs.items()}}
            for clock in ("wall", "cpu"):
                median = {label: statistics.median(s[clock] for _, s in r) for label, r in runs.items()}
                row[clock] = median
                row[f"min_{clock}"] = {label: min(s[clock] for _, s in r) for label, r in runs.items()}
                row[f"speedup_{clock}"] = median["CLIP_benchmark"] / median["clipfit"]
            results[f"{name}/{task}"] = row
            print(f"  {name} {task}: largest metric difference {row['largest_difference']:.2g}; clipfit "
                  f"{row['speedup_wall']:.2f}x faster (wall), {row['speedup_cpu']:.2f}x (CPU)", flush=True)
    return results


def markdown_table(results: dict, repeats: int) -> list[str]:
    """The comparison as docs/performance.md shows it: min and median over the repeats, CPU and wall."""
    lines = ["| model / task | clipfit CPU s, min / median | CLIP_benchmark CPU s, min / median | clipfit faster (CPU, "
             "medians) | wall s, clipfit / CLIP_benchmark (medians) | clipfit faster (wall) | largest metric "
             "difference | goal: identical, >= 2x faster |", "|---|---|---|---|---|---|---|---|"]
    for case, row in results.items():
        met = row["largest_difference"] <= 1e-6 and min(row["speedup_cpu"], row["speedup_wall"]) >= 2
        lines.append(
            f"| {case.replace('/', ' / ')} | {row['min_cpu']['clipfit']:.1f} / {row['cpu']['clipfit']:.1f} | "
            f"{row['min_cpu']['CLIP_benchmark']:.1f} / {row['cpu']['CLIP_benchmark']:.1f} | {row['speedup_cpu']:.2f}x | "
            f"{row['wall']['clipfit']:.1f} / {row['wall']['CLIP_benchmark']:.1f} | {row['speedup_wall']:.2f}x | "
            f"{row['largest_difference']:.2g} | {'met' if met else 'not met'} |")
    return lines + [f"\n{repeats} repeat(s) each, alternating; CPU: the process and its DataLoader workers."]


def classifier_build(args, work: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from clipfit.eval.datasets import default_templates, fill
    from clipfit.eval.encode import Encoder
    from clipfit.eval.zeroshot import class_embeddings
    from clipfit.features import FeatureCache, encoder_identity
    from clipfit.models import load_model

    torch.set_num_threads(THREADS["value"])
    classes, templates = list(IMAGENET_CLASSNAMES)[::args.imagenet_every], default_templates()
    loaded = load_model("lite0-minilm", "aligned")
    model = loaded.model.eval()

    started = time.process_time()  # clipfit 0.1.0: batches of 64 prompts in class order, padded to 77 tokens
    prompts = [fill(t, c) for c in classes for t in templates]
    with torch.no_grad():
        rows = torch.cat([F.normalize(model.encode_text(loaded.tokenizer(prompts[i:i + 64])), dim=-1)
                          for i in range(0, len(prompts), 64)])
    padded = F.normalize(rows.view(len(classes), len(templates), -1).mean(1), dim=-1)
    padded_s = time.process_time() - started  # CPU seconds: the machine is shared, its wall clock is not ours

    cache = FeatureCache(Path(tempfile.mkdtemp(prefix="cache-", dir=work)))
    encoder = Encoder(model, loaded.preprocess_val, loaded.tokenizer, torch.device("cpu"), 64,
                      identity=encoder_identity("lite0-minilm", "aligned"), feature_cache=cache)
    started = time.process_time()
    trimmed = class_embeddings(encoder, classes, templates)
    trimmed_s = time.process_time() - started
    started = time.process_time()
    cached = class_embeddings(encoder, classes, templates)
    cached_s = time.process_time() - started
    scale = len(IMAGENET_CLASSNAMES) / len(classes)
    result = {"classes_measured": len(classes), "templates": len(templates), "prompts_measured": len(prompts),
              "scale": scale, "padded_s": padded_s, "trimmed_s": trimmed_s, "cache_hit_s": cached_s,
              "padded_s_1000_classes": padded_s * scale, "trimmed_s_1000_classes": trimmed_s * scale,
              "speedup": padded_s / trimmed_s, "largest_difference": float((padded - trimmed).abs().max()),
              "cache_identical": bool(torch.equal(trimmed, cached)), "cache_hits": cache.hits}
    print(f"  {len(prompts)} prompts: padded {padded_s:.1f} s, trimmed {trimmed_s:.1f} s ({result['speedup']:.1f}x), "
          f"cache hit {cached_s * 1000:.0f} ms; scaled to 1000 classes: {padded_s * scale / 60:.1f} min -> "
          f"{trimmed_s * scale / 60:.1f} min; largest difference {result['largest_difference']:.2g}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zeroshot", type=Path, help="An ImageFolder for `clipfit eval zeroshot folder`.")
    parser.add_argument("--retrieval", type=Path, help="A pairs folder for `clipfit eval retrieval`.")
    parser.add_argument("--clip-benchmark", type=Path, help="A folder holding clip_benchmark==1.6.2 (pip --target).")
    parser.add_argument("--models", default="starter,vit")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process.")
    parser.add_argument("--imagenet-every", type=int, default=50, help="Classifier build: every Nth ImageNet class (0: skip).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    THREADS["value"] = args.threads
    work = Path(tempfile.mkdtemp(prefix="clipfit-eval-bench-"))
    report: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "cpu_count": os.cpu_count(),
                    "load_before": os.getloadavg()}
    if args.zeroshot or args.retrieval:
        print("clipfit eval vs CLIP_benchmark:", flush=True)
        offline_hub_cache(work)
        report["vs_clip_benchmark"] = compare(args, work, save_models(work, args.models.split(",")))
    if args.imagenet_every:
        print(f"ImageNet zero-shot classifier, every {args.imagenet_every}th class, starter:", flush=True)
        report["imagenet_classifier"] = classifier_build(args, work)
    report["load_after"] = os.getloadavg()
    if report.get("vs_clip_benchmark"):
        print("\n".join(markdown_table(report["vs_clip_benchmark"], args.repeats)))
        print(f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in report['load_before'])}; after: "
              f"{', '.join(f'{x:.1f}' for x in report['load_after'])}; {os.cpu_count()} CPUs.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
