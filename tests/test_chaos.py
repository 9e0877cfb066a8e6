"""Chaos: a sweep SIGKILLed at random moments and rerun each time ends as if never stopped.

A sweep of 3 grid points (tiny model, two DataLoader workers, a checkpoint every step) runs in a
real process that the test kills with SIGKILL at seeded random moments, 5 times, rerunning the same
command after each kill. It must end with exactly the files and weights of an uninterrupted sweep;
after every kill the process's workers are gone and the next run finds no stale lock; the user's
files beside the sweep, and in it, are untouched. Cost: about 49 s of CPU (user + system, the test
process and its children); 110-128 s of wall time on the shared 2-core machine at load 6.
"""

from __future__ import annotations

import fcntl
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from safetensors.torch import load_file

from conftest import cli_env, run_main, write_pairs
from clipfit import rundir
from clipfit.io import read_jsonl

SEED = 22
KILLS = 5


def sweep_args(pairs: Path, out: Path, config: Path) -> list[str]:
    return ["sweep", str(pairs), "--model", str(config), "--pretrained", "none", "--out", str(out),
            "--lr", "1e-4,1e-3,1e-2", "--val-split", "0.25", "--batch-size", "4", "--epochs", "2",
            "--save-every", "1", "--workers", "2", "--lock-text", "--quiet"]  # locked text: 13 MB checkpoints, not 40


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def alive(pids: list[int]) -> list[int]:
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def lock_is_free(marker: Path) -> bool:
    with open(marker, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def started(out: Path, process: subprocess.Popen, since: float) -> bool:
    """The process has set up a grid point (imports and set-up are over; the point's run.json, or a
    resumed point's metrics.jsonl, is written), or it has ended."""
    written = [p.stat().st_mtime for name in ("run.json", "metrics.jsonl") for p in out.glob(f"*/{name}")]
    return process.poll() is not None or any(mtime >= since for mtime in written)


def kill_at_random(argv: list[str], out: Path, delay: float) -> list[int]:
    """Run the sweep, SIGKILL it `delay` seconds into its work (unless it ends first); the processes
    it had started."""
    since = time.time()
    process = subprocess.Popen([sys.executable, "-m", "clipfit", *argv], env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not started(out, process, since):
        assert time.monotonic() < deadline, "the sweep never started"
        time.sleep(0.01)
    end = time.monotonic() + delay
    children: set[int] = set()
    while time.monotonic() < end and process.poll() is None:
        try:
            children |= {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, -signal.SIGKILL), stderr[-3000:]  # never "in use" (exit 2), never a crash
    return sorted(children)


def test_a_sweep_killed_five_times_ends_as_an_uninterrupted_one(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=12, size=16)
    reference, out = tmp_path / "reference" / "sweep", tmp_path / "chaos" / "sweep"
    started_at = time.monotonic()
    assert run_main(sweep_args(pairs, reference, tiny_config)) == 0
    uninterrupted = time.monotonic() - started_at

    beside = tmp_path / "chaos" / "notes.md"
    beside.parent.mkdir()
    beside.write_text("the user's notes, beside the sweep\n")
    rng = random.Random(SEED)
    argv = sweep_args(pairs, out, tiny_config)
    for kill in range(KILLS):  # each kill within the work left, on average, so that all five land
        delay = rng.uniform(0.05, 2 * uninterrupted / (KILLS + 1))
        children = kill_at_random(argv, out, delay)
        gone = time.monotonic() + 2
        while alive(children) and time.monotonic() < gone:
            time.sleep(0.02)
        assert not alive(children), f"kill {kill + 1}: processes outlived the sweep"
        if kill == 0:
            (out / "mine.txt").write_text("the user's file, inside the sweep folder\n")
    result = subprocess.run([sys.executable, "-m", "clipfit", *argv], env=cli_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    assert files(out) == sorted(files(reference) + ["mine.txt"])
    assert (out / "mine.txt").read_text() == "the user's file, inside the sweep folder\n"
    assert beside.read_text() == "the user's notes, beside the sweep\n"
    assert sorted(p.name for p in beside.parent.iterdir()) == ["notes.md", "sweep"]
    points = sorted(p.name for p in reference.iterdir() if rundir.is_sweep_run(p))
    assert len(points) == 3
    for point in points:
        left, right = load_file(reference / point / "model.safetensors"), load_file(out / point / "model.safetensors")
        assert left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left), point
        losses = [[{k: v for k, v in row.items() if k != "pairs_per_s"} for row in read_jsonl(run / point / "metrics.jsonl")]
                  for run in (reference, out)]
        assert losses[0] == losses[1], point
    chosen = [json.loads((run / "sweep.json").read_text())["selection"] for run in (reference, out)]
    assert chosen[0] == chosen[1]
    for marker in [out / rundir.MARKER] + [out / point / rundir.MARKER for point in points]:
        assert lock_is_free(marker), marker
