"""A sweep folder follows the run-folder contract (clipfit.rundir): marker, lock, its own names,
refusals with exit 2, staged replacement under --overwrite, and rerunning continues it.

Every case runs the real CLI on real folders and compares every file that must survive."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import cli_env, error_line, run_main, tiny_refine_args
from test_resume import Killed
from test_run_folder import project, run_in, snapshot  # noqa: F401 (fixture)
from clipfit import rundir


def sweep_args(pairs: Path, out: Path | str, config: Path, *extra: str) -> list[str]:
    return ["sweep", str(pairs), "--model", str(config), "--pretrained", "none", "--out", str(out), "--val-split",
            "0.25", "--batch-size", "4", "--max-steps", "1", "--workers", "0", "--quiet", *extra]


@pytest.mark.parametrize("where, expected", [
    ("notes", "not empty and not a clipfit sweep folder"),
    (".", "--out is the current folder"),
    ("..", "--out is the current folder or a parent of it"),
])
def test_sweep_never_writes_into_a_users_folder(where, expected, project, tiny_config, capsys):
    notes = project / "notes"
    notes.mkdir()
    for name in ("sweep.md", "sweep.json", "sweep.html"):
        (notes / name).write_text("mine\n")
    before = snapshot(project.parent)
    cwd = project / "pairs" if where == ".." else project
    code = run_in(cwd, sweep_args(project / "pairs", where, tiny_config, "--lr", "1e-5,1e-3"))
    assert code == 2
    assert expected in error_line(capsys)
    assert snapshot(project.parent) == before  # not even a marker or a lock


def test_sweep_out_containing_pairs_is_refused(project, tiny_config, capsys):
    before = snapshot(project)
    assert run_main(sweep_args(project / "pairs", project, tiny_config)) == 2
    assert "--out contains PAIRS" in error_line(capsys)
    assert snapshot(project) == before


def test_a_run_folder_is_not_a_sweep_folder_nor_the_other_way_round(pairs_dir, tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, run, tiny_config, "--max-steps", "1")) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert run_main(sweep_args(pairs_dir, run, tiny_config)) == 2
    assert f"{run}: a clipfit run folder, not a sweep folder" in error_line(capsys)
    assert run_main(sweep_args(pairs_dir, run, tiny_config, "--overwrite")) == 2
    assert "not a sweep folder" in error_line(capsys)
    assert snapshot(run) == before

    sweep = tmp_path / "sweep"
    rundir.claim_sweep_dir(sweep, False, {}, print).release()
    (sweep / "notes.md").write_text("mine\n")
    before = snapshot(sweep)
    capsys.readouterr()
    assert run_main(tiny_refine_args(pairs_dir, sweep, tiny_config, "--overwrite")) == 2
    assert f"{sweep}: a clipfit sweep folder, not a run folder" in error_line(capsys, alone=False)
    assert snapshot(sweep) == before


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from clipfit import rundir
    folder = rundir.claim_sweep_dir(Path(sys.argv[1]), False, {}, print)
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_sweep_on_a_locked_folder_exits_2_naming_the_holder(pairs_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "sweep"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_main(sweep_args(pairs_dir, out, tiny_config)) == 2
        assert f"in use by another clipfit sweep (pid {holder.pid})" in error_line(capsys)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert sorted(p.name for p in out.iterdir()) == [rundir.MARKER]  # nothing written by the refused sweep


def test_sweep_overwrite_replaces_only_its_own_files_and_names_points_without_paths(pairs_dir, tiny_config,
                                                                                   tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = sweep_args(pairs_dir, out, tiny_config.resolve())  # an absolute --model path, one grid point
    assert run_main(argv) == 0
    point = out / f"01-model={tiny_config.stem}"
    names = {p.name for p in out.iterdir()}
    assert {rundir.MARKER, point.name, "sweep.json", "sweep.md", "sweep.html"} <= names <= rundir.SWEEP_NAMES | {
        rundir.MARKER, point.name}
    (out / "notes.md").write_text("mine\n")
    (out / "07-mine").mkdir()
    (out / "07-mine" / "data.txt").write_text("mine too\n")
    (point / "my-notes.txt").write_text("about this run\n")
    users = {name: (out / name).read_bytes() for name in ("notes.md", "07-mine/data.txt")}

    assert run_main(["interpolate", point, "--alpha", "0.5", "--quiet"]) == 0  # its default --out: NAME-wise, beside
    wise = snapshot(out / f"{point.name}-wise")
    finished = snapshot(point)
    assert run_main(argv) == 0  # rerunning continues: the finished point is skipped, nothing replaced
    assert snapshot(point) == finished
    capsys.readouterr()

    again = argv + ["--lr", "1e-3", "--overwrite"]  # a different sweep in its place
    assert run_main(again) == 2  # but a grid point holds a file of the user's: it would go with the point
    assert f"{point}: holds my-notes.txt, which clipfit did not write" in error_line(capsys)
    assert snapshot(point) == finished | {"my-notes.txt": b"about this run\n"}
    (point / "my-notes.txt").unlink()

    assert run_main(again) == 0
    err = capsys.readouterr().err
    assert f"kept 3 entries this sweep did not write ({point.name}-wise, 07-mine, notes.md)" in err
    assert snapshot(out / f"{point.name}-wise") == wise  # another command's run folder: not the sweep's to replace
    assert {name: (out / name).read_bytes() for name in users} == users
    assert json.loads((point / "run.json").read_text())["config"]["lr"] == 1e-3
    assert not (out / rundir.STAGING).exists() and not (out / rundir.DISCARDED).exists()


def test_a_grid_point_killed_while_writing_its_report_is_finished_by_the_rerun(pairs_dir, tiny_config, tmp_path,
                                                                              monkeypatch):
    """run.json with the after numbers is what makes a grid point finished, so it is written last."""
    import clipfit.run

    out = tmp_path / "sweep"
    argv = sweep_args(pairs_dir, out, tiny_config, "--save-every", "1")

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(clipfit.run, "write_report", killed)
    with pytest.raises(Killed):
        run_main(argv)
    monkeypatch.undo()
    assert run_main(argv) == 0
    point = out / f"01-model={tiny_config.stem}"
    assert json.loads((point / "run.json").read_text())["after"]
    assert (point / "report.md").is_file() and (point / "report.html").is_file()
