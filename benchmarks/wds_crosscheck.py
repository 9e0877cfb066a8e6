"""clipfit's `wds/NAME` evaluation against CLIP_benchmark 1.6.2's own code, on the same shards.

    python benchmarks/wds_crosscheck.py --clip-benchmark DIR [--models starter,vit] [--workers 2] [--json out.json]

DIR holds clip_benchmark==1.6.2 (`pip install --no-deps --target DIR clip_benchmark==1.6.2`; what it
imports besides, torch, torchvision, open_clip, webdataset, scikit-learn and tqdm, clipfit's
environment has). Three sets in CLIP_benchmark's WebDataset layout are written from the pictures
of examples/pairs (benchmarks/wds_sets.py): a classification set with its own templates (160
images, 40 classes, 4 shards of PNG, JPEG and WebP), a multi-label set (40 images, 6 classes) and a
retrieval set with one to three captions per image (40 images, 80 captions). Each is evaluated
by `clipfit eval zeroshot|retrieval wds/NAME --data DIR` and by CLIP_benchmark's own code path
for `clip_benchmark eval --dataset wds/NAME` (benchmarks/clip_benchmark_eval.py, task `wds`: its
build_dataset / build_wds_dataset, its DataLoader, its evaluate functions, amp off), each in a
fresh process, with the same model folder (benchmarks/eval_speed.py's save_models: the starter
with its aligned weights; a reduced ViT-B/32 with random weights). It prints one row per
metric and says whether the numbers are identical: the same counts (every accuracy and recall
is a count over the set) and every value within 1e-6, which float32 means and float64
averages differ by.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from eval_speed import THREADS, save_models, timed  # noqa: E402
import wds_sets  # noqa: E402

TOLERANCE = 1e-6
SETS = {  # name: (writer, clipfit command, CLIP_benchmark task, metrics compared)
    "wds/crosscheck": (lambda root: wds_sets.write_classification(root, 160, per_shard=50), "zeroshot",
                       "zeroshot_classification", ["acc1", "acc5", "mean_per_class_recall"]),
    "wds/crosscheck_multilabel": (lambda root: wds_sets.write_multilabel(root, per_shard=15), "zeroshot",
                                  "zeroshot_classification", ["mean_average_precision"]),
    "wds/flickr30k": (lambda root: wds_sets.write_retrieval(root, per_shard=15), "retrieval", "zeroshot_retrieval",
                      [f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)]),
}


def hub_config_cache(work: Path, models: dict[str, Path]) -> None:
    """Plain open_clip builds a Hugging Face text tower from its hub id's config.json (README, "What
    you get in a run folder"): put each model folder's copy into a local Hugging Face cache, which
    every process of this script reads with the hub switched off."""
    hf_home = work / "hf"
    for folder in models.values():
        config = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
        if "hf_model_name" in config and (folder / "config.json").is_file():
            repo = hf_home / "hub" / f"models--{config['hf_model_name'].replace('/', '--')}"
            (repo / "snapshots" / "local").mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / "local" / "config.json").write_bytes((folder / "config.json").read_bytes())
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / "main").write_text("local")
    os.environ["HF_HOME"] = str(hf_home)


def clipfit_metrics(args, work: Path, command: str, name: str, root: Path, model: Path) -> dict:
    record, _ = timed([sys.executable, "-m", "clipfit", "eval", command, name, "--data", str(root), "--model", str(model),
                       "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", "cpu",
                       "--json", "--cache-dir", tempfile.mkdtemp(prefix="cache-", dir=work)])
    return {**record["metrics"], "templates": record.get("templates"), "images": record["clipfit"]["images"]}


def clip_benchmark_metrics(args, work: Path, task: str, name: str, root: Path, model: Path) -> dict:
    spec = work / f"spec-{name.replace('/', '_')}-{model.name}.json"
    spec.write_text(json.dumps({"task": "wds", "wds_task": task, "dataset": name, "root": str(root), "model": str(model),
                                "batch_size": args.batch_size, "workers": args.workers}))
    metrics, _ = timed([sys.executable, str(REPO / "benchmarks" / "clip_benchmark_eval.py"), str(spec)],
                       args.clip_benchmark)
    return metrics


def compare(ours: dict, theirs: dict, keys: list[str], images: int) -> list[dict]:
    rows = []
    for key in keys:
        a, b = ours[key], theirs[key]
        same_count = round(a * images) == round(b * images) if "mean_average_precision" not in key else True
        rows.append({"metric": key, "clipfit": a, "clip_benchmark": b, "difference": abs(a - b),
                     "identical": same_count and abs(a - b) <= TOLERANCE})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-benchmark", type=Path, required=True, help="A folder holding clip_benchmark==1.6.2.")
    parser.add_argument("--models", default="starter,vit")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    THREADS["value"] = args.threads
    work = Path(tempfile.mkdtemp(prefix="clipfit-wds-crosscheck-"))
    models = save_models(work, args.models.split(","))
    hub_config_cache(work, models)
    report, lines = [], ["| model | set | metric | clipfit | CLIP_benchmark | difference | identical |",
                         "|---|---|---|---:|---:|---:|---|"]
    for name, (write, command, task, keys) in SETS.items():
        root = write(work / name.replace("/", "_"))
        for label, model in models.items():
            ours = clipfit_metrics(args, work, command, name, root, model)
            theirs = clip_benchmark_metrics(args, work, task, name, root, model)
            rows = compare(ours, theirs, keys, ours["images"])
            if "templates" in theirs:  # the set's own templates, read the same way by both
                rows.append({"metric": "templates", "clipfit": len(ours["templates"]),
                             "clip_benchmark": len(theirs["templates"]), "difference": 0,
                             "identical": ours["templates"] == theirs["templates"]})
            for row in rows:
                lines.append(f"| {label} | {name} | {row['metric']} | {row['clipfit']:.6g} | {row['clip_benchmark']:.6g} | "
                             f"{row['difference']:.2g} | {'yes' if row['identical'] else '**no**'} |")
                print(lines[-1], flush=True)
            report.append({"model": label, "set": name, "images": ours["images"], "rows": rows})
    verdict = all(row["identical"] for entry in report for row in entry["rows"])
    print("\n".join(["", *lines, "", f"all identical: {'yes' if verdict else 'NO'}"]))
    if args.json:
        args.json.write_text(json.dumps({"all_identical": verdict, "sets": report}, indent=2) + "\n")
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
