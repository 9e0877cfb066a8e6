"""Experiment trackers (`--report-to tensorboard,wandb`): the rows of metrics.jsonl, the config as
hyper-parameters, and the report's pictures at the end, where people already watch training.

Each tracker is a sink with three calls: `log(row)` for every row written to metrics.jsonl (fed by
`clipfit.train.Trainer.record`, the one place rows are written), `finish(run_dir, final)` once the
report's pictures exist, and `close()`, which is safe to call twice and on failure. Only rank 0
makes trackers. The packages are optional extras; `check_available` refuses a missing one before
any data is read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from clipfit.errors import UsageError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"

TRACKERS = ("tensorboard", "wandb")
PICTURES = ("loss_curves.png", "before_after.png")
WANDB_PROJECT = "clipfit"


def parse_report_to(value: str | None) -> list[str]:
    """`tensorboard,wandb` → ['tensorboard', 'wandb']; '', 'none' → []."""
    names = [name.strip().lower() for name in (value or "").split(",") if name.strip()]
    names = [name for name in names if name != "none"]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise UsageError(f"--report-to {unknown[0]!r}: choose from {', '.join(TRACKERS)} (comma-separated) or none")
    return list(dict.fromkeys(names))


def check_available(names: list[str]) -> None:
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"--report-to {name}: the {name} package is not installed "
                             f"(pip install 'clipfit[{name}]', or drop it from --report-to)")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, step and epoch aside (they are the axes)."""
    return {key: float(value) for key, value in row.items()
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def tag(key: str) -> str:
    """Step rows under train/, epoch rows (val_…) under val/, as open_clip's trainer groups them."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """Config values as the scalar types trackers accept: lists and None become strings."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in config.items()}


def final_metrics(after: dict[str, Any]) -> dict[str, float]:
    return {f"final/{key}": float(value) for key, value in after.items() if isinstance(value, (int, float))}


class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.config = hyperparameters(config)
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(tag(key), value, row["step"])
        self.writer.flush()

    def finish(self, run_dir: Path, after: dict[str, Any]) -> None:
        import numpy as np
        from PIL import Image

        for name in PICTURES:
            if (run_dir / name).is_file():
                with Image.open(run_dir / name) as picture:
                    pixels = np.asarray(picture.convert("RGB"))
                self.writer.add_image(Path(name).stem, pixels, dataformats="HWC")
        # run_name "." keeps the hyper-parameters in this run's folder, next to its scalars
        self.writer.add_hparams(self.config, final_metrics(after), run_name=".")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run named after the run folder; WANDB_MODE=offline works without network
    (sync later with `wandb sync`). Its files go to WANDB_DIR, or RUN_DIR/wandb when that is unset."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        folder = Path(os.environ.get("WANDB_DIR") or run_dir / WANDB_DIR)
        made = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=run_dir.name,
                                  dir=str(folder), config=config, reinit="create_new")
        except Exception as e:  # no login, no network: say so before training, not after
            if made:  # leave the run folder as empty as it was, so the corrected command may reuse it
                shutil.rmtree(folder, ignore_errors=True)
            raise UsageError(f"--report-to wandb: cannot start a run ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                             "log in with `wandb login`, or set WANDB_MODE=offline") from None
        self.closed = False

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({tag(key): value for key, value in scalars(row).items()} | {"epoch": row["epoch"]},
                     step=row["step"])

    def finish(self, run_dir: Path, after: dict[str, Any]) -> None:
        pictures = {Path(name).stem: self.wandb.Image(str(run_dir / name)) for name in PICTURES
                    if (run_dir / name).is_file()}
        if pictures:
            self.run.log(pictures)
        self.run.summary.update(final_metrics(after))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.run.finish()


MAKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class Trackers:
    """All requested trackers behind one sink."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    @classmethod
    def start(cls, names: list[str], run_dir: Path, config: dict[str, Any]) -> "Trackers":
        started = []
        try:
            for name in names:
                started.append(MAKERS[name](run_dir, config))
        except BaseException:
            cls(started).close()
            raise
        return cls(started)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, row: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(row)

    def finish(self, run_dir: Path, after: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.finish(run_dir, after)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
