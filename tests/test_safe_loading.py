"""Safe loading: weights never execute code, configs are data, the network only on request."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import open_clip.pretrained
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_main, tiny_refine_args
from clipfit import models
from clipfit.checkpoint import load_latest, save_checkpoint
from clipfit.config import load_toml
from clipfit.errors import ModelError, UsageError


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


class MakesAFolder:
    """Unpickling this runs os.makedirs: what a malicious checkpoint would do with os.system."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.makedirs, (self.target,)


@pytest.fixture
def tiny_state(tiny_config) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.clone() for k, v in models.load_model(str(tiny_config), "none").model.state_dict().items()}


def same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --- weights ------------------------------------------------------------------------------------

def test_pickle_that_runs_code_is_refused_and_not_run(pairs_dir, tiny_config, tiny_state, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    weights = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_state, "payload": MakesAFolder(marker)}, weights)
    code = run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config, "--pretrained", weights))
    line = last_error_line(capsys)
    assert code == 4
    assert str(weights) in line and "refused to load" in line and "weights_only" in line and "safetensors" in line
    assert not marker.exists()


@pytest.mark.parametrize("wrap", ["safetensors", "plain", "state_dict", "module-prefix"])
def test_safetensors_and_plain_state_dicts_load(wrap, tiny_config, tiny_state, tmp_path):
    if wrap == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    else:
        path = tmp_path / "weights.pt"
        payload = {"plain": tiny_state, "state_dict": {"state_dict": tiny_state, "epoch": 3},
                   "module-prefix": {f"module.{k}": v for k, v in tiny_state.items()}}[wrap]
        torch.save(payload, path)
    torch.manual_seed(2)  # a different random init, so equality proves the file was loaded
    assert same_weights(models.load_model(str(tiny_config), str(path)).model, tiny_state)


def test_refine_starts_from_a_safetensors_file(pairs_dir, tiny_config, tiny_state, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config, "--pretrained", path, "--max-steps", "1")) == 0


@pytest.mark.parametrize("content, reason", [
    (b"not a safetensors header", "not a valid safetensors file"),
    (b"", "not a valid safetensors file"),
])
def test_damaged_safetensors_is_a_model_error(content, reason, tiny_config, tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=reason):
        models.load_model(str(tiny_config), str(path))


def test_weights_that_do_not_fit_are_a_model_error(tiny_config, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"some.other.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelError, match="do not fit the architecture"):
        models.load_model(str(tiny_config), str(path))


def test_a_malicious_checkpoint_in_the_run_folder_is_skipped_not_run(tmp_path):
    save_checkpoint(tmp_path, 1, {"position": {"step": 1}}, keep=5)
    marker = tmp_path / "code-ran"
    torch.save({"position": MakesAFolder(marker)}, tmp_path / "checkpoints" / "step-00000002.pt")
    warnings = []
    path, state = load_latest(tmp_path, warnings.append)
    assert path.name == "step-00000001.pt" and state["position"] == {"step": 1}
    assert not marker.exists() and "step-00000002.pt: damaged checkpoint" in warnings[0]


# --- configs are data ---------------------------------------------------------------------------

def test_toml_config_values_are_data(tmp_path):
    config = tmp_path / "refine.toml"
    config.write_text('[refine]\nout = "$(touch pwned)"\nmax-steps = 3\nmethod = "__import__(\'os\')"\n')
    settings = load_toml(config)
    assert settings == {"out": "$(touch pwned)", "max_steps": 3, "method": "__import__('os')"}


def test_python_in_a_config_file_is_not_run(pairs_dir, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    config = tmp_path / "refine.toml"
    config.write_text(f"import os\nos.makedirs({str(marker)!r})\n")
    assert run_main(["refine", pairs_dir, "--config", config, "--out", tmp_path / "run"]) == 2
    assert "not valid TOML" in last_error_line(capsys) and not marker.exists()


def test_model_config_json_is_data(tmp_path):
    config = tmp_path / "model.json"
    config.write_text('{"embed_dim": "__import__(\'os\').getcwd()"}')
    with pytest.raises(UsageError, match="needs embed_dim, vision_cfg and text_cfg"):
        models.load_model(str(config), "none")


# --- the network --------------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch, tmp_path) -> list:
    """No sockets, a hub download that fails at once and an empty hub cache; returns the
    connections and downloads attempted."""
    from huggingface_hub import constants

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    def failing_download(*args, **kwargs):
        attempts.append(kwargs.get("repo_id") or args)
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", failing_download)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    return attempts


def test_local_models_never_touch_the_network(offline, pairs_dir, tiny_config, tiny_state, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "a", tiny_config, "--max-steps", "1")) == 0
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "b", tiny_config, "--pretrained", path, "--max-steps", "1")) == 0
    assert run_main(["refine", pairs_dir, "--model", tmp_path / "b", "--pretrained", "none", "--out", tmp_path / "c",
                     "--batch-size", "8", "--workers", "0", "--quiet", "--max-steps", "1"]) == 0  # a run folder
    assert offline == []


def test_hub_model_fails_offline_with_one_line(offline, pairs_dir, tmp_path, capsys):
    code = run_main(["refine", pairs_dir, "--model", "hf-hub:someone/some-clip", "--out", tmp_path / "run",
                     "--workers", "0", "--quiet"])
    line = last_error_line(capsys)
    assert code == 4, line
    assert offline, "the hub path must really try the network"
    assert "could not load hf-hub:someone/some-clip: cannot reach" in line
    assert "--pretrained none" in line  # names the offline alternatives


def test_pretrained_tag_fails_offline_with_one_line(offline, pairs_dir, tmp_path, capsys):
    code = run_main(["refine", pairs_dir, "--model", "RN50", "--pretrained", "openai", "--out", tmp_path / "run",
                     "--workers", "0", "--quiet"])
    line = last_error_line(capsys)
    assert code == 4, line
    assert "could not load RN50/openai" in line and "--pretrained none" in line
