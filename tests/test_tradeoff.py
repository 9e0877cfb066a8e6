"""Choosing the trade-off (issue 26): model soups (`clipfit soup`, `sweep --soup`), WiSE-FT on any
run and its α rule, the Pareto front. The maths and the rules on hand-made numbers first, then
the real CLI on tiny runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_main, tiny_refine_args, write_pairs
from clipfit.derived import Measured
from clipfit.errors import UsageError
from clipfit.interpolate import alpha_rule, choose_alpha
from clipfit.selection import Rule, TradeoffPoint, pareto_front
from clipfit.soup import check_same_start, greedy_soup, stock_soup, uniform_soup, update_cosine
from test_eval_zeroshot import write_image_folder

HELD_OUT = "zeroshot/heldout/acc1"


# --- the maths --------------------------------------------------------------------------------

def test_the_uniform_soup_of_two_runs_is_exactly_their_mean():
    torch.manual_seed(0)
    a = {"w": torch.randn(7, 5), "b": torch.randn(5, dtype=torch.float64), "ids": torch.arange(3)}
    b = {"w": torch.randn(7, 5), "b": torch.randn(5, dtype=torch.float64), "ids": torch.arange(3) + 1}
    soup = uniform_soup([a, b])
    assert torch.equal(soup["w"], (a["w"] + b["w"]) / 2) and soup["w"].dtype == torch.float32
    assert torch.equal(soup["b"], (a["b"] + b["b"]) / 2)
    assert torch.equal(soup["ids"], a["ids"])  # integer buffers are the first run's


def test_model_stock_ratio_and_weights_match_a_hand_computation():
    start = {"w": torch.tensor([0.0, 0.0]), "frozen": torch.tensor([3.0])}
    runs = [{"w": torch.tensor([1.0, 0.0]), "frozen": torch.tensor([3.0])},
            {"w": torch.tensor([1.0, 1.0]), "frozen": torch.tensor([3.0])}]
    # cos θ = 1/√2, so t = 2·cos θ / (1 + cos θ) = 2 / (√2 + 1) = 2(√2 − 1); θ_avg = (1, 0.5)
    t = 2 * (math.sqrt(2) - 1)
    soup, ratios = stock_soup(start, runs)
    assert ratios["w"] == pytest.approx(t, abs=1e-12) and ratios["frozen"] is None
    assert torch.allclose(soup["w"], torch.tensor([t * 1.0, t * 0.5]), atol=1e-7)
    assert torch.equal(soup["frozen"], start["frozen"])  # no run changed it: the start's

    # three runs: pairwise cosines 0, 1/√2, 1/√2, mean √2/3; t = 3c / (1 + 2c); θ_avg = (2/3, 2/3, 0)
    start3 = {"w": torch.zeros(3)}
    runs3 = [{"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0, 0.0])}]
    c = math.sqrt(2) / 3
    t3 = 3 * c / (1 + 2 * c)
    soup3, ratios3 = stock_soup(start3, runs3)
    assert update_cosine([r["w"] for r in runs3]) == pytest.approx(c, abs=1e-12)
    assert ratios3["w"] == pytest.approx(t3, abs=1e-12)
    assert torch.allclose(soup3["w"], torch.tensor([t3 * 2 / 3, t3 * 2 / 3, 0.0]), atol=1e-7)

    # updates that point apart: cos θ = −1 is clipped to 0, so the tensor stays at the start
    apart, ratio = stock_soup(start, [{"w": torch.tensor([1.0, 0.0]), "frozen": torch.tensor([3.0])},
                                      {"w": torch.tensor([-1.0, 0.0]), "frozen": torch.tensor([3.0])}])
    assert ratio["w"] == 0.0 and torch.equal(apart["w"], start["w"])


def measurement(r1: float, top1: float) -> dict[str, float]:
    return {"image_to_text_R@1": r1, "text_to_image_R@1": r1, HELD_OUT: top1}


def test_greedy_keeps_runs_that_do_not_make_the_soup_worse_or_forget():
    start = measurement(20, 50)
    labels = ["a", "b", "c", "d", "e"]
    afters = [measurement(30, 50), measurement(40, 49.5), measurement(35, 50), measurement(20, 50),
              measurement(50, 45)]  # e scores best but forgets 5 points: it cannot start the soup
    soups = {frozenset("be"): measurement(45, 48), frozenset("bc"): measurement(41, 50),
             frozenset("bca"): measurement(41, 50),  # no worse: a joins
             frozenset("bcad"): measurement(44, 47)}  # better, but 3 points below the start
    tried = []

    def measure(indices):
        tried.append([labels[i] for i in indices])
        return soups[frozenset(labels[i] for i in indices)]

    kept, best, steps = greedy_soup(labels, afters, start, Rule("mean-R@1", 1.0), measure)
    assert [labels[i] for i in kept] == ["b", "c", "a"] and best == soups[frozenset("bca")]
    assert tried == [["b", "e"], ["b", "c"], ["b", "c", "a"], ["b", "c", "a", "d"]]  # best score first
    assert [(s.label, s.eligible, s.kept) for s in steps] == [
        ("b", True, True), ("+ e", False, False), ("+ c", True, True), ("+ a", True, True), ("+ d", False, False)]
    assert steps[1].zeroshot_drop == 2 and steps[-1].score == 44

    unguarded, _, _ = greedy_soup(labels, afters, start, Rule("mean-R@1", None), lambda i: measurement(10, 0))
    assert [labels[i] for i in unguarded] == ["e"]  # without a limit the best run starts; worse soups stay out


def test_the_alpha_rule_keeps_the_best_target_within_the_retention_limit_else_the_start():
    start = measurement(20, 50)
    alphas = [0.25, 0.5, 0.75, 1.0]
    measured = [measurement(22, 50), measurement(25, 49.5), measurement(28, 48.5), measurement(30, 46)]
    alpha, after, choice = choose_alpha(alphas, measured, start, Rule("mean-R@1", 1.0))
    assert alpha == 0.5 and after is measured[1] and choice.eligible == [True, True, False, False]
    assert choose_alpha(alphas, measured, start, Rule("mean-R@1", 2.0))[0] == 0.75
    alpha, after, choice = choose_alpha(alphas, measured, start, Rule("mean-R@1", -1.0))  # demands a rise
    assert (alpha, after, choice.index) == (0.0, start, None)
    assert "the start (α = 0) is kept" in choice.reason(Rule("mean-R@1", -1.0), "the start (α = 0) is kept")
    assert choose_alpha([0.5], measured[3:], start, None)[:2] == (0.5, measured[3])  # one α: no choice


def test_the_alpha_rule_defaults_to_one_point_with_held_out_sets_and_says_what_works_without_any():
    with_sets = Measured(True, ["heldout"], ["validation"])
    assert alpha_rule(Path("run"), with_sets, [0.5, 1], None, None, None, None) == ("mean-R@1", Rule("mean-R@1", 1.0))
    assert alpha_rule(Path("run"), with_sets, [0.5, 1], None, None, 3.0, 2.0)[1].max_zeroshot_drop == 3.0
    assert alpha_rule(Path("run"), with_sets, [0.5, 1], None, None, None, 2.0)[1].max_zeroshot_drop == 2.0
    retrieval_only = Measured(False, [], ["test"])
    assert alpha_rule(Path("run"), retrieval_only, [0.5, 1], None, None, None, None) == (
        "retrieval/test/image_retrieval_recall@1", Rule("retrieval/test/image_retrieval_recall@1", None))
    labelled = Measured(True, [], ["validation"], classes=3)  # a folder of classes: its split's top-1
    assert alpha_rule(Path("run"), labelled, [0.5, 1], None, None, None, None) == ("val/acc1", Rule("val/acc1", None))
    nothing = Measured(False, [], [])
    assert alpha_rule(Path("run"), nothing, [0.5], None, None, None, None) == (None, None)
    with pytest.raises(UsageError, match="give one --alpha, or sets to measure each α on"):
        alpha_rule(Path("run"), nothing, [0.5, 1], None, None, None, None)
    with pytest.raises(UsageError, match="no zero-shot set is measured"):
        alpha_rule(Path("run"), retrieval_only, [0.5, 1], None, None, 1.0, None)
    with pytest.raises(UsageError, match="expected a finite number"):
        alpha_rule(Path("run"), with_sets, [0.5, 1], None, None, float("nan"), None)


def test_a_sweep_without_validation_chooses_by_its_first_retrieval_set_and_guards_only_zero_shot(tmp_path):
    from clipfit.sweep import sweep_rule

    pairs = str(tmp_path / "test")
    assert sweep_rule({"val_split": 0.0, "eval_retrieval": [pairs]}, {}) == Rule(
        "retrieval/test/image_retrieval_recall@1", None)
    assert sweep_rule({"val_split": 0.3}, {"lr": [1e-3, 1e-4]}) == Rule("mean-R@1", None)
    assert sweep_rule({"val_split": 0.3, "eval_zeroshot": [f"folder={tmp_path / 'held'}"]}, {}).max_zeroshot_drop == 1.0
    with pytest.raises(UsageError, match="give --val-split"):
        sweep_rule({"val_split": 0.0}, {})


def test_a_crowded_trade_off_plot_labels_only_the_front_and_the_chosen_point():
    from clipfit.report_figures import MAX_LABELS, labelled

    few = [TradeoffPoint(f"p{i}", float(i), -float(i), "run") for i in range(3)]
    assert labelled(few, few[:1], None) == few
    many = [TradeoffPoint(f"p{i}", float(i % 5), -float(i), "run") for i in range(MAX_LABELS + 1)]
    front = [many[i] for i in pareto_front(many)]
    assert labelled(many, front, "p7") == [p for p in many if p in front or p.label == "p7"]
    assert len(labelled(many, front, "p7")) < len(many)


def test_the_pareto_front_holds_the_points_nothing_beats_on_both_axes():
    points = [TradeoffPoint("start", 0, 0), TradeoffPoint("a", 5, -4), TradeoffPoint("b", 3, -1),
              TradeoffPoint("c", 2, -3), TradeoffPoint("d", 5, -4), TradeoffPoint("e", 1, None),
              TradeoffPoint("f", -1, 1)]
    assert [points[i].label for i in pareto_front(points)] == ["start", "a", "b", "d", "f"]


def test_runs_of_another_architecture_are_refused_naming_the_odd_run():
    def saved(arch, fingerprint):
        return {"model": {"arch": arch}, "config": {}, "start": {"model": "m", "pretrained": "p", "seed": None,
                                                                 "fingerprint": fingerprint}}
    check_same_start([Path("a"), Path("b")], [saved("x", "1"), saved("x", "1")])
    with pytest.raises(UsageError, match=r"^c: another architecture \(y from m \(p\)\) than a"):
        check_same_start([Path("a"), Path("b"), Path("c")], [saved("x", "1"), saved("x", "1"), saved("y", "1")])


# --- the real CLI on tiny runs ----------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tradeoff")
    write_pairs(root / "pairs", n=24, size=16)
    zeroshot = write_image_folder(root / "heldout", per_class=2)
    (zeroshot / "templates.txt").write_text("a photo of a {c}.\n")  # one prompt: cheap to measure
    return root


@pytest.fixture(scope="module")
def start_weights(root, tiny_config) -> Path:
    from clipfit.models import load_model

    torch.manual_seed(3)
    path = root / "start.safetensors"
    save_file({k: v.contiguous() for k, v in load_model(str(tiny_config), "none").model.state_dict().items()}, str(path))
    return path


def train(root: Path, config: Path, start: Path, name: str, *extra: str) -> Path:
    out = root / name
    if not (out / "run.json").is_file():
        argv = tiny_refine_args(root / "pairs", out, config, "--pretrained", str(start), "--epochs", "2", *extra)
        assert run_main(argv) == 0
    return out


def measured_run(root, config, start, name, lr, *extra) -> Path:
    """A run measured on a validation split and the held-out zero-shot folder."""
    return train(root, config, start, name, "--lr", lr, "--val-split", "0.3",
                 "--eval-zeroshot", f"folder={root / 'heldout'}", *extra)


def info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def floats(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if v.is_floating_point()}


def test_soup_writes_the_exact_mean_of_two_runs_as_a_normal_run_folder(root, tiny_config, start_weights, capsys):
    a = measured_run(root, tiny_config, start_weights, "a", "1e-3")
    b = measured_run(root, tiny_config, start_weights, "b", "3e-3")
    kept = {p.name: p.stat().st_mtime_ns for run in (a, b) for p in run.iterdir() if p.is_file()}
    out = root / "soup"
    assert run_main(["soup", a, b, "--out", out]) == 0
    assert "uniform soup of 2 of 2 runs: a, b" in capsys.readouterr().out
    wa, wb, soup = floats(a / "model.safetensors"), floats(b / "model.safetensors"), floats(out / "model.safetensors")
    assert soup.keys() == wa.keys() and all(torch.equal(soup[k], (wa[k] + wb[k]) / 2) for k in wa)
    record = info(out)
    assert record["clipfit"] == "soup" and record["soup"]["ingredients"] == ["a", "b"]
    assert record["before"] == info(a)["before"] and record["start"] == info(a)["start"]
    assert set(record["after"]) == set(info(a)["after"])  # measured as the runs were, every set
    report = (out / "report.md").read_text()
    assert "# clipfit soup: uniform of 2 runs" in report and "| a | contrastive | 0.0010 |" in report
    assert "## Before → after (validation)" in report and "heldout" in report
    from clipfit.models import load_model
    assert load_model(str(out)).arch == info(a)["model"]["arch"]  # loads like any run folder
    assert {p.name: p.stat().st_mtime_ns for run in (a, b) for p in run.iterdir() if p.is_file()} == kept


def test_soup_refuses_runs_of_another_start_before_writing_anything(root, tiny_config, start_weights, tmp_path, capsys):
    a = measured_run(root, tiny_config, start_weights, "a", "1e-3")
    other = tmp_path / "other.safetensors"
    state = load_file(str(start_weights))
    save_file({k: (v + 1 if v.is_floating_point() else v) for k, v in state.items()}, str(other))
    odd = train(root, tiny_config, other, "odd-start", "--lr", "1e-3", "--val-split", "0.3")
    out = tmp_path / "soup"
    assert run_main(["soup", a, odd, "--out", out, "--recipe", "stock"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"clipfit: error: {odd}: other starting weights") and str(a) in line
    assert not out.exists()


def test_soup_refuses_a_run_that_held_out_other_validation_pairs(root, tiny_config, start_weights, tmp_path, capsys):
    a = measured_run(root, tiny_config, start_weights, "a", "1e-3")
    reseeded = measured_run(root, tiny_config, start_weights, "seed-1", "1e-3", "--seed", "1")
    out = tmp_path / "soup"
    assert run_main(["soup", a, reseeded, "--out", out]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"clipfit: error: {reseeded}: held out other validation pairs than {a}")
    assert not out.exists()


def test_soup_and_interpolate_never_write_into_the_runs_pairs(root, tiny_config, start_weights, capsys):
    a = measured_run(root, tiny_config, start_weights, "a", "1e-3")
    b = measured_run(root, tiny_config, start_weights, "b", "3e-3")
    listing = sorted(p.name for p in (root / "pairs").iterdir())
    assert run_main(["soup", a, b, "--out", root / "pairs" / "soup"]) == 2
    assert "PAIRS" in capsys.readouterr().err
    assert run_main(["interpolate", a, "--alpha", "0.5", "--out", root / "pairs" / "wise"]) == 2
    assert "PAIRS" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "pairs").iterdir()) == listing


def test_greedy_soup_follows_its_recorded_steps(root, tiny_config, start_weights):
    a = measured_run(root, tiny_config, start_weights, "a", "1e-3")
    b = measured_run(root, tiny_config, start_weights, "b", "3e-3")
    c = measured_run(root, tiny_config, start_weights, "c", "1e-2")
    out = root / "greedy"
    assert run_main(["soup", a, b, c, "--out", out, "--recipe", "greedy", "--quiet"]) == 0
    soup = info(out)["soup"]
    scores = {d.name: (info(d)["after"]["image_to_text_R@1"] + info(d)["after"]["text_to_image_R@1"]) / 2 for d in (a, b, c)}
    assert soup["metric"] == "mean-R@1" and soup["max_zeroshot_drop"] == 1.0  # the default guard
    first = soup["steps"][0]
    assert first["score"] == scores[first["label"]] and first["kept"]
    assert [s["label"] for s in soup["steps"]][1:] == [f"+ {n}" for n in sorted(scores, key=lambda n: -scores[n])
                                                      if n != first["label"]]
    kept = [s for s in soup["steps"] if s["kept"]]
    assert all(s["eligible"] for s in soup["steps"] if s["kept"] and s is not first)
    assert soup["ingredients"] == kept[-1]["runs"]
    after = info(out)["after"]
    assert (after["image_to_text_R@1"] + after["text_to_image_R@1"]) / 2 == kept[-1]["score"]


def test_a_soup_of_lora_runs_averages_their_merged_weights(root, tiny_config, start_weights):
    runs = [train(root, tiny_config, start_weights, f"lora-{lr}", "--lr", lr, "--lora", "--lora-rank", "2",
                  "--max-steps", "2") for lr in ("1e-3", "3e-3")]
    out = root / "lora-soup"
    assert run_main(["soup", *runs, "--out", out, "--quiet"]) == 0
    merged = [floats(r / "model.safetensors") for r in runs]
    soup = floats(out / "model.safetensors")
    assert all(torch.equal(soup[k], (merged[0][k] + merged[1][k]) / 2) for k in soup)
    assert not (out / "adapter").exists()


def test_interpolate_writes_one_alpha_of_a_run_without_validation(root, tiny_config, start_weights, capsys):
    run = train(root, tiny_config, start_weights, "no-val", "--lr", "1e-3")
    assert info(run)["eval_split"] == "training subset"
    out = root / "no-val-wise"
    assert run_main(["interpolate", run, "--alpha", "0.5", "--out", out]) == 0
    assert "kept α = 0.5: the only α given" in capsys.readouterr().out
    start, tuned, written = floats(start_weights), floats(run / "model.safetensors"), floats(out / "model.safetensors")
    assert all(torch.equal(written[k], torch.lerp(start[k], tuned[k], 0.5)) for k in start)
    record = info(out)
    assert set(record["after"]) == set(info(run)["after"]) and record["selection"] is None
    assert record["eval_split"] == "training subset"

    assert run_main(["interpolate", run, "--alpha", "0.25,0.75", "--out", root / "refused"]) == 2
    err = capsys.readouterr().err
    assert "give one --alpha, or sets to measure each α on" in err and "Traceback" not in err
    assert not (root / "refused").exists()

    chosen = root / "no-val-chosen"
    assert run_main(["interpolate", run, "--alpha", "0.25,0.75", "--out", chosen, "--quiet",
                     "--eval-zeroshot", f"folder={root / 'heldout'}", "--eval-retrieval", root / "pairs"]) == 0
    record = info(chosen)
    assert record["selection"]["metric"] == "retrieval/pairs/image_retrieval_recall@1"
    assert record["selection"]["max_zeroshot_drop"] == 1.0
    assert "zeroshot/heldout/acc1" in record["before"]  # the added sets, measured on the start too
    assert (chosen / "selection.png").is_file()


def test_interpolate_keeps_the_start_when_no_alpha_keeps_held_out_accuracy(root, tiny_config, start_weights, capsys):
    run = measured_run(root, tiny_config, start_weights, "b", "3e-3")
    out = root / "kept-start"
    assert run_main(["interpolate", run, "--alpha", "0.5,1", "--max-zeroshot-drop", "-100", "--out", out]) == 0
    assert "kept α = 0: no candidate kept held-out zero-shot top-1 within -100 points" in capsys.readouterr().out
    start, written = floats(start_weights), floats(out / "model.safetensors")
    assert all(torch.equal(written[k], start[k]) for k in start)
    record = info(out)
    assert record["after"] == record["before"] and record["interpolation"]["chosen"] == "start"
    assert "the start (α = 0) is kept" in (out / "report.md").read_text()


def test_sweep_soups_its_runs_and_shows_the_trade_off(root, tiny_config, start_weights, capsys):
    out = root / "sweep"
    argv = ["sweep", root / "pairs", "--model", tiny_config, "--pretrained", start_weights, "--out", out,
            "--lr", "1e-3,3e-3", "--val-split", "0.3", "--epochs", "2", "--batch-size", "8", "--workers", "0",
            "--eval-zeroshot", f"folder={root / 'heldout'}", "--select-best", "val/clip_loss",
            "--soup", "uniform,greedy", "--wise", "0.5", "--quiet"]
    assert run_main(argv) == 0
    summary = json.loads((out / "sweep.json").read_text())
    runs = [out / "01-lr=0.001", out / "02-lr=0.003"]
    assert [Path(s["run_dir"]).name for s in summary["soups"]] == ["soup-uniform", "soup-greedy"]
    means = [floats(r / "model.safetensors") for r in runs]
    uniform = floats(out / "soup-uniform" / "model.safetensors")
    assert all(torch.equal(uniform[k], (means[0][k] + means[1][k]) / 2) for k in uniform)
    labels = [c["label"] for c in summary["selection"]["candidates"]]
    assert labels == ["01-lr=0.001", "02-lr=0.003", "soup-uniform", "soup-greedy"]
    assert summary["selection"]["metric"] == "val/clip_loss" and summary["selection"]["max_zeroshot_drop"] == 1.0
    assert json.loads((out / "soup-greedy" / "run.json").read_text())["soup"]["metric"] == "val/clip_loss"
    assert Path(summary["wise"]["source_run"]).name == Path(summary["chosen_run"]).name
    assert summary["pareto"] and set(summary["pareto"]) <= set(labels) | {"start", "wise α=0.5", "wise α=1 (tuned)"}
    markdown = (out / "sweep.md").read_text()
    assert "Pareto-optimal" in markdown and all(f"`{label}`" in markdown for label in summary["pareto"])
    assert (out / "sweep.png").is_file() and "data:image/png;base64," in (out / "sweep.html").read_text()
    made = {d: (d / "model.safetensors").stat().st_mtime_ns for d in (out / "soup-uniform", out / "soup-greedy", out / "wise")}

    capsys.readouterr()
    assert run_main(argv[:-1]) == 0  # the same sweep again: nothing is made twice
    err = capsys.readouterr().err
    assert "soup-uniform made earlier, kept" in err and "wise made earlier, kept" in err
    assert {d: (d / "model.safetensors").stat().st_mtime_ns for d in made} == made
