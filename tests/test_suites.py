"""Suites: several sets named at once (built-in, a TOML file, DATASET=PATH, wds/NAME), `clipfit eval
suite`'s table (markdown, JSON, CLIP_benchmark's CSV columns, the mean), `--eval-zeroshot` naming
them inside refine, and `clipfit compare` putting two suites side by side."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from clipfit.errors import UsageError
from clipfit.eval.suites import SetSpec, named, parse_specs
from conftest import run_cli, tiny_refine_args, write_pairs
from test_eval_zeroshot import write_image_folder
from test_wds import write_set

TINY = ("--workers", "0", "--batch-size", "8", "--device", "cpu")
CLIP_BENCHMARK_COLUMNS = ["acc1", "acc5", "mean_per_class_recall", "dataset", "model", "pretrained", "task",
                          "mean_average_precision", "image_retrieval_recall@5", "text_retrieval_recall@5",
                          "model_fullname"]  # its benchmark/benchmark.csv header


def test_builtin_suites_and_their_folders(tmp_path):
    hub = parse_specs(["robustness"])
    assert [s.dataset for s in hub] == ["wds/imagenet1k", "wds/imagenetv2", "wds/imagenet_sketch", "wds/imagenet-r",
                                        "wds/imagenet-a", "wds/objectnet"] and all(s.location is None for s in hub)
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    (tmp_path / "imagenetv2-matched-frequency-format-val").mkdir()
    local = {s.dataset: s.location for s in parse_specs([f"robustness={tmp_path}"])}  # WiSE-FT's data-location layout
    assert local == {"imagenet": str(tmp_path / "imagenet" / "val"),
                     "imagenet-v2": str(tmp_path / "imagenetv2-matched-frequency-format-val"),
                     "imagenet-sketch": str(tmp_path / "sketch"), "imagenet-r": str(tmp_path / "imagenet-r"),
                     "imagenet-a": str(tmp_path / "imagenet-a"), "objectnet": str(tmp_path / "objectnet-1.0")}
    vtab = parse_specs([f"vtab={tmp_path}"])
    assert len(vtab) == 19 and vtab[0] == SetSpec("wds/vtab/caltech101", str(tmp_path / "wds_vtab-caltech101"))
    assert list(named(vtab))[:2] == ["vtab_caltech101", "vtab_cifar100"]  # no '/' inside result keys


def test_suite_files(tmp_path):
    suite = tmp_path / "sets" / "mine.toml"
    suite.parent.mkdir()
    suite.write_text('imagenet-r = "/data/imagenet-r"\n"wds/cars" = "hf-hub:clip-benchmark/wds_cars"\n'
                     'flickr = {dataset = "wds/flickr30k", path = "flickr"}\n'
                     'mine = {dataset = "folder", path = "classes", templates = "prompts.txt"}\n')
    specs = named(parse_specs([str(suite), "imagenet=/data/val", "imagenet=/other/val"]))
    assert specs == {
        "imagenet-r": SetSpec("imagenet-r", "/data/imagenet-r"),
        "cars": SetSpec("wds/cars", "hf-hub:clip-benchmark/wds_cars"),
        "flickr": SetSpec("wds/flickr30k", str(suite.parent / "flickr"), "flickr"),  # relative to the file
        "mine": SetSpec("folder", str(suite.parent / "classes"), "mine", None, str(suite.parent / "prompts.txt")),
        "imagenet": SetSpec("imagenet", "/data/val"), "imagenet-2": SetSpec("imagenet", "/other/val")}
    assert specs["flickr"].task == "retrieval" and specs["cars"].task == "zeroshot"  # by name, as CLIP_benchmark
    for text, message in [('imagenet_r = "/x"', "not a dataset"), ('x = {dataset = "folder"}', "no path"),
                          ('x = {dataset = "folder", path = "p", prompts = "t"}', "unknown key 'prompts'"),
                          ("x = [", "not valid TOML")]:
        suite.write_text(text + "\n")
        with pytest.raises(UsageError, match=message):
            parse_specs([str(suite)])


@pytest.fixture(scope="module")
def sets(tmp_path_factory, tiny_config) -> dict[str, Path]:
    """A suite file with a folder set, a wds/ classification set and a wds/ retrieval set; two fixed models."""
    from safetensors.torch import save_file

    from clipfit.models import load_model

    root = tmp_path_factory.mktemp("suite")
    write_image_folder(root / "classes", per_class=2)
    write_set(root / "shards", "classification")
    write_set(root / "captions", "retrieval", n=10)
    (root / "suite.toml").write_text('classes = {dataset = "folder", path = "classes"}\n"wds/mine" = "shards"\n'
                                     'captions = {dataset = "wds/flickr30k", path = "captions"}\n')
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = load_model(str(tiny_config), "none").model.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / f"weights-{seed}.safetensors"))
    return {"root": root, "suite": root / "suite.toml", "weights": [root / f"weights-{s}.safetensors" for s in (0, 1)]}


def evaluate_suite(sets, tiny_config, out: Path, seed: int = 0, *extra: str):
    return run_cli("eval", "suite", sets["suite"], "--model", tiny_config, "--pretrained", sets["weights"][seed],
                   *TINY, "--out", out, "--cache-dir", out.parent / f"cache-{out.name}", *extra)


def test_eval_suite_writes_one_table_in_three_forms(sets, tiny_config, tmp_path):
    result = evaluate_suite(sets, tiny_config, tmp_path / "a")
    assert result.returncode == 0, result.stderr
    suite = json.loads((tmp_path / "a" / "suite.json").read_text())
    names = [s["name"] for s in suite["sets"]]
    assert names == ["classes", "mine", "captions"] and [s["dataset"] for s in suite["sets"]] == \
        ["classes", "wds/mine", "wds/flickr30k"]
    one = run_cli("eval", "zeroshot", "wds/mine", "--data", sets["root"] / "shards", "--model", tiny_config,
                  "--pretrained", sets["weights"][0], *TINY, "--json", check=True)
    assert suite["sets"][1]["metrics"]["acc1"] == json.loads(one.stdout)["metrics"]["acc1"]  # the same evaluation
    metrics = [s["metrics"] for s in suite["sets"]]
    assert suite["mean"]["acc1"] == pytest.approx((metrics[0]["acc1"] + metrics[1]["acc1"]) / 2)
    assert suite["mean"]["ece"] == pytest.approx((metrics[0]["ece"] + metrics[1]["ece"]) / 2)
    retrieval_score = (metrics[2]["image_retrieval_recall@5"] + metrics[2]["text_retrieval_recall@5"]) / 2
    assert suite["mean"]["score"] == pytest.approx((metrics[0]["acc1"] + metrics[1]["acc1"] + retrieval_score) / 3)

    rows = list(csv.DictReader(io.StringIO((tmp_path / "a" / "suite.csv").read_text())))
    assert list(rows[0]) == CLIP_BENCHMARK_COLUMNS + ["ece"]  # CLIP_benchmark's columns, in its order
    assert [r["dataset"] for r in rows] == ["classes", "wds/mine", "wds/flickr30k", "mean"]
    assert float(rows[1]["acc1"]) == pytest.approx(metrics[1]["acc1"]) and rows[2]["task"] == "zeroshot_retrieval"
    assert float(rows[3]["acc1"]) == pytest.approx(suite["mean"]["acc1"])
    markdown = (tmp_path / "a" / "suite.md").read_text()
    assert "| set | dataset | top-1 | ECE |" in markdown and "| **mean** |" in markdown
    assert markdown.strip() in result.stdout


def test_eval_suite_never_overwrites_files_it_did_not_write(sets, tiny_config, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "suite.md").write_text("my notes\n")
    result = evaluate_suite(sets, tiny_config, tmp_path / "out")
    assert result.returncode == 7 and "suite.md: exists and is not a suite clipfit wrote" in result.stderr
    assert (tmp_path / "out" / "suite.md").read_text() == "my notes\n"
    (tmp_path / "notes.txt").write_text("mine\n")
    result = evaluate_suite(sets, tiny_config, tmp_path / "notes.txt")  # refused before any set is evaluated
    assert result.returncode == 2 and "notes.txt: --out is a file, not a folder" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_compare_puts_two_suites_side_by_side(sets, tiny_config, tmp_path):
    for seed, name in enumerate("ab"):
        assert evaluate_suite(sets, tiny_config, tmp_path / name, seed).returncode == 0
    result = run_cli("compare", tmp_path / "a", tmp_path / "b" / "suite.json", "--json", check=True)
    table = json.loads(result.stdout)["sets"]
    a, b = (json.loads((tmp_path / name / "suite.json").read_text()) for name in "ab")
    first, second = a["sets"][1]["metrics"], b["sets"][1]["metrics"]
    change = table["change"]["zeroshot/mine"]
    assert change["score"] == pytest.approx(100 * (second["acc1"] - first["acc1"]))
    assert change["ece"] == pytest.approx(100 * (second["ece"] - first["ece"]))
    assert table["mean_over"] == ["zeroshot/classes", "zeroshot/mine", "retrieval/captions"]
    assert table["mean_change"]["score"] == pytest.approx(100 * (b["mean"]["score"] - a["mean"]["score"]))
    shown = run_cli("compare", tmp_path / "a", tmp_path / "b", check=True).stdout
    assert table["ece_mean_over"] == ["zeroshot/classes", "zeroshot/mine"]  # a retrieval set has no ECE
    assert "mean (3 sets; ECE" in shown and "over 2)" in shown  # the label folds in an 80-column table


def test_refine_measures_a_suite_before_and_after(sets, tiny_config, tmp_path):
    pairs = write_pairs(tmp_path / "pairs", n=8)
    out = tmp_path / "run"
    result = run_cli(*tiny_refine_args(pairs, out, tiny_config, "--max-steps", "1", "--eval-zeroshot", str(sets["suite"]),
                                       "--eval-zeroshot", f"folder={sets['root'] / 'classes'}"))
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "run.json").read_text())
    for key in ("zeroshot/classes/acc1", "zeroshot/classes/ece", "zeroshot/mine/acc1", "zeroshot/classes-2/acc1",
                "retrieval/captions/text_retrieval_recall@5"):
        assert key in info["before"] and key in info["after"], key
    report = (out / "report.md").read_text()
    mine = report[report.index("### zeroshot · mine"):].splitlines()
    assert mine[4].startswith("| acc1 |") and mine[5].startswith("| ece |")  # calibration next to top-1
    assert "### Evaluation sets: top-1 and calibration" in report
    assert "| zeroshot/mine |" in report and "| **mean** (4 sets; ECE over 3) |" in report
