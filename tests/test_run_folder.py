"""The run-folder contract (clipfit.rundir): --out never costs a user a file clipfit did not write.

Every refusal is checked as a user meets it (the real CLI, real folders), and afterwards every file
that must survive is compared with what was there before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import cli_env, error_line, run_main, tiny_refine_args, write_pairs
from test_resume import PAUSE_AT, PAUSE_FILE, long_run_args, many_pairs, start, wait_for  # noqa: F401 (fixture)
from clipfit import rundir
from clipfit.io import read_jsonl


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones and .git included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's project: pairs, notes and a git repository."""
    root = tmp_path / "project"
    write_pairs(root / "pairs", n=8)
    (root / "notes.md").write_text("my notes\n")
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


@pytest.mark.parametrize("where, expected", [
    ("pairs", "--out is PAIRS"),
    ("pairs/run", "--out lies inside PAIRS"),
    (".", "--out is the current folder"),
    ("..", "the current folder or a parent of it"),
])
def test_out_on_the_users_files_is_refused_and_nothing_is_touched(where, expected, project, tiny_config, capsys):
    before = snapshot(project.parent)
    code = run_in(project, tiny_refine_args(Path("pairs"), Path(where), tiny_config, "--overwrite"))
    assert code == 2
    assert expected in error_line(capsys, alone=False)
    assert snapshot(project.parent) == before


def run_in(cwd: Path, argv: list) -> int:
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return run_main(argv)
    finally:
        os.chdir(previous)


def test_out_containing_pairs_is_refused(project, tiny_config, tmp_path, capsys):
    before = snapshot(project)
    assert run_main(tiny_refine_args(project / "pairs", project, tiny_config, "--overwrite")) == 2
    assert "--out contains PAIRS" in error_line(capsys, alone=False)
    assert snapshot(project) == before


@pytest.mark.parametrize("inside", [False, True])
def test_out_on_the_cache_folder_is_refused(inside, pairs_dir, tiny_config, tmp_path, capsys):
    cache = tmp_path / "cache"
    (cache / "features").mkdir(parents=True)
    (cache / "features" / "entry.safetensors").write_bytes(b"cached")
    out = cache / "run" if inside else cache.parent
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--cache-dir", cache, "--overwrite")) == 2
    assert "the cache folder" in error_line(capsys, alone=False)
    assert (cache / "features" / "entry.safetensors").read_bytes() == b"cached"
    assert not (cache / "run").exists()


def test_a_users_folder_is_never_replaced(pairs_dir, tiny_config, tmp_path, capsys):
    thesis = tmp_path / "home" / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "chapter1.tex").write_text("\\chapter{Intro}")
    (thesis / "figures" / "plot.pdf").write_bytes(b"%PDF-1.4")
    before = snapshot(thesis)
    for flags in (["--overwrite"], []):
        assert run_main(tiny_refine_args(pairs_dir, thesis, tiny_config, *flags)) == 2
        line = error_line(capsys, alone=False)
        assert "not a clipfit run folder" in line and "chapter1.tex" in line and "figures" in line
    assert snapshot(thesis) == before  # not even a marker or lock file was written


def test_overwrite_replaces_only_clipfits_own_files(pairs_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1", "--seed", "1")) == 0
    (out / "my-notes.txt").write_text("keep me")
    (out / "plots").mkdir()
    (out / "plots" / "mine.png").write_bytes(b"png")
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "2", "--overwrite")) == 0
    assert "kept 2 entries this run did not write" in capsys.readouterr().err
    assert (out / "my-notes.txt").read_text() == "keep me" and (out / "plots" / "mine.png").read_bytes() == b"png"
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["seed"] == 0 and run["steps"] == 2  # the new run, whole
    assert not (out / rundir.STAGING).exists() and not (out / rundir.DISCARDED).exists()


def test_every_file_a_run_writes_is_on_the_own_list(pairs_dir, tiny_config, tmp_path):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1", "--lora", "--val-split",
                                     "0.25")) == 0
    (pairs_dir / "broken.png").write_bytes(b"not an image")  # so that skipped.txt is written too
    (pairs_dir / "broken.txt").write_text("a broken picture")
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1", "--overwrite")) == 0
    names = {p.name for p in out.iterdir()}
    assert {"skipped.txt", "model.safetensors", "run.json", "checkpoints", "report.md"} <= names
    assert all(rundir.is_own(name) or name == rundir.MARKER for name in names), names


