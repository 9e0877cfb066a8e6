"""Failures that must not lose work: unwritable output, full disk, NaN losses and gradients."""

from __future__ import annotations

import errno
import json
import resource
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import checkpoint_steps, run_main, tiny_refine_args
from clipfit.losses import clip_loss
from clipfit.methods.contrastive import Contrastive


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("clipfit: error: "), lines
    assert not any("Traceback" in line for line in lines), lines
    return lines[-1]


def nothing_trained(run_dir: Path) -> bool:
    return not checkpoint_steps(run_dir) and not (run_dir / "metrics.jsonl").exists()


# --- output folder and disk space ---------------------------------------------------------------

def test_unwritable_output_folder_is_detected_before_training(pairs_dir, tiny_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # cannot be created, for root too (permission bits would not stop root)
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config)) == 7
    line = one_error_line(capsys)
    assert str(out) in line and "cannot write to the run folder" in line


def test_too_little_free_space_is_detected_before_training(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    real_disk_usage = shutil.disk_usage
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * 2**20, 9 * 2**20, 2**20))
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config)) == 7
    line = one_error_line(capsys)
    assert "1 MiB free" in line and "--keep-checkpoints" in line
    assert nothing_trained(out)

    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)  # space freed: the same command now works
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--max-steps", "1")) == 0


def failing_torch_save(fail_on_call: int):
    """torch.save that runs out of room part-way, on the given call: the OS refuses every write past
    1 MiB (RLIMIT_FSIZE: EFBIG, "File too large"; Python ignores SIGXFSZ), so torch's own writer
    fails mid-file as it does on a full disk (no root, no tmpfs needed)."""
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) != fail_on_call:
            return real_save(obj, f, *args, **kwargs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
        try:
            return real_save(obj, f, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return save


def test_disk_full_during_checkpoint_keeps_the_last_good_one(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    # 16 pairs, batch 4, 2 epochs: 8 steps; a checkpoint after every step
    args = ("--batch-size", "4", "--epochs", "2", "--save-every", "1", "--log-every", "1")
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, reference, tiny_config, *args)) == 0

    monkeypatch.setattr(torch, "save", failing_torch_save(fail_on_call=3))
    capsys.readouterr()
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args)) == 7  # was 1: torch's RuntimeError
    line = one_error_line(capsys)
    assert "File too large" in line and "step-00000003.pt" in line and "--resume" in line
    assert checkpoint_steps(out) == [1, 2]  # nothing pruned for a checkpoint that never landed
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("step-")] == []  # no temp file
    for step in (1, 2):
        assert torch.load(out / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)["position"]["step"] == step

    monkeypatch.undo()  # space freed: resuming finishes the same run
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args, "--resume")) == 0
    left, right = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_disk_full_at_the_first_checkpoint_says_to_start_again(pairs_dir, tiny_config, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setattr(torch, "save", failing_torch_save(fail_on_call=1))
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--batch-size", "4", "--save-every", "1")) == 7
    line = one_error_line(capsys)
    assert "File too large" in line and "no checkpoint was kept" in line and "--overwrite" in line
    assert "--resume" not in line and checkpoint_steps(out) == []


def test_resume_counts_only_the_space_it_adds(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    """A run that filled its disk resumes on it: the checkpoints it rotates out count as free."""
    out = tmp_path / "run"
    args = ("--batch-size", "4", "--epochs", "2", "--save-every", "1", "--keep-checkpoints", "2")
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args, "--max-steps", "3")) == 0
    on_disk = sum(p.stat().st_size for p in (out / "checkpoints").iterdir())
    model = (out / "model.safetensors").stat().st_size
    (out / "model.safetensors").unlink()  # as if it had stopped before the end
    Usage = namedtuple("Usage", "total used free")
    # a checkpoint and the model: more than the resume adds (one checkpoint at a time), less than a new run
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * on_disk, 9 * on_disk, model + on_disk // 2))
    capsys.readouterr()
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args, "--resume")) == 0, capsys.readouterr().err
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * on_disk, 9 * on_disk, model // 2))
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, *args, "--resume")) == 7  # less than a checkpoint


