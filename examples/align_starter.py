"""Regenerate the offline starter model's aligned weights and its model-card numbers.

One command, from the repository root, on a machine with the starter extra and the data
packages installed (see docs/starter-model.md):

    python examples/align_starter.py

Steps: build the public data sets (examples/datasets/), align the two projections and the
logit scale with `clipfit refine --method contrastive` and both towers locked, export the
changed tensors to clipfit/assets/lite0-minilm.safetensors, and evaluate towers-only vs
aligned on held-out data only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "examples" / "datasets"
DEFAULT_WORK = Path.home() / ".cache" / "clipfit" / "starter-align"
ALIGN_SETS = ("openclipart", "emoji")
RECIPE = {  # the alignment run: everything else is clipfit's default
    "method": "contrastive", "lock-image": None, "lock-text": None, "lr": "2e-3", "batch-size": "128",
    "epochs": "2", "warmup-steps": "10", "schedule": "cosine", "seed": "0", "weight-decay": "0.1",
}


def run(*args: str) -> subprocess.CompletedProcess:
    print("+", " ".join(args), flush=True)
    return subprocess.run(args, check=True, text=True, stdout=subprocess.PIPE)


def build_data(work: Path) -> None:
    builders = {"openclipart": "openclipart.py", "emoji": "emoji.py", "fashion-mnist": "fashion_mnist.py",
                "imagenet-samples": "imagenet_samples.py"}
    for folder, script in builders.items():
        if not (work / folder).is_dir():
            run(sys.executable, str(DATASETS / script), str(work / folder))
    combined = work / "align-all"
    combined.mkdir(exist_ok=True)
    for name in ALIGN_SETS:  # one pairs folder of both alignment splits, held-out splits untouched
        link = combined / name
        if not link.exists():
            link.symlink_to(work / name / "align", target_is_directory=True)


def recipe_args() -> list[str]:
    args = []
    for flag, value in RECIPE.items():
        args += [f"--{flag}"] + ([value] if value is not None else [])
    return args


def align(work: Path) -> Path:
    out = work / "run"
    run(sys.executable, "-m", "clipfit", "refine", str(work / "align-all"), "--model", "lite0-minilm",
        "--pretrained", "none", "--out", str(out), "--overwrite", *recipe_args())
    return out


def export(run_dir: Path) -> Path:
    from safetensors.torch import load_file

    from clipfit.starter import ALIGNED_WEIGHTS, create_starter, save_aligned_weights

    model = create_starter(aligned=False)[0]
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    recipe = " ".join(["clipfit refine align-all --model lite0-minilm --pretrained none", *recipe_args()])
    save_aligned_weights(model, ALIGNED_WEIGHTS, metadata={"recipe": recipe})
    return ALIGNED_WEIGHTS


EVALUATIONS = [  # (row label, eval sub-command, data folder under WORK, CLIP_benchmark metric)
    ("openclipart `heldout/` retrieval R@1, image → text", "retrieval", "openclipart/heldout", "text_retrieval_recall@1"),
    ("openclipart `heldout/` retrieval R@1, text → image", "retrieval", "openclipart/heldout", "image_retrieval_recall@1"),
    ("emoji `heldout/` retrieval R@1, image → text", "retrieval", "emoji/heldout", "text_retrieval_recall@1"),
    ("emoji `heldout/` retrieval R@1, text → image", "retrieval", "emoji/heldout", "image_retrieval_recall@1"),
    ("Fashion-MNIST zero-shot top-1 (1000 test images)", "zeroshot folder", "fashion-mnist", "acc1"),
]
# The 20 foolbox ImageNet photos are a smoke test of `clipfit eval zeroshot imagenet`, not a
# measurement, and encoding 1000 classes x 80 templates costs minutes on a CPU: run it by hand
# (docs/starter-model.md) rather than in every regeneration.
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def evaluate(work: Path, pretrained: str) -> dict[tuple[str, str], dict]:
    """CLIP_benchmark-shaped metrics of one weight set on every held-out folder, each computed once."""
    results = {}
    for _, command, folder, _ in EVALUATIONS:
        if (command, folder) in results:
            continue
        data = [str(work / folder)] if command == "retrieval" else ["--data", str(work / folder)]
        out = run(sys.executable, "-m", "clipfit", "eval", *command.split(), *data, "--model", "lite0-minilm",
                  "--pretrained", pretrained, "--json", "--quiet", "--workers", "0")
        results[(command, folder)] = json.loads(out.stdout)["metrics"]
    return results


def results_table(towers: dict, aligned: dict) -> str:
    lines = ["| Evaluation | Towers only (random projections) | Aligned |", "|---|---:|---:|"]
    for label, command, folder, metric in EVALUATIONS:
        before, after = towers[(command, folder)][metric], aligned[(command, folder)][metric]
        lines.append(f"| {label} | {100 * before:.1f} | {100 * after:.1f} |")
    return "\n".join(lines)


def write_results(table: str) -> None:
    from clipfit.io import write_text

    card = REPO / "docs" / "starter-model.md"
    text = card.read_text(encoding="utf-8")
    start, end = text.index(RESULTS_START) + len(RESULTS_START), text.index(RESULTS_END)
    write_text(card, text[:start] + "\n" + table + "\n" + text[end:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where data and the run go")
    parser.add_argument("--skip-align", action="store_true", help="reuse WORK/run instead of training again")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    build_data(args.work)
    run_dir = args.work / "run" if args.skip_align else align(args.work)
    print(f"aligned weights written to {export(run_dir)}")
    table = results_table(evaluate(args.work, "none"), evaluate(args.work, "aligned"))
    write_results(table)
    print(table)


if __name__ == "__main__":
    main()