def test_a_resumed_run_drops_the_half_written_files_a_kill_left(pairs_dir, tiny_config, tmp_path):
    out = tmp_path / "run"
    args = ("--batch-size", "4", "--epochs", "2")
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args, "--max-steps", "1")) == 0
    leftovers = [out / ".model.safetensors.k3j2x9.tmp", out / ".tmpAb3dE9",  # clipfit.io's, safetensors'
                 out / "checkpoints" / ".step-00000002.pt.q8w7e6.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    (out / ".adapter.z1x2c3").mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args, "--max-steps", "2", "--resume")) == 0
    assert not [p for p in leftovers + [out / ".adapter.z1x2c3"] if p.exists()]
    assert (out / "notes.txt").read_text() == "mine"
    assert all(rundir.is_own(p.name) for p in leftovers[:2])


def test_a_failed_overwrite_leaves_the_previous_run(pairs_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1")) == 0
    before = snapshot(out)
    # fails after the old run was staged, while the new one sets up (an unknown model)
    argv = tiny_refine_args(pairs_dir, out, tiny_config, "--overwrite")
    argv[argv.index("--model") + 1] = "no-such-model-xyz"
    assert run_main(argv) == 2
    assert "no-such-model-xyz" in error_line(capsys, alone=False)
    assert snapshot(out) == before


KILLER = textwrap.dedent("""
    import os, sys, json
    from pathlib import Path
    from clipfit import rundir
    out, kill_at, new_run = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "finish"
    calls = [0]

    def counted(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os._exit(9)  # as SIGKILL: no handler, no finally
            return real(*args, **kwargs)
        return call

    for name in ("replace", "unlink", "rmdir", "rename"):
        setattr(os, name, counted(getattr(os, name)))
    folder = rundir.claim_run_dir(out, False, True, {}, lambda message: None)
    (out / "eval-sample").mkdir()
    (out / "eval-sample" / "x.txt").write_text("new partial")
    if new_run:
        (out / "run.json").write_text(json.dumps({"run": "new"}))
        folder.commit()
    else:
        folder.abandon()
    print(calls[0])
""")


def old_run(out: Path) -> dict[str, bytes]:
    (out / "checkpoints").mkdir(parents=True)
    (out / rundir.MARKER).write_text("clipfit run folder\n")
    files = {"run.json": b'{"run": "old"}', "model.safetensors": b"old weights", "metrics.jsonl": b"{}\n",
             "checkpoints/step-00000004.pt": b"old checkpoint", "notes.txt": b"the user's"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


@pytest.mark.parametrize("new_run", ["finish", "abandon"])
def test_overwrite_killed_at_any_instant_leaves_the_old_run_or_the_new_one(new_run, tmp_path):
    """Kill the replacement at each of its file operations in turn; the next claim of the folder
    must find the old run whole, or the new run's run.json, never a mixture."""
    env = cli_env()
    total = None
    kill_at = 1
    while total is None or kill_at <= total:
        out = tmp_path / f"{new_run}-{kill_at}" / "run"
        files = old_run(out)
        result = subprocess.run([sys.executable, "-c", KILLER, str(out), str(kill_at), new_run], env=env,
                                capture_output=True, text=True, timeout=60)
        if result.returncode == 0:  # ran to the end: this many operations in all
            total = int(result.stdout)
        else:
            assert result.returncode == 9, result.stderr
        rundir.recover(out, lambda message: None)
        assert (out / "notes.txt").read_bytes() == b"the user's"
        assert not (out / rundir.STAGING).exists() and not (out / rundir.DISCARDED).exists()
        if json.loads((out / "run.json").read_text()) == {"run": "old"}:
            assert {name: (out / name).read_bytes() for name in files} == files
            assert not (out / "eval-sample").exists()
        else:
            assert new_run == "finish" and not (out / "model.safetensors").exists()
        kill_at += 1
    assert total > 5  # the kills covered staging, the new run's files and commit or rollback


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from clipfit import rundir
    folder = rundir.claim_run_dir(Path(sys.argv[1]), False, True, {}, print)
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder(pairs_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1")) == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=cli_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--overwrite")) == 2
        assert f"in use by another clipfit run (pid {holder.pid})" in error_line(capsys, alone=False)
        assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--resume")) == 2
        assert f"pid {holder.pid}" in error_line(capsys, alone=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # the killed holder left no stale lock; its staged replacement is rolled back by the next run
    assert (out / rundir.STAGING).is_dir() and not (out / "run.json").exists()
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1", "--overwrite")) == 0
    assert "an interrupted --overwrite left the previous run" in capsys.readouterr().err


def test_a_second_run_while_one_trains_exits_2_and_leaves_it_alone(many_pairs, tiny_config, tmp_path):
    """Two real processes, same --out, both with --overwrite: the second refuses while the first
    trains (paused at a step, so the overlap is certain), and the first finishes untouched."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    argv = long_run_args(many_pairs, out, tiny_config, "teacher-noise") + ["--overwrite", "--max-steps", "8"]
    first = start(argv, {**cli_env(), PAUSE_FILE: str(marker)}, driver=True)
    wait_for(marker.exists, first, f"step {PAUSE_AT}")
    second = start(argv, cli_env(), driver=True)  # the same command line, the test method known to both
    _, second_err = second.communicate(timeout=300)
    marker.unlink()
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert second.returncode == 2 and f"in use by another clipfit run (pid {first.pid})" in second_err
    steps = [row["step"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert steps == list(range(1, 9))  # one run's rows, not two interleaved
    assert json.loads((out / "run.json").read_text())["steps"] == 8


@pytest.mark.parametrize("kind", ["file", "dangling symlink", "symlink to a file"])
def test_out_that_is_not_a_folder_is_a_usage_error(kind, pairs_dir, tiny_config, tmp_path, capsys):
    target = tmp_path / "target.txt"
    target.write_text("precious")
    out = tmp_path / "out"
    if kind == "file":
        out = target
    else:
        out.symlink_to(tmp_path / "nowhere" if kind == "dangling symlink" else target)
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--overwrite")) == 2
    line = error_line(capsys, alone=False)
    assert str(out) in line and ("is a file" in line or "does not exist" in line)
    assert target.read_text() == "precious"


def test_out_through_a_symlink_to_a_folder_works(pairs_dir, tiny_config, tmp_path):
    (tmp_path / "big-disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "big-disk")
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "link", tiny_config, "--max-steps", "1")) == 0
    assert (tmp_path / "big-disk" / "model.safetensors").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_read_only_out_is_an_output_error(pairs_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert run_main(tiny_refine_args(pairs_dir, out, tiny_config)) == 7
        assert "cannot write to the run folder" in error_line(capsys, alone=False)
    finally:
        out.chmod(0o755)


def test_read_only_out_is_an_output_error_even_for_root(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    """What a read-only folder does to the marker's creation, simulated for root."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(rundir.MARKER) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", read_only)
    out = tmp_path / "readonly"
    out.mkdir()
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config)) == 7
    assert f"{out}: cannot write to the run folder (Permission denied)" in error_line(capsys, alone=False)
    assert list(out.iterdir()) == []


def test_a_failed_setup_leaves_a_folder_the_fixed_command_reuses(pairs_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1")
    model = argv.index("--model") + 1
    assert run_main(argv[:model] + ["no-such-model-xyz"] + argv[model + 1:]) == 2
    assert [p.name for p in out.iterdir()] == [rundir.MARKER]
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1")) == 0


def test_out_on_the_model_run_folder_is_refused(pairs_dir, tiny_config, tmp_path, capsys):
    start = tmp_path / "start"
    assert run_main(tiny_refine_args(pairs_dir, start, tiny_config, "--max-steps", "1")) == 0
    before = snapshot(start)
    argv = tiny_refine_args(pairs_dir, start, tiny_config, "--overwrite")
    argv[argv.index("--model") + 1] = str(start)
    assert run_main(argv) == 2
    assert "--out is the --model folder" in error_line(capsys, alone=False)
    assert snapshot(start) == before


def test_a_marker_that_does_not_fit_on_the_disk_is_an_output_error_and_leaves_the_folder_unlocked(tmp_path, monkeypatch):
    import errno

    from clipfit import rundir
    from clipfit.errors import OutputError

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    held = set(rundir.HELD)  # other runs of this process may hold theirs
    with monkeypatch.context() as patched:
        patched.setattr(rundir.os, "write", full)
        with pytest.raises(OutputError, match="cannot write the run folder's marker .No space left on device"):
            rundir.lock_folder(tmp_path / "run")
    assert rundir.HELD == held
    fd = rundir.lock_folder(tmp_path / "run")  # nothing kept the lock
    rundir.release_lock(fd)
    assert os.path.isfile(tmp_path / "run" / rundir.MARKER)