def test_disk_full_while_writing_metrics_is_an_output_error(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    import clipfit.io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(clipfit.io.os, "fsync", full)
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config)) == 7
    assert "No space left on device" in one_error_line(capsys)


# --- non-finite losses --------------------------------------------------------------------------

def loss_with_nan_at(steps: set[int]):
    """Contrastive.losses, but NaN on the given (1-based) steps."""
    def losses(self, step, wanted):
        value = clip_loss(step.image, step.text, step.logit_scale)
        return {"clip": value * float("nan") if step.step + 1 in steps else value}

    return losses


def test_nan_loss_stops_naming_step_and_term(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Contrastive, "losses", loss_with_nan_at({3}))
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--batch-size", "4", "--save-every", "1")) == 5
    line = one_error_line(capsys)
    assert "non-finite loss at step 3, term(s) clip" in line
    assert "last good checkpoint is kept" in line and "--lr" in line and "--precision" in line
    assert checkpoint_steps(out) == [1, 2]
    assert not (out / "model.safetensors").exists()  # no half-trained model passed off as a result


def test_nan_loss_before_any_checkpoint_says_so(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Contrastive, "losses", loss_with_nan_at({1}))
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config)) == 5
    line = one_error_line(capsys)
    assert "step 1" in line and "no checkpoint was written yet" in line


def test_huge_learning_rate_stops_with_exit_5(pairs_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--lr", "1e30", "--batch-size", "4")) == 5
    assert "non-finite" in one_error_line(capsys)


def test_nan_gradient_is_caught_before_it_reaches_a_checkpoint(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    def losses(self, step, wanted):
        value = clip_loss(step.image, step.text, step.logit_scale)
        if step.step + 1 == 2:  # finite loss, NaN gradient: the torch.where trap
            x = step.image_raw.sum()
            value = value + torch.where(torch.tensor(True), 0 * x, torch.sqrt(-x.abs() - 1))
        return {"clip": value}

    monkeypatch.setattr(Contrastive, "losses", losses)
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--batch-size", "4", "--save-every", "1")) == 5
    assert "non-finite weights after step 2" in one_error_line(capsys)
    assert checkpoint_steps(out) == [1]
    state = torch.load(out / "checkpoints" / "step-00000001.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def loss_with_nan_once(at_call: int):
    calls = []

    def losses(self, step, wanted):
        calls.append(step.step)
        value = clip_loss(step.image, step.text, step.logit_scale)
        return {"clip": value * float("nan") if len(calls) == at_call else value}

    return losses


def test_nan_policy_skip_skips_up_to_the_limit(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Contrastive, "losses", loss_with_nan_once(at_call=2))
    out = tmp_path / "run"
    # 16 pairs, batch 4: 4 micro-batches; one is skipped, 3 steps remain
    argv = tiny_refine_args(pairs_dir, out, tiny_config, "--batch-size", "4", "--nan-policy", "skip", "--nan-limit", "1")
    assert run_main(argv) == 0
    assert "non-finite loss at step 2, term(s) clip: step skipped (1/1)" in capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 3 and run["nan_skipped_steps"] == 1


def test_nan_policy_skip_gives_up_past_the_limit(pairs_dir, tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Contrastive, "losses", loss_with_nan_at({2}))  # step 2 never succeeds: NaN every time
    argv = tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config, "--batch-size", "4", "--nan-policy", "skip",
                            "--nan-limit", "2")
    assert run_main(argv) == 5
    line = one_error_line(capsys)
    assert "too many skipped steps (2, --nan-limit)" in line and "step 2" in line


@pytest.mark.parametrize("flag", ["--nan-limit", "--keep-checkpoints"])
def test_limits_must_be_positive(flag, pairs_dir, tiny_config, tmp_path, capsys):
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config, flag, "0")) == 2
    assert flag in one_error_line(capsys)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from clipfit.io import write_text

    previous = os.umask(0o022)
    try:
        write_text(tmp_path / "report.md", "hello")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644
