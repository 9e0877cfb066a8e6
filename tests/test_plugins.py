"""A method registered from outside clipfit (tests/toy_plugin.py, named in CLIPFIT_PLUGINS) gets its
flag, TOML key, validation, listing and training through the real CLI, with no clipfit module touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import cli_env, tiny_refine_args, write_pairs
from clipfit.io import read_jsonl
from clipfit.options import PANEL_METHOD, MethodOptions, opt

TESTS = Path(__file__).resolve().parent


def clipfit_with_plugins(*args, plugins: str = "toy_plugin") -> subprocess.CompletedProcess:
    """`python -m clipfit ARGS` as a user runs it, with CLIPFIT_PLUGINS set and this folder importable."""
    env = cli_env()
    env.update({"CLIPFIT_PLUGINS": plugins, "PYTHONPATH": str(TESTS) + os.pathsep + env["PYTHONPATH"]})
    return subprocess.run([sys.executable, "-m", "clipfit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_a_plugin_method_trains_with_its_own_flag_and_the_merged_weights(tmp_path, tiny_config):
    pairs, out = write_pairs(tmp_path / "pairs", n=16, size=16), tmp_path / "run"
    result = clipfit_with_plugins(*tiny_refine_args(pairs, out, tiny_config, "--method", "toy", "--toy-flag", "0.25",
                                                    "--weight", "toy=2", "--seed", "3", "--log-every", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["toy_flag"] == 0.25 and info["resolved"]["weights"] == {"toy": 2.0}
    # what the method itself was given: its options and the run's context, weights merged with --weight
    assert info["methods"]["toy"] == {"toy_flag": 0.25, "seed": 3, "batch_size": 8, "weights": {"toy": 2.0}}
    steps = [row for row in read_jsonl(out / "metrics.jsonl") if "toy" in row]
    assert len(steps) == 2 and (out / "model.safetensors").is_file()
    for row in steps:  # toy = 0.25 · mean(1 − cos) lies in [0, 0.5]; the loss is 2 · toy
        assert 0 <= row["toy"] <= 0.5 and row["loss"] == pytest.approx(2 * row["toy"], rel=1e-6)


def test_a_plugin_method_is_listed_and_its_toml_key_is_checked_by_its_own_validation(tmp_path):
    listed = json.loads(clipfit_with_plugins("methods", "--json").stdout)
    assert listed["toy"] == "Toy: pulls each pair's embeddings together (a test plugin)." and "refine" in listed

    toml = tmp_path / "settings.toml"
    toml.write_text("method = 'toy'\ntoy_flag = -1.0\n")
    refused = clipfit_with_plugins("refine", tmp_path, "--config", toml)
    assert refused.returncode == 2 and refused.stderr.strip() == "clipfit: error: --toy-flag must be positive (got -1.0)"


def test_a_plugin_that_cannot_be_imported_is_a_one_line_usage_error():
    result = clipfit_with_plugins("methods", plugins="no_such_plugin_module")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "clipfit: error: CLIPFIT_PLUGINS: cannot load plugin no_such_plugin_module "
        "(ModuleNotFoundError: No module named 'no_such_plugin_module')"]


@dataclass
class ClashingOptions(MethodOptions):
    seed: int = opt(0, "clash: a second --seed.", PANEL_METHOD)


def test_options_whose_names_are_taken_unregister_their_method_with_a_reason(monkeypatch):
    import clipfit.config  # noqa: F401 - the settings are composed: registering options now is refused
    from clipfit import methods

    with pytest.raises(RuntimeError, match="CLIPFIT_PLUGINS"):
        methods.register("late", "anywhere:Late", ClashingOptions, summary="too late to add flags")
    monkeypatch.setattr(methods, "PLUGIN_ERRORS", [])
    monkeypatch.setattr(methods, "REGISTRY", {"refine": methods.REGISTRY["refine"],
                                              "clash": methods.MethodEntry("anywhere:Clash", ClashingOptions, "s")})
    assert list(methods.options_classes({"seed", "lr"})) == ["refine"]
    assert list(methods.REGISTRY) == ["refine"]
    assert methods.PLUGIN_ERRORS == ["method clash: option(s) seed are already settings of clipfit or of another "
                                     "method; rename them with the method's prefix"]
