"""Interruption and resume: checkpoints, signals, bitwise-identical continuation.

The interrupted runs are real subprocesses stopped by a signal sent from the test. Run as a
script, this file is also the driver for a test-only method that draws from the global torch
RNG and can pause at a given step; combined with `refine` (frozen teacher, per-step generator)
resuming is tested with every source of state a method can have.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import checkpoint_steps, cli_env, run_main, tiny_refine_args, write_pairs
from clipfit.cli import main
from clipfit.io import read_jsonl
from clipfit.methods import REGISTRY, register
from clipfit.methods.base import Method

PAUSE_FILE = "CLIPFIT_TEST_PAUSE_FILE"  # the driver pauses at step PAUSE_AT until the test removes it
PAUSE_AT = 7


class TeacherNoise(Method):
    """A pull towards the frozen teacher's image embedding, jittered by draws from the global RNG."""

    name = "teacher-noise"
    terms = {"anchor": 0.5}
    teacher_towers = frozenset({"image"})

    def losses(self, step, wanted):
        pause_if_asked(step.step + 1)
        teacher_image, _ = step.teacher()
        jitter = 0.1 * torch.randn(teacher_image.shape) + 0.1 * torch.rand(())  # global RNG on purpose
        return {"anchor": (step.image_raw.float() - teacher_image - jitter).pow(2).mean()}


def pause_if_asked(step: int) -> None:
    marker = os.environ.get(PAUSE_FILE)
    if marker and step == PAUSE_AT and not Path(marker + ".done").exists():
        Path(marker).write_text("paused")
        while Path(marker).exists():  # the test signals us, then removes the marker
            time.sleep(0.02)
        Path(marker + ".done").write_text("")


def register_test_method() -> None:
    if "teacher-noise" not in REGISTRY:
        register("teacher-noise", f"{__name__}:TeacherNoise", summary="test only: anchor to the teacher with random jitter")


@pytest.fixture(scope="module")
def many_pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs", n=80, size=24)


def long_run_args(pairs: Path, out: Path, config: Path, method: str) -> list[str]:
    """3 epochs of 16 steps: enough steps that a signal sent after step 2 lands mid-run."""
    return tiny_refine_args(pairs, out, config, "--method", method, "--batch-size", "4", "--epochs", "3",
                            "--val-split", "0.2", "--save-every", "5", "--log-every", "1", "--seed", "3")


