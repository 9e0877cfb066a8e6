"""--eval-every / --select-best / --patience / --max-zeroshot-drop, `clipfit interpolate` (WiSE-FT)
and `clipfit sweep`: the selection rule on scripted sequences, then the real CLI on the tiny model."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import checkpoint_steps, run_main, tiny_refine_args, write_pairs
from clipfit.errors import UsageError
from clipfit.interpolate import interpolate_state
from clipfit.io import read_jsonl
from clipfit.losses import clip_loss
from clipfit.methods import REGISTRY, register
from clipfit.methods.base import Method
from clipfit.selection import Rule, check_metric, choose, metric_value, patience_exhausted, selectable_metrics
from test_eval_zeroshot import write_image_folder


def measurement(loss=None, r1=None, top1=None, **extra) -> dict:
    m = dict(extra)
    if loss is not None:
        m["clip_loss"] = loss
    if r1 is not None:
        m["image_to_text_R@1"], m["text_to_image_R@1"] = r1
    if top1 is not None:
        m["zeroshot/heldout/acc1"] = top1
    return m


# --- the rule, on scripted sequences ------------------------------------------------------

LOSSES = [2.0, 1.5, 1.7, 1.4, 1.6, 1.65]
TOP1 = [50.0, 49.0, 47.0, 44.0, 48.0, 49.0]  # drops 0, 1, 3, 6, 2, 1 points from the start


def scripted() -> list[dict]:
    return [measurement(loss=l, top1=t) for l, t in zip(LOSSES, TOP1)]


def test_lowest_loss_wins_and_later_evaluations_count_towards_patience():
    choice = choose(scripted(), scripted()[0], Rule("val/clip_loss"))
    assert choice.index == 3 and choice.score == 1.4 and choice.since_best == 2
    assert choice.drops == [0.0, 1.0, 3.0, 6.0, 2.0, 1.0]
    assert not patience_exhausted(choice, 3) and patience_exhausted(choice, 2)


def test_max_zeroshot_drop_leaves_out_steps_that_forget_more():
    choice = choose(scripted(), scripted()[0], Rule("val/clip_loss", max_zeroshot_drop=3), [f"s{i}" for i in range(6)])
    assert choice.eligible == [True, True, True, False, True, True]  # a drop of exactly 3 is allowed
    assert choice.index == 1 and choice.since_best == 4
    assert "s1: lowest val/clip_loss (1.5) of 6 evaluated; 1 of 6" in choice.reason(Rule("val/clip_loss", 3))
    none = choose(scripted(), scripted()[0], Rule("val/clip_loss", max_zeroshot_drop=-1))  # demands a rise
    assert none.index is None and not any(none.eligible)


def test_higher_is_better_for_recall_ties_keep_the_earlier_and_mean_r1_averages_both_ways():
    seq = [measurement(r1=(10, 20)), measurement(r1=(30, 10)), measurement(r1=(20, 20)), measurement(r1=(25, 15))]
    assert [metric_value(m, "mean-R@1") for m in seq] == [15, 20, 20, 20]
    assert choose(seq, seq[0], Rule("mean-R@1")).index == 1
    assert choose(seq, seq[0], Rule("val/image_to_text_R@1")).index == 1
    assert choose(seq, seq[0], Rule("val/text_to_image_R@1")).index == 0
    gap = [measurement(**{"modality_gap": g}) for g in (0.5, 0.3, 0.4)]
    assert choose(gap, gap[0], Rule("val/modality_gap")).index == 1  # lower is better


def test_unmeasured_or_non_finite_scores_are_never_chosen():
    seq = [measurement(loss=2.0), {}, measurement(loss=float("nan")), measurement(loss=1.9)]
    choice = choose(seq, seq[0], Rule("val/clip_loss"))
    assert choice.eligible == [True, False, False, True] and choice.index == 3


def test_unknown_metric_lists_the_valid_ones():
    valid = selectable_metrics(True, ["fashion"], [])
    assert "zeroshot/fashion/acc1" in valid and "val/clip_loss" in valid and "mean-R@1" in valid
    with pytest.raises(UsageError, match=r"'zeroshot/cifar/acc1'.*valid: val/clip_loss"):
        check_metric("zeroshot/cifar/acc1", valid)
    assert selectable_metrics(False, [], []) == []


def test_interpolation_is_exact_at_both_ends_and_linear_between():
    torch.manual_seed(0)
    start = {"w": torch.randn(5, 3), "b": torch.randn(3), "ids": torch.arange(4)}
    tuned = {"w": torch.randn(5, 3), "b": torch.randn(3), "ids": torch.arange(4)}
    assert all(torch.equal(interpolate_state(start, tuned, 0.0)[k], start[k]) for k in start)
    assert all(torch.equal(interpolate_state(start, tuned, 1.0)[k], tuned[k]) for k in start)
    half = interpolate_state(start, tuned, 0.25)
    assert torch.allclose(half["w"], 0.75 * start["w"] + 0.25 * tuned["w"], atol=1e-6)
    with pytest.raises(UsageError, match="differ in their tensors"):
        interpolate_state(start, {"w": tuned["w"]}, 0.5)


# --- refine --select-best, end to end -----------------------------------------------------

TURN = 4  # ThereAndBack trains towards the pairs for this many steps, then away from them


class ThereAndBack(Method):
    """A scripted trajectory: the validation loss falls, then rises, so the best step is mid-run."""

    name = "there-and-back"
    terms = {"clip": 1.0}

    def losses(self, step, wanted):
        loss = clip_loss(step.image, step.text, step.logit_scale)
        return {"clip": loss if step.step < TURN else -loss}


@pytest.fixture(scope="module", autouse=True)
def registered():
    register("there-and-back", f"{__name__}:ThereAndBack", summary="test only: contrastive, reversed after step TURN")
    yield
    REGISTRY.pop("there-and-back", None)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("selection") / "pairs", n=40, size=16)


def select_args(pairs: Path, out: Path, config: Path, *extra: str) -> list[str]:
    """2 epochs of 4 steps, measured every 2 steps."""
    return tiny_refine_args(pairs, out, config, "--method", "there-and-back", "--epochs", "2", "--val-split", "0.2",
                            "--lr", "3e-4", "--eval-every", "2", "--select-best", "val/clip_loss", "--seed", "1", *extra)


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def selected_run(pairs, tiny_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("selected") / "run"
    assert run_main(select_args(pairs, out, tiny_config)) == 0
    return out


def test_select_best_keeps_the_best_evaluated_step_and_the_last_apart(selected_run):
    info = run_info(selected_run)
    selection = info["selection"]
    rows = [r for r in read_jsonl(selected_run / "metrics.jsonl") if "val_clip_loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    losses = {0: info["before"]["clip_loss"], **{r["step"]: r["val_clip_loss"] for r in rows}}
    best = min(losses, key=lambda s: (losses[s], s))
    assert selection["chosen_step"] == best and selection["last_step"] == 8
    assert 0 < best < 8, f"the scripted trajectory must turn for this test to mean anything: {losses}"
    assert info["after"]["clip_loss"] == losses[best] and info["last"]["clip_loss"] == losses[8]
    model, last = load_file(selected_run / "model.safetensors"), load_file(selected_run / "last.safetensors")
    assert not same_tensors(model, last)
    report = (selected_run / "report.md").read_text()
    assert f"`model.safetensors` holds step {best}" in report and selection["reason"] in report


def test_a_resumed_run_keeps_the_best_so_far_and_chooses_as_an_uninterrupted_one(selected_run, pairs, tiny_config,
                                                                                   tmp_path):
    """Stopped at the best step, whose weights and score must then survive in the checkpoint."""
    best = run_info(selected_run)["selection"]["chosen_step"]
    out = tmp_path / "resumed"
    assert run_main(select_args(pairs, out, tiny_config, "--max-steps", str(best))) == 0
    assert max(checkpoint_steps(out)) == best
    # the uninterrupted run's model.safetensors is that step's weights
    assert same_tensors(load_file(out / "last.safetensors"), load_file(selected_run / "model.safetensors"))
    assert run_main(select_args(pairs, out, tiny_config, "--resume")) == 0
    assert run_info(out)["selection"] == run_info(selected_run)["selection"]
    for name in ("model.safetensors", "last.safetensors"):
        assert same_tensors(load_file(out / name), load_file(selected_run / name)), name


def test_patience_stops_after_k_evaluations_without_a_new_best(pairs, tiny_config, tmp_path):
    """lr 1e-12 on the logit scale alone changes nothing, so no evaluation beats the start."""
    out = tmp_path / "run"
    argv = tiny_refine_args(pairs, out, tiny_config, "--epochs", "3", "--val-split", "0.2",
                            "--lock-image", "--lock-text", "--lr", "1e-12", "--eval-every", "1",
                            "--select-best", "mean-R@1", "--patience", "2")
    assert run_main(argv) == 0
    info = run_info(out)
    assert info["steps"] == 2 and info["resolved"]["total_steps"] == 12
    assert info["selection"]["stopped_early"] and info["selection"]["chosen_step"] == 0
    assert info["selection"]["steps"] == [0, 1, 2]
    assert "stopped early" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--select-best", "val/top1"], "choose one of val/clip_loss"),
    (["--select-best", "zeroshot/nothing/acc1"], "valid: val/clip_loss"),
    (["--patience", "2"], "needs --select-best"),
    (["--select-best", "mean-R@1", "--max-zeroshot-drop", "2"], "needs --select-best METRIC and --eval-zeroshot"),
])
def test_bad_selection_flags_are_usage_errors(args, message, pairs, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs, out, tiny_config, "--val-split", "0.2", *args)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "run.json").exists()


def test_max_zeroshot_drop_only_keeps_steps_within_the_limit_and_the_report_plots_them(pairs, tiny_config, tmp_path):
    images = write_image_folder(tmp_path / "zeroshot", per_class=2)
    (images / "templates.txt").write_text("a photo of a {c}.\n")  # one prompt: measured at every step
    out = tmp_path / "run"
    argv = select_args(pairs, out, tiny_config, "--eval-zeroshot", f"folder={images}", "--max-zeroshot-drop", "0",
                       "--epochs", "1", "--eval-every", "1", "--select-best", "mean-R@1", "--method", "contrastive")
    assert run_main(argv) == 0
    info = run_info(out)
    key = "zeroshot/zeroshot/acc1"
    rows = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if key in r}
    top1 = {0: info["before"][key], **{s: r[key] for s, r in rows.items()}}
    r1 = {0: (info["before"]["image_to_text_R@1"] + info["before"]["text_to_image_R@1"]) / 2,
          **{s: (r["val_image_to_text_R@1"] + r["val_text_to_image_R@1"]) / 2 for s, r in rows.items()}}
    eligible = [s for s in top1 if top1[s] >= top1[0]]
    expected = max(eligible, key=lambda s: (r1[s], -s))
    assert info["selection"]["chosen_step"] == expected
    assert [c["eligible"] for c in info["selection"]["candidates"]] == [s in eligible for s in sorted(top1)]
    html = (out / "report.html").read_text()
    assert (out / "selection.png").is_file() and html.count("data:image/png;base64,") == 3


# --- clipfit interpolate ------------------------------------------------------------------

@pytest.fixture(scope="module")
def start_weights(tiny_config, tmp_path_factory) -> Path:
    from clipfit.models import load_model

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("start") / "start.safetensors"
    save_file({k: v.contiguous() for k, v in load_model(str(tiny_config), "none").model.state_dict().items()}, str(path))
    return path


def test_interpolate_reproduces_start_and_merged_lora_weights_at_alpha_0_and_1(pairs, tiny_config, start_weights,
                                                                                tmp_path):
    """With LoRA the tuned weights are the merged model; full weights take the same path (model.safetensors)."""
    run = tmp_path / "run"
    argv = tiny_refine_args(pairs, run, tiny_config, "--pretrained", str(start_weights), "--val-split", "0.2",
                            "--lr", "1e-3", "--lora", "--lora-rank", "2", "--max-steps", "2")
    assert run_main(argv) == 0
    tuned, start = load_file(run / "model.safetensors"), load_file(start_weights)
    assert not same_tensors(tuned, start)
    for alpha, expected in (("0", start), ("1", tuned)):
        out = tmp_path / f"alpha{alpha}"
        assert run_main(["interpolate", run, "--alpha", alpha, "--out", out, "--quiet"]) == 0
        written = load_file(out / "model.safetensors")
        assert same_tensors({k: written[k] for k in expected}, expected)
    at0 = run_info(tmp_path / "alpha0")
    assert at0["after"] == pytest.approx(run_info(run)["before"], rel=1e-5)  # α = 0 measures as the start did
    assert at0["interpolation"]["alpha"] == 0.0


def test_interpolate_chooses_alpha_by_the_rule_and_writes_a_run_folder(selected_run, tmp_path, capsys):
    out = tmp_path / "wise"
    assert run_main(["interpolate", selected_run, "--tuned", "last", "--alpha", "0.25,0.5,1", "--out", out]) == 0
    info = run_info(out)
    measured = info["interpolation"]["measured"]
    losses = {label: m["clip_loss"] for label, m in measured.items()}
    assert info["selection"]["metric"] == "val/clip_loss"  # the run's own --select-best
    assert info["selection"]["chosen"] == min(losses, key=losses.get)
    assert measured["α=1"]["clip_loss"] == pytest.approx(run_info(selected_run)["last"]["clip_loss"], rel=1e-5)
    assert {"model.safetensors", "open_clip_config.json", "report.md", "report.html"} <= {p.name for p in out.iterdir()}
    assert "WiSE-FT interpolation" in (out / "report.md").read_text()
    assert run_main(["interpolate", selected_run, "--alpha", "1.5", "--out", tmp_path / "bad"]) == 2
    assert "[0, 1]" in capsys.readouterr().err


# --- clipfit sweep ------------------------------------------------------------------------

INTERRUPT_AT = 5


class InterruptOnce(Method):
    """Contrastive, plus a real SIGINT to this process during step INTERRUPT_AT of its first run,
    as Ctrl-C would send it: the loop finishes the step, checkpoints and stops."""

    name = "interrupt-once"
    terms = {"clip": 1.0}
    sent = False

    def losses(self, step, wanted):
        if step.step + 1 == INTERRUPT_AT and not InterruptOnce.sent:
            InterruptOnce.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return {"clip": clip_loss(step.image, step.text, step.logit_scale)}


def test_an_interrupted_sweep_resumes_skipping_finished_runs(tmp_path, tiny_config, capsys):
    if "interrupt-once" not in REGISTRY:
        register("interrupt-once", f"{__name__}:InterruptOnce", summary="test only: contrastive, Ctrl-C once at step INTERRUPT_AT")
    pairs = write_pairs(tmp_path / "pairs", n=40, size=16)
    out = tmp_path / "sweep"
    argv = ["sweep", pairs, "--model", tiny_config, "--pretrained", "none", "--out", out, "--lock-image",
            "--method", "contrastive,interrupt-once", "--lr", "1e-3", "--val-split", "0.2", "--workers", "0", "--batch-size", "4"]
    assert run_main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT after step 5" in err and "rerun the same clipfit sweep command to continue" in err
    first, second = out / "01-method=contrastive", out / "02-method=interrupt-once"
    assert run_info(first)["after"] and "after" not in run_info(second)
    assert checkpoint_steps(second) == [INTERRUPT_AT]
    untouched = {p.name: p.stat().st_mtime_ns for p in first.iterdir() if p.is_file()}

    assert run_main(argv) == 0
    err = capsys.readouterr().err
    assert "01-method=contrastive finished earlier, skipped" in err and "02-method=interrupt-once (resuming)" in err
    assert "feature cache hit: locked-rows" in err  # the frozen towers' outputs of the first run, reused
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir() if p.is_file()} == untouched
    steps = [r["step"] for r in read_jsonl(second / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and run_info(second)["steps"] == 8
    summary = json.loads((out / "sweep.json").read_text())
    assert [Path(r["run_dir"]).name for r in summary["runs"]] == [first.name, second.name]
    scores = {c["label"]: c["score"] for c in summary["selection"]["candidates"]}
    expected = {d.name: sum(run_info(d)["after"][f"{k}_R@1"] for k in ("image_to_text", "text_to_image")) / 2
                for d in (first, second)}
    assert scores == expected and summary["selection"]["chosen"] == max(expected, key=lambda n: (expected[n], n == first.name))
    assert "| method | contrastive | interrupt-once |" in (out / "sweep.md").read_text()
    assert '<div class="wide"><table>' in (out / "sweep.html").read_text()  # a grid of many runs scrolls


def test_a_folder_zero_shot_set_may_bring_its_own_prompts(tmp_path):
    from clipfit.eval.datasets import default_templates
    from clipfit.eval.sets import load_labelled

    root = write_image_folder(tmp_path / "classes", classes=["cat", "dog"], per_class=1)
    assert load_labelled("folder", root).templates == default_templates()
    (root / "templates.txt").write_text("a photo of a {c}.\nart of the {c}\n")
    data = load_labelled("folder", root)
    assert data.templates == ["a photo of a {c}.", "art of the {c}"] and data.classes == ["cat", "dog"]


def test_the_report_shows_the_held_out_drop_column_only_when_a_zero_shot_set_was_measured():
    from clipfit.report import candidates_table

    selection = {"metric": "mean-R@1", "chosen": "step 0 (start)", "candidates": [
        {"label": "step 0 (start)", "score": 21.4, "zeroshot_drop": None, "eligible": True},
        {"label": "step 2", "score": 20.0, "zeroshot_drop": None, "eligible": True}]}
    without = candidates_table(selection)
    assert "drop" not in without[0] and all(row.count("|") == 5 for row in without)
    selection["candidates"][1]["zeroshot_drop"] = -1.5
    with_drop = candidates_table(selection)
    assert "held-out zero-shot top-1 drop" in with_drop[0] and all(row.count("|") == 6 for row in with_drop)
    assert "-1.50" in with_drop[-1]


def test_points_say_point_for_one_and_points_otherwise():
    from clipfit.selection import points_text

    assert (points_text(1), points_text(1.0), points_text(2.5), points_text(0)) == ("1 point", "1 point", "2.5 points",
                                                                                     "0 points")
