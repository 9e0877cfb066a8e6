"""Evaluation and model loading on bad input: NaN weights, degenerate sets, strict JSON,
weights that do not fit, damaged run folders, malformed hub names, `compare` on non-runs.

Commands run in this process (clipfit.cli.main) on tiny random models and generated folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli, tiny_refine_args, write_pairs
from test_eval_zeroshot import write_image_folder
from clipfit import models
from clipfit.io import dumps_json, write_json

TINY = ("--workers", "0", "--batch-size", "8", "--device", "cpu")


def strict_json(text: str):
    """json.loads that fails on NaN / Infinity, as strict parsers (jq, JavaScript) do."""
    def refuse(constant):
        raise ValueError(f"invalid JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def one_line_error(result) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("clipfit: error:"), result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("robust-eval")
    return {"pairs": write_pairs(root / "pairs", n=6), "one-pair": write_pairs(root / "one-pair", n=1),
            "classes": write_image_folder(root / "classes", per_class=4),
            "one-class": write_image_folder(root / "one-class", classes=["cat"], per_class=5)}


@pytest.fixture(scope="module")
def weights(tiny_config, tmp_path_factory) -> dict[str, Path]:
    """Weight files for the tiny config: all-NaN, and one tensor of the wrong shape."""
    root = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in models.load_model(str(tiny_config), "none").model.state_dict().items()}
    nan = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in state.items()}
    save_file(nan, str(root / "nan.safetensors"))
    save_file({**state, "text_projection": torch.zeros(64, 16)}, str(root / "wrong-shape.safetensors"))
    return {"nan": root / "nan.safetensors", "wrong-shape": root / "wrong-shape.safetensors"}


# --- non-finite features ------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["retrieval", "geometry", "zeroshot", "linear-probe"])
def test_nan_weights_are_an_error_naming_the_model_not_a_perfect_score(command, tiny_config, weights, data):
    target = {"retrieval": [data["pairs"]], "geometry": [data["pairs"]],
              "zeroshot": ["folder", "--data", data["classes"]], "linear-probe": ["--data", data["classes"]]}[command]
    result = run_cli("eval", command, *target, "--model", tiny_config, "--pretrained", weights["nan"], *TINY, "--json")
    line = one_line_error(result)
    assert result.returncode == 5 and result.stdout == ""
    assert str(weights["nan"]) in line and "NaN or infinite" in line


def test_refine_refuses_a_starting_model_with_nan_outputs(tiny_config, weights, data, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*tiny_refine_args(data["pairs"], run, tiny_config, "--pretrained", weights["nan"], "--max-steps", "1"))
    line = one_line_error(result)
    assert result.returncode == 5 and "the starting model" in line and "NaN or infinite" in line
    assert not (run / "model.safetensors").exists()


def test_epoch_validation_names_the_model_after_that_epoch(tiny_config, weights, data):
    from clipfit.errors import TrainingError
    from clipfit.eval.encode import encoder_for
    from clipfit.eval.split import evaluate_split
    from clipfit.data.layouts import load_pairs

    loaded = models.load_model(str(tiny_config), str(weights["nan"]))
    encoder = encoder_for(loaded, loaded.model, torch.device("cpu"), 8, 0, "fp32", label="the model after epoch 2")
    with pytest.raises(TrainingError, match="the model after epoch 2: 6 of 6 embeddings"):
        evaluate_split(loaded.model, load_pairs(str(data["pairs"])).pairs, loaded, torch.device("cpu"), 8, encoder=encoder)


# --- degenerate sets and strict JSON --------------------------------------------------------------

def test_one_pair_warns_and_writes_strict_json_with_reasons(tiny_config, data, tmp_path):
    out = tmp_path / "one.json"
    result = run_cli("eval", "retrieval", data["one-pair"], "--model", tiny_config, "--pretrained", "none", *TINY,
                     "--json", "--out", out)
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "only 1 pair" in line]
    assert len(warning) == 1 and str(data["one-pair"]) in warning[0] and "100%" in warning[0]
    for record in (strict_json(result.stdout), strict_json(out.read_text())):
        assert record["metrics"]["image_retrieval_recall@1"] == 1.0
        assert record["metrics"]["uniformity_text"] is None and record["metrics"]["uniformity_image"] is None
        assert "at least 2 embeddings" in record["notes"]["/metrics/uniformity_text"]


def test_one_class_warns(tiny_config, data):
    result = run_cli("eval", "zeroshot", "folder", "--data", data["one-class"], "--model", tiny_config,
                     "--pretrained", "none", *TINY, "--json")
    assert result.returncode == 0, result.stderr
    assert strict_json(result.stdout)["metrics"]["acc1"] == 1.0
    assert sum("only 1 class" in line for line in result.stderr.splitlines()) == 1


def test_enough_pairs_give_no_degenerate_warning(tiny_config, data):
    result = run_cli("eval", "geometry", data["pairs"], "--model", tiny_config, "--pretrained", "none", *TINY, "--json")
    assert result.returncode == 0 and "whatever the model" not in result.stderr
    assert "notes" not in strict_json(result.stdout)


def test_refine_with_a_one_pair_validation_split_writes_strict_json(tiny_config, tmp_path):
    pairs, run = write_pairs(tmp_path / "pairs", n=4), tmp_path / "run"
    result = run_cli(*tiny_refine_args(pairs, run, tiny_config, "--val-split", "0.25", "--max-steps", "2", "--json"))
    assert result.returncode == 0, result.stderr
    assert "the validation split: only 1 pair" in result.stderr
    info = strict_json((run / "run.json").read_text())
    key = "retrieval/validation/uniformity_text"
    assert info["before"][key] is None and info["after"][key] is None and key not in info["delta"]
    assert "at least 2 embeddings" in info["notes"][f"/before/{key.replace('/', '~1')}"]
    assert strict_json(result.stdout)["after"][key] is None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    assert "| uniformity_text | n/a | n/a | n/a |" in (run / "report.md").read_text()
    compared = run_cli("compare", run, "--json")
    assert compared.returncode == 0 and strict_json(compared.stdout)["runs"][0]["after"][key] is None


def test_json_writer_turns_every_non_finite_number_into_null_with_a_reason(tmp_path):
    from clipfit.eval.metrics import undefined

    record = {"a": {"b/c": math.nan, "ok": 1.5}, "list": [math.inf, 2.0], "why": undefined("too few rows")}
    write_json(tmp_path / "x.json", record)
    written = strict_json((tmp_path / "x.json").read_text())
    assert written["a"] == {"b/c": None, "ok": 1.5} and written["list"] == [None, 2.0] and written["why"] is None
    assert written["notes"] == {"/a/b~1c": "not a finite number (nan)", "/list/0": "not a finite number (inf)",
                                "/why": "too few rows"}
    assert strict_json(dumps_json([math.nan])) == [None]  # no object to put notes in: still valid JSON


# --- model loading ---------------------------------------------------------------------------------

def test_weights_of_the_wrong_shape_name_the_tensor_and_both_shapes(tiny_config, weights, data):
    result = run_cli("eval", "retrieval", data["pairs"], "--model", tiny_config, "--pretrained", weights["wrong-shape"], *TINY)
    line = one_line_error(result)
    assert result.returncode == 4
    assert str(weights["wrong-shape"]) in line and "text_projection" in line and "[64, 16]" in line and "[64, 32]" in line


def saved_run_folder(tiny_config, folder: Path) -> Path:
    loaded = models.load_model(str(tiny_config), "none")
    folder.mkdir()
    models.save_model(loaded, loaded.model, folder)
    return folder


def test_a_run_folder_loads_its_own_weights(tiny_config, tmp_path):
    run = saved_run_folder(tiny_config, tmp_path / "run")
    saved = models.read_state_dict(run / "model.safetensors")
    torch.manual_seed(123)  # a different random init: equality shows the file was read
    loaded = models.load_model(str(run))
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a valid safetensors file"),
    (lambda p: p.write_bytes(b""), "not a valid safetensors file"),
])
def test_a_truncated_model_in_a_run_folder_is_exit_4(damage, reason, tiny_config, data, tmp_path):
    run = saved_run_folder(tiny_config, tmp_path / "run")
    damage(run / "model.safetensors")
    result = run_cli("eval", "retrieval", data["pairs"], "--model", run, *TINY)
    line = one_line_error(result)
    assert result.returncode == 4 and str(run / "model.safetensors") in line and reason in line


def test_a_damaged_run_folder_config_is_exit_4(tiny_config, data, tmp_path):
    run = saved_run_folder(tiny_config, tmp_path / "run")
    (run / "open_clip_config.json").write_text("[1, 2")
    result = run_cli("eval", "retrieval", data["pairs"], "--model", run, *TINY)
    assert result.returncode == 4 and "open_clip_config.json" in one_line_error(result)


@pytest.mark.parametrize("spec", ["hf-hub:", "hf-hub:a/b/c/d", "hf-hub:org/a b", "hf-hub: org/name", "hf-hub:org//x"])
def test_malformed_hub_names_are_usage_errors_before_any_request(spec, data, tmp_path, monkeypatch):
    from clipfit import hub

    def no_request(*_args, **_kwargs):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(hub, "why_unreachable", no_request)
    monkeypatch.setattr(hub, "is_cached", no_request)
    result = run_cli("eval", "retrieval", data["pairs"], "--model", spec, *TINY)
    line = one_line_error(result)
    assert result.returncode == 2 and repr(spec) in line and "hf-hub:ORG/NAME" in line
    refine = run_cli("refine", data["pairs"], "--model", spec, "--out", tmp_path / "run", "--quiet")
    assert refine.returncode == 2 and repr(spec) in one_line_error(refine)


# --- compare on things that are not run folders ------------------------------------------------------

def run_json_with(text: bytes):
    def make(folder: Path) -> Path:
        folder.mkdir()
        (folder / "run.json").write_bytes(text)
        return folder
    return make


def a_file(path: Path) -> Path:
    path.write_text("{}")
    return path


@pytest.mark.parametrize("make, reason", [
    (a_file, "not a clipfit run folder (a file"),
    (lambda p: p, "not a clipfit run folder (not found"),
    (run_json_with(b"[1, 2, 3]"), "a JSON list, not an object"),
    (run_json_with(b'{"before": [1]'), "not valid JSON"),
    (run_json_with(b'{"before": [1]}'), "'before' is a list"),
    (run_json_with(b"\xff\xfe{"), "not valid JSON"),
])
def test_compare_on_what_is_not_a_run_folder_is_one_line_exit_2(make, reason, tmp_path):
    target = make(tmp_path / "thing")
    result = run_cli("compare", target)
    line = one_line_error(result)
    assert result.returncode == 2 and str(target) in line and reason in line