def start(argv: list[str], env: dict, driver: bool) -> subprocess.Popen:
    program = [sys.executable, __file__] if driver else [sys.executable, "-m", "clipfit"]
    return subprocess.Popen(program + [str(a) for a in argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"run ended (exit {process.returncode}) before {what}:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def interrupt_run(argv: list[str], out: Path, sig: signal.Signals, driver: bool, tmp_path: Path) -> str:
    """Start the run, signal it mid-training, return its stderr (after checking exit 130)."""
    env = cli_env()
    if driver:  # deterministic: the method waits inside step PAUSE_AT for our signal
        marker = tmp_path / "paused"
        env[PAUSE_FILE] = str(marker)
        process = start(argv, env, driver)
        wait_for(marker.exists, process, f"step {PAUSE_AT}")
        process.send_signal(sig)
        marker.unlink()
    else:  # as a user would: signal once training is visibly under way
        process = start(argv, env, driver)
        metrics = out / "metrics.jsonl"
        wait_for(lambda: len(read_jsonl(metrics)) >= 2, process, "the second metrics line")
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr[-3000:]
    return stderr


def printed_resume_command(stderr: str) -> list[str]:
    line = next(line for line in stderr.splitlines() if "Resume with: " in line)
    words = shlex.split(line.split("Resume with: ", 1)[1])
    assert words[0] == "clipfit" and words[-1] == "--resume"
    return words[1:]


def losses(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the one column that measures speed, not training."""
    return [{k: v for k, v in row.items() if k != "pairs_per_s"} for row in read_jsonl(run_dir / "metrics.jsonl")]


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("method, sig, driver", [
    pytest.param("contrastive", signal.SIGINT, False, id="contrastive-SIGINT"),
    pytest.param("refine+teacher-noise", signal.SIGTERM, True, id="refine-and-global-rng-SIGTERM"),
])
def test_interrupted_run_resumes_bitwise_identical(method, sig, driver, many_pairs, tiny_config, tmp_path):
    register_test_method()
    reference = tmp_path / "reference"
    assert run_main(long_run_args(many_pairs, reference, tiny_config, method)) == 0

    interrupted = tmp_path / "interrupted"
    argv = long_run_args(many_pairs, interrupted, tiny_config, method) + ["--overwrite"]
    stderr = interrupt_run(argv, interrupted, sig, driver, tmp_path)
    assert f"stopped by {sig.name}" in stderr
    stopped_at = max(checkpoint_steps(interrupted))
    assert 1 <= stopped_at < 48 and not (interrupted / "model.safetensors").exists()
    if driver:
        assert stopped_at == PAUSE_AT

    # the printed command, as printed (--overwrite dropped: it would delete the run being resumed)
    resume_args = printed_resume_command(stderr)
    assert "--overwrite" not in resume_args
    assert run_main(resume_args) == 0

    assert_same_weights(reference, interrupted)
    assert losses(interrupted) == losses(reference)
    assert len(losses(reference)) == 48 + 3  # a row per step and a validation row per epoch


def test_signal_to_the_whole_process_group_spares_dataloader_workers(many_pairs, tiny_config, tmp_path):
    """docker stop, Slurm and a terminal's Ctrl-C signal every process of the job, workers included."""
    out = tmp_path / "run"
    argv = long_run_args(many_pairs, out, tiny_config, "contrastive") + ["--workers", "2"]
    process = subprocess.Popen([sys.executable, "-m", "clipfit", *map(str, argv)], env=cli_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for(lambda: len(read_jsonl(out / "metrics.jsonl")) >= 2, process, "the second metrics line")
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and checkpoint_steps(out)


def test_second_signal_stops_at_once_keeping_the_last_checkpoint(many_pairs, tiny_config, tmp_path):
    register_test_method()
    out, marker = tmp_path / "run", tmp_path / "paused"
    env = {**cli_env(), PAUSE_FILE: str(marker)}
    process = start(long_run_args(many_pairs, out, tiny_config, "teacher-noise"), env, driver=True)
    wait_for(marker.exists, process, f"step {PAUSE_AT}")
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # two separate key presses
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr[-3000:]
    assert "clipfit: interrupted" in stderr
    assert checkpoint_steps(out) == [5]  # the periodic one; step 7 was abandoned, not half-written
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000005.pt"]


def test_ctrl_c_before_training_exits_130(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    from clipfit import models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)  # Ctrl-C while the model loads
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config)) == 130
    assert "clipfit: interrupted" in capsys.readouterr().err


def test_checkpoints_every_n_steps_and_epoch_end_keeping_the_last(pairs_dir, tiny_config, tmp_path):
    out = tmp_path / "run"
    # 16 pairs, batch 4: 4 steps per epoch, 2 epochs; --save-every 3 saves at 3 and 6, epoch ends at 4 and 8
    argv = tiny_refine_args(pairs_dir, out, tiny_config, "--batch-size", "4", "--epochs", "2", "--save-every", "3",
                            "--keep-checkpoints", "3")
    assert run_main(argv) == 0
    assert checkpoint_steps(out) == [4, 6, 8]  # step 3 was saved, then pruned to the last 3
    assert not [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("step-")]  # no temp files
    state = torch.load(out / "checkpoints" / "step-00000006.pt", weights_only=True)
    assert state["position"] == {"step": 6, "epoch": 1, "batch": 2, "nan_skipped": 0, "rows": 1}  # rows: metrics.jsonl
    assert {"model", "optimizer", "scheduler", "rng", "methods"} <= set(state)
    assert set(state["rng"]) >= {"python", "numpy", "torch"}


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(pairs_dir, tiny_config, tmp_path, capsys):
    reference, damaged = tmp_path / "reference", tmp_path / "damaged"
    args = ("--batch-size", "4", "--epochs", "2", "--save-every", "3", "--log-every", "1")
    assert run_main(tiny_refine_args(pairs_dir, reference, tiny_config, *args)) == 0
    # the same run stopped after step 6, as if it had been killed there
    assert run_main(tiny_refine_args(pairs_dir, damaged, tiny_config, *args, "--max-steps", "6")) == 0
    newest = damaged / "checkpoints" / "step-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn write, e.g. power loss
    (damaged / "model.safetensors").unlink()
    capsys.readouterr()

    assert run_main(tiny_refine_args(pairs_dir, damaged, tiny_config, *args, "--resume")) == 0
    assert "step-00000006.pt: damaged checkpoint" in capsys.readouterr().err
    assert_same_weights(reference, damaged)
    assert losses(damaged) == losses(reference)


def test_a_resume_past_a_damaged_checkpoint_removes_it_so_pruning_keeps_the_new_saves(pairs_dir, tiny_config,
                                                                                        tmp_path):
    out = tmp_path / "run"
    args = ("--batch-size", "4", "--epochs", "2", "--log-every", "1")
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args, "--save-every", "3", "--max-steps", "6")) == 0
    newest = out / "checkpoints" / "step-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    # resumed from step 3, saving at step 4 with one checkpoint kept: the damaged step 6 must not outrank it
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args, "--resume", "--save-every", "2",
                                     "--keep-checkpoints", "1", "--max-steps", "5")) == 0
    assert checkpoint_steps(out) == [5]  # the last step's save; step 4's went by pruning, not the other way round
    torch.load(out / "checkpoints" / "step-00000005.pt", weights_only=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finished")
    pairs, out = write_pairs(root / "pairs"), root / "run"
    assert run_main(tiny_refine_args(pairs, out, tiny_config, "--max-steps", "1")) == 0
    return pairs, out


@pytest.mark.parametrize("change", [("--lr", "1e-3"), ("--batch-size", "4"), ("--seed", "1"), ("--epochs", "2")])
def test_resume_with_settings_that_change_the_result_is_refused(change, finished_run, tiny_config, capsys):
    pairs, out = finished_run
    code = run_main(tiny_refine_args(pairs, out, tiny_config, *change, "--resume"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("clipfit: error: --resume refused") and change[0].lstrip("-").replace("-", "_") in err
    assert len(err.strip().splitlines()) == 1


def test_resume_refuses_changed_pairs(finished_run, tiny_config, capsys):
    pairs, out = finished_run
    caption = pairs / "img000.txt"
    original = caption.read_text()
    caption.write_text("a different caption")
    try:
        code = run_main(tiny_refine_args(pairs, out, tiny_config, "--resume"))
    finally:
        caption.write_text(original)
    assert code == 2 and "pairs in" in capsys.readouterr().err


def test_resume_with_result_neutral_changes_is_accepted(pairs_dir, tiny_config, tmp_path):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1", "--save-every", "1")) == 0
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--resume", "--log-every", "5",
                                     "--keep-checkpoints", "1")) == 0
    assert checkpoint_steps(out) == [2]


def test_resume_without_a_run_is_a_usage_error(pairs_dir, tiny_config, tmp_path, capsys):
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "none", tiny_config, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


if __name__ == "__main__":  # the subprocess driver: clipfit's CLI with the test method registered
    register_test_method()
    main(sys.argv[1:])


@pytest.mark.parametrize("extra", [
    pytest.param(["--batch-size", "4"], id="contrastive"),
    # accumulated steps: the no-grad pass, the replayed RNG states and the per-step draws
    pytest.param(["--batch-size", "2", "--grad-accum", "2", "--method", "refine+lite", "--lite-negatives", "shuffle"],
                 id="refine+lite-grad-accum"),
    # checkpoints without the frozen weights, which --resume takes from the starting model again
    pytest.param(["--batch-size", "4", "--lock-text"], id="locked-text"),
    pytest.param(["--batch-size", "4", "--lora", "--lora-targets", "c_fc"], id="lora"),
])
def test_a_run_stopped_by_max_steps_resumes_where_it_stopped(extra, tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=16)
    args = [*extra, "--log-every", "1", "--lr", "1e-3"]
    assert run_main(tiny_refine_args(pairs, tmp_path / "whole", tiny_config, *args)) == 0
    assert run_main(tiny_refine_args(pairs, tmp_path / "parts", tiny_config, *args, "--max-steps", "2")) == 0
    assert checkpoint_steps(tmp_path / "parts") == [2]  # mid-epoch: the epoch has 4 steps
    assert run_main(tiny_refine_args(pairs, tmp_path / "parts", tiny_config, *args, "--resume")) == 0

    losses = [[row["loss"] for row in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in row]
              for run in ("whole", "parts")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    whole, parts = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("whole", "parts"))
    assert all(torch.equal(whole[name], parts[name]) for name in whole)


def test_a_checkpoint_holds_what_trains_and_the_buffers(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=8)
    assert run_main(tiny_refine_args(pairs, tmp_path / "run", tiny_config, "--lock-image", "--lock-text")) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-00000001.pt", weights_only=True)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    # both towers locked: only the logit scale trains (and this CLIP has no persistent buffers)
    assert set(state["model"]) == {"logit_scale"}
    assert len(saved) > 30  # the model file still holds every weight


# --- what --resume refuses, and what it accepts -------------------------------------------------

def test_resume_refuses_a_starting_model_whose_weights_changed(tmp_path, tiny_config, capsys):
    # checkpoints hold only what trains: the frozen weights come from the starting model again
    from clipfit.models import load_model, save_state_dict

    pairs = write_pairs(tmp_path / "pairs", n=16)
    weights = tmp_path / "start.safetensors"
    state = load_model(str(tiny_config), "none").model.state_dict()
    save_state_dict(state, weights)
    args = ["refine", str(pairs), "--model", str(tiny_config), "--pretrained", str(weights), "--out",
            str(tmp_path / "run"), "--batch-size", "4", "--workers", "0", "--quiet", "--lock-image"]
    assert run_main([*args, "--max-steps", "2"]) == 0
    save_state_dict({k: v + 1 if k.startswith("visual.") else v for k, v in state.items()}, weights)
    capsys.readouterr()
    assert run_main([*args, "--resume"]) == 2
    assert "the starting model is not the one the run started from" in capsys.readouterr().err


def test_resume_accepts_the_explicit_default(finished_run, tiny_config):
    pairs, out = finished_run
    assert run_main(tiny_refine_args(pairs, out, tiny_config, "--max-steps", "1", "--lr", "1e-5", "--resume")) == 0


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory, tiny_config) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("cosine")
    pairs, out = write_pairs(root / "pairs"), root / "run"
    args = ["--batch-size", "4", "--epochs", "2", "--schedule", "cosine", "--max-steps", "6"]
    assert run_main(tiny_refine_args(pairs, out, tiny_config, *args)) == 0
    return pairs, out, args


