"""examples/label_results.py's verdict: drawn from paired differences, saying where FLYP does not beat
the naive row (issue 23's "Show it"). Hand-made numbers; the runs themselves are the script's business."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import label_results  # noqa: E402


def seeds(*top1: float, ece: float = 10.0, held: tuple[float, float] = (60.0, 58.0)) -> dict[int, dict]:
    return {seed: {"id": value, "ece": ece, "held_before": held[0], "held_after": held[1]}
            for seed, value in enumerate(top1)}


def test_the_verdict_names_the_sizes_where_flyp_beats_the_naive_row_and_where_it_does_not():
    results = {10: {"naive": seeds(40, 42, 41), "flyp": seeds(46, 47, 48)},  # +6: every seed, above the noise
               50: {"naive": seeds(60, 62, 61), "flyp": seeds(63, 60, 62)}}  # +1, −2, +1: not clear
    line, = label_results.verdict_lines(results, n_test=300, n_held=359)
    assert "ID top-1 10/class +6.0; 50/class +0.7 (not clear)." in line
    assert "beats naive: class names, one-hot on ID top-1 at 10 per class, and does **not** at 50 per class." in line
    assert "Held-out change 10/class +0.0 (not clear); 50/class +0.0 (not clear)." in line


def test_a_difference_smaller_than_one_image_is_not_clear_however_well_the_seeds_agree():
    results = {10: {"naive": seeds(40.0, 41.0, 42.0), "flyp": seeds(40.2, 41.2, 42.3)}}
    line, = label_results.verdict_lines(results, n_test=300, n_held=359)  # one image is 0.33 points
    assert "ID top-1 10/class +0.2 (not clear)." in line
    assert "does **not** beat naive: class names, one-hot on ID top-1 at any size." in line
    wide = {10: {"naive": seeds(40.0, 41.0, 42.0), "flyp": seeds(41.0, 42.0, 43.5)}}
    line, = label_results.verdict_lines(wide, n_test=300, n_held=359)
    assert "beats naive: class names, one-hot on ID top-1 at every size." in line


def test_rows_missing_a_partner_give_no_verdict_and_the_probe_is_compared_on_top1_only():
    results = {10: {"flyp": seeds(50, 52, 51), "probe": {s: {"id": v} for s, v in enumerate((70, 71, 72))}}}
    line, = label_results.verdict_lines(results, n_test=300, n_held=359)
    assert line.startswith("- **FLYP (multi-positive) − linear probe** (points): ID top-1 10/class -20.0.")
    assert "Held-out" not in line and "does **not** beat linear probe" in line
