"""Every long phase shows progress with an ETA through the command's Progress: plain lines when
the output is not a terminal, a rich bar on one, nothing when quiet."""

from __future__ import annotations

import io

import pytest
import torch

from clipfit.data.pairs import Pair
from clipfit.features import text_bank
from clipfit.progress import PlainProgress, Progress, RichProgress, activate, phase


@pytest.fixture
def restore_progress():
    yield
    activate(Progress(silent=True))


def captions_bank(pairs: int = 10) -> torch.Tensor:
    items = [Pair(image=None, captions=(f"caption {i}",), key=str(i)) for i in range(pairs)]
    return text_bank(items, lambda texts: torch.ones(len(texts), 4), batch_size=4)


def test_a_bank_build_prints_plain_lines_with_an_eta_and_the_total(restore_progress):
    stream = io.StringIO()
    activate(PlainProgress(stream, every_seconds=0))
    captions_bank(10)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("bank: captions: 4/10, about ") and lines[0].endswith(" left")
    assert lines[1].startswith("bank: captions: 8/10, about ")
    assert lines[-1].startswith("bank: captions: 10/10 in ")


def test_a_quiet_progress_shows_no_phase(restore_progress):
    stream = io.StringIO()
    activate(Progress(stream))
    captions_bank(10)
    assert stream.getvalue() == ""


def test_the_rich_bar_keeps_counts_and_eta_visible_at_100_columns(restore_progress):
    from rich.console import Console

    progress = RichProgress(io.StringIO())
    long_row = {"step": 2, "epoch": 0, "lr": 1e-5, "pairs_per_s": 8.6,
                **{f"term_{i}": 1.2345 for i in range(12)}, "loss": 5.0}
    progress.plan(epochs=3, per_epoch=20)
    with progress:
        progress.step(long_row, total=60)
        progress.step({**long_row, "step": 22, "epoch": 1}, total=60)
        with phase("precompute: images", 480) as shown:  # not active: drawn by nothing
            shown.advance(10)
        with progress.phase("precompute: images", 480) as shown:
            shown.advance(144)
            screen = Console(file=io.StringIO(), width=100, color_system=None)
            screen.print(progress.bar.make_tasks_table(progress.bar.tasks))
            text = screen.file.getvalue()
    training, epoch, precompute = text.splitlines()
    assert training.startswith("refine") and " 22/60 " in training and "step 22" in training
    assert epoch.startswith("epoch 2/3") and " 2/20 " in epoch  # a bar per epoch, counting its own steps
    assert training.endswith("…") and len(training) <= 100  # the loss line is what gets cut
    assert precompute.startswith("precompute: images") and "144/480" in precompute
    assert len(progress.bar.tasks) == 2  # the phase's bar is gone once the phase ends