def test_resume_refuses_a_changed_cosine_length(cosine_run, tiny_config, capsys):
    pairs, out, args = cosine_run
    for max_steps in ("7", "5"):
        changed = [a if a != "6" else max_steps for a in args]
        assert run_main(tiny_refine_args(pairs, out, tiny_config, *changed, "--resume")) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("clipfit: error: --resume refused: the cosine schedule was planned over 6 steps")
        assert not any("Traceback" in line for line in lines)


def test_resume_with_a_constant_schedule_may_stop_later_but_not_before_the_checkpoint(tmp_path, tiny_config,
                                                                                        capsys):
    pairs = write_pairs(tmp_path / "pairs")
    out, args = tmp_path / "run", ["--batch-size", "4", "--epochs", "2", "--warmup-steps", "2"]
    assert run_main(tiny_refine_args(pairs, out, tiny_config, *args, "--max-steps", "3")) == 0
    assert run_main(tiny_refine_args(pairs, out, tiny_config, *args, "--max-steps", "2", "--resume")) == 2
    assert "checkpoint is at step 3, past the 2 steps" in capsys.readouterr().err
    assert run_main(tiny_refine_args(pairs, out, tiny_config, *args, "--max-steps", "5", "--resume")) == 0
    whole = tmp_path / "whole"
    assert run_main(tiny_refine_args(pairs, whole, tiny_config, *args, "--max-steps", "5")) == 0
    assert_same_weights(whole, out)


