"""Checkpoints that let an interrupted run finish bit-for-bit as if never stopped.

A checkpoint holds model, optimiser, scheduler, method and RNG states plus the position in
the data order. Files are written atomically and loaded with weights_only=True.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clipfit.io import atomic_path
from clipfit.rundir import CHECKPOINT_DIR

PATTERN = re.compile(r"step-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store it as a tensor
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_paths(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint atomically (a full disk: OutputError, the older ones untouched), then
    keep the newest `keep`."""
    path = run_dir / CHECKPOINT_DIR / f"step-{step:08d}.pt"
    with atomic_path(path) as tmp:
        write_state(state, tmp)
    prune_checkpoints(run_dir, keep)
    return path


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


def drop_newer(run_dir: Path, resumed: Path) -> None:
    """Remove the checkpoints after `resumed` (damaged: load_latest passed over them). Left there,
    they would outrank the resumed run's next saves, and pruning would delete those instead."""
    paths = checkpoint_paths(run_dir)
    for newer in paths[paths.index(resumed) + 1:]:
        newer.unlink(missing_ok=True)


class RecordingFile:
    """The file torch.save writes through. torch turns a failed write (a full disk) into
    RuntimeError("... unexpected pos ..."), which loses the OSError; this keeps it."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def write_state(state: dict[str, Any], path: Path) -> None:
    """torch.save into `path`; a write that fails is the OSError it was (ENOSPC), as with every
    other file clipfit writes."""
    with open(path, "wb") as file:
        target = RecordingFile(file)
        try:
            torch.save(state, target)
        except RuntimeError:
            if target.error is None:
                raise
            raise target.error from None


def load_latest(run_dir: Path, warn: Callable[[str], None] = lambda message: None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; a damaged newest one falls back to the one before."""
    for path in reversed(checkpoint_paths(run_dir)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, unreadable file: all mean "damaged"
            warn(f"{path}: damaged checkpoint ({type(e).__name__}), trying the one before")
    return None
