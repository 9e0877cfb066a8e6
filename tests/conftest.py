"""Shared fixtures: a tiny randomly initialised open_clip config and generated pairs folders.

Nothing here downloads anything; every model is random and a few hundred kB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipfit.data.dataset import PairDataset

torch.set_num_threads(1)  # CI has 2 cores; threads fight more than they help for tiny models

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


@pytest.fixture(scope="session", autouse=True)
def own_cache_home(tmp_path_factory):
    """Feature-cache entries of runs without --cache-dir go to a folder of this test session,
    never into the user's ~/.cache/clipfit."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """Path of an open_clip model-config JSON for a 2-layer ViT/text transformer with 32-d embeddings."""
    path = tmp_path_factory.mktemp("configs") / "tiny-test.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def write_pairs(folder: Path, n: int = 16, size: int = 40, captions_per_image: int = 1, seed: int = 0) -> Path:
    """A sidecar pairs folder: coloured noise images whose captions name the colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        base = np.array(Image.new("RGB", (1, 1), colour).getpixel((0, 0)), dtype=np.float32)
        noise = rng.normal(0, 30, (size, size, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
        lines = [f"a {colour} picture number {i}"] + [f"caption {k} of a {colour} image" for k in range(1, captions_per_image)]
        (folder / f"img{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def repeat_captions(folder: Path, kinds: int) -> Path:
    """Give a write_pairs folder's images only `kinds` first captions, "a COLOUR picture", image i
    the i-th colour modulo `kinds`: in a batch of more than `kinds` pairs some caption repeats.
    Other caption lines stay ("caption k of a COLOUR image" repeats already)."""
    for i, path in enumerate(sorted(folder.glob("img*.txt"))):
        lines = path.read_text().splitlines()
        path.write_text("\n".join([f"a {COLOURS[i % kinds]} picture", *lines[1:]]) + "\n")
    return folder


@pytest.fixture
def pairs_dir(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs")


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_cli(*args: str, cwd: Path | None = None, check: bool = False, timeout: int = 300,
            subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run clipfit with ARGS and capture its output and exit status.

    In this process by default (a fresh interpreter pays seconds of imports per call);
    `subprocess_=True` runs `python -m clipfit` as a user would, for what needs a real process."""
    argv = [str(a) for a in args]
    result = run_in_subprocess(argv, cwd, timeout) if subprocess_ else run_in_process(argv, cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"clipfit {' '.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def run_in_subprocess(argv: list[str], cwd: Path | None, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipfit", *argv], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(), timeout=timeout)


def run_in_process(argv: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_main(argv)
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["clipfit", *argv], code or 0, out.getvalue(), err.getvalue())


def error_line(capsys, alone: bool = True) -> str:
    """The one-line error a failed in-process CLI call printed; with alone=False, warnings may precede it."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("clipfit: error: "), lines
    assert not any("Traceback" in line for line in lines), lines
    assert len(lines) == 1 or not alone, lines
    return lines[-1]


def tiny_refine_args(pairs: Path, out: Path, config: Path, *extra: str) -> list[str]:
    """A refine command line that finishes in seconds on a tiny model."""
    return ["refine", str(pairs), "--model", str(config), "--pretrained", "none", "--out", str(out),
            "--batch-size", "8", "--workers", "0", "--quiet", *extra]


def run_main(argv: list) -> int:
    """Run clipfit in this process (no import cost) and return its exit status."""
    from clipfit.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints in a run folder, oldest first."""
    folder = run_dir / "checkpoints"
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.pt")) if folder.is_dir() else []


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config):
    """A finished run of the tiny model with a validation split, shared by the tests that read one:
    (root, pairs folder, run folder)."""
    root = tmp_path_factory.mktemp("tiny-run")
    pairs = write_pairs(root / "pairs", n=16, captions_per_image=2)
    out = root / "run"
    run_cli(*tiny_refine_args(pairs, out, tiny_config, "--epochs", "2", "--lr", "1e-3", "--val-split", "0.5"), check=True)
    return root, pairs, out


@pytest.fixture
def decodes(monkeypatch):
    """How many times training images are decoded."""
    count = {"n": 0}
    original = PairDataset.decode

    def counting(self, *args, **kwargs):
        count["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PairDataset, "decode", counting)
    return count