def test_resume_without_a_usable_checkpoint_is_refused(pairs_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1")) == 0
    for checkpoint in (out / "checkpoints").iterdir():
        checkpoint.write_bytes(b"PK\x03\x04 torn")
    metrics = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1", "--resume")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no usable checkpoint" in line and "all damaged" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_bytes() == metrics  # nothing of the old run was rewritten


@pytest.mark.parametrize("content", ["{ not json", "[1, 2]", '{"config": 3}'])
def test_resume_with_a_corrupt_run_json_is_one_line_exit_2(content, pairs_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".clipfit-run").write_text("clipfit run folder\n")
    (out / "run.json").write_text(content)
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--resume")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clipfit: error: {out / 'run.json'}: ") and "--overwrite" in lines[0]


def test_sigterm_before_training_exits_130_like_ctrl_c(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    from clipfit import models

    real_load = models.load_model

    def load_then_get_terminated(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, while the run sets up
        return loaded

    monkeypatch.setattr(models, "load_model", load_then_get_terminated)
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "clipfit: interrupted by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is not left behind


class Killed(BaseException):
    """What a SIGKILL leaves, in this process: nothing of clipfit's own handling runs (not an Exception)."""


def test_a_kill_between_an_epochs_validation_row_and_its_checkpoint_logs_the_row_once(pairs_dir, tiny_config,
                                                                                      tmp_path, monkeypatch):
    """The epoch's last step is checkpointed mid-epoch, then the epoch ends: its validation row is
    logged and the checkpoint written again. Killed in between, the resume went back to the first
    checkpoint, kept the row (same step) and logged it a second time."""
    from clipfit.train import Trainer

    args = ("--batch-size", "4", "--epochs", "2", "--val-split", "0.25", "--save-every", "1", "--log-every", "1")
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, reference, tiny_config, *args)) == 0
    real_save = Trainer.save

    def save(self):
        if self.position.epoch == 1 and self.position.batch == 0:  # the end of the first epoch, its row logged
            raise Killed
        return real_save(self)

    monkeypatch.setattr(Trainer, "save", save)
    with pytest.raises(Killed):
        run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args))
    monkeypatch.undo()
    assert sum("val_clip_loss" in row for row in read_jsonl(out / "metrics.jsonl")) == 1
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args, "--resume")) == 0
    assert losses(out) == losses(reference)
    assert_same_weights(reference, out)
