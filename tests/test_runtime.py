"""Process-wide CPU settings (clipfit.runtime): freed memory is reused instead of faulted in again,
idle OpenMP threads sleep, and a user's own settings win over both."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clipfit.runtime import keep_freed_memory, sleep_idle_threads
from conftest import cli_env

# One "batch" of activations (40-80 MB tensors), made and freed ten times, as forward passes do.
BATCHES = """
import resource, sys
if sys.argv[1] == "keep":
    from clipfit.runtime import keep_freed_memory
    assert keep_freed_memory()
import torch
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    activations = [torch.ones(n * 1_000_000) for n in (10, 20, 15, 5)]
    del activations
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    env = {k: v for k, v in cli_env().items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", BATCHES, mode], capture_output=True, text=True, env=env, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_activations_are_reused_instead_of_faulted_in_at_every_batch():
    kept, default = page_faults("keep"), page_faults("default")
    # glibc's default maps each block afresh: ten batches' worth of pages (about 480k); kept, a few batches' worth
    assert default > 400_000 and kept * 3 < default


def test_the_users_allocator_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False


def test_idle_openmp_threads_sleep_unless_the_user_chose_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    sleep_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    sleep_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
