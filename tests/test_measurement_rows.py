"""Measurements reuse the frozen parts' outputs (clipfit.frozen.measure): every regime gives the
numbers of a full re-encode, the frozen part runs once per item however often the model is
measured, and later commands (another run, `clipfit interpolate`) read the rows from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipfit.config import RefineConfig
from clipfit.data.layouts import load_pairs
from clipfit.eval.encode import encoder_for
from clipfit.eval.retrieval import encode_pairs_all_captions
from clipfit.eval.split import evaluate_split
from clipfit.frozen.measure import FrozenRows, freeze_unchanged
from clipfit.models import load_model
from clipfit.run import prepare_model
from conftest import run_cli, tiny_refine_args, write_pairs
from test_locking import TIMM_TINY


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = write_pairs(tmp_path_factory.mktemp("measured") / "pairs", n=6, size=24, captions_per_image=2)
    return load_pairs(str(folder)).pairs


@pytest.fixture(scope="module")
def configs(tmp_path_factory, tiny_config):
    timm = tmp_path_factory.mktemp("configs") / "timm-tiny-test.json"
    timm.write_text(json.dumps(TIMM_TINY))
    return {"clip": str(tiny_config), "timm": str(timm), "starter": "lite0-minilm"}


# regime -> (model, flags, {tower: frozen part's name, and whether a trainable rest follows it})
REGIMES = {
    "locked image (timm trunk under its head)": ("timm", {"lock_image": True}, {"image": ("image trunk (timm)", True)}),
    "locked text (Hugging Face transformer under its projection)": (
        "starter", {"lock_text": True}, {"text": ("text transformer (Hugging Face)", True)}),
    "both locked (whole CLIP towers)": ("clip", {"lock_image": True, "lock_text": True},
                                        {"image": ("image tower", None), "text": ("text tower", None)}),
    "LoRA (the timm tower has no adapter targets)": ("timm", {"lora": True}, {"image": ("image tower", None)}),
    "full fine-tuning": ("clip", {}, {}),
}


def features(loaded, model, pairs, frozen):
    encoder = encoder_for(loaded, model, torch.device("cpu"), 4, 0, "fp32", frozen=frozen)
    measured = encode_pairs_all_captions(encoder, pairs, "validation")
    return measured, evaluate_split(model, pairs, loaded, torch.device("cpu"), 4, encoder=encoder, key="validation")


@pytest.mark.parametrize("regime", list(REGIMES))
def test_every_regime_measures_as_a_full_re_encode(regime, configs, pairs):
    name, flags, expected = REGIMES[regime]
    torch.manual_seed(0)
    loaded = load_model(configs[name], "none")
    model = prepare_model(loaded, RefineConfig(**flags), torch.device("cpu"))
    frozen = FrozenRows.of(model)
    assert {t: (p.name, p.rest is not None or None) for t, p in frozen.parts.items()} == expected

    for round_ in range(2):  # the start, then "after training": the trainable weights moved
        reused, reused_metrics = features(loaded, model, pairs, frozen)
        full, full_metrics = features(loaded, model, pairs, None)
        assert torch.allclose(reused.image, full.image, atol=1e-5) and torch.allclose(reused.text, full.text, atol=1e-5)
        assert reused_metrics == pytest.approx(full_metrics, abs=1e-4)
        if round_ == 0:
            first = full
            with torch.no_grad():
                for param in (p for p in model.parameters() if p.requires_grad):
                    param.add_(0.05 * torch.randn_like(param))
    for tower in ("image", "text"):  # a tower moved unless it is frozen whole
        frozen_whole = tower in expected and expected[tower][1] is None
        assert torch.allclose(getattr(first, tower), getattr(full, tower)) == frozen_whole
    # the frozen part ran once per item: 6 images, 12 captions, though the model was measured twice
    assert frozen.encoded == {"image": 6 if "image" in expected else 0, "text": 12 if "text" in expected else 0}


def test_interpolation_finds_the_weights_no_alpha_changes(configs):
    torch.manual_seed(0)
    model = load_model(configs["timm"], "none").model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # "training" moved the image head and the text tower
        model.visual.head.proj.weight.add_(1.0)
        model.transformer.resblocks[0].mlp.c_fc.weight.add_(1.0)
    end = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_unchanged(model, start, end)
    parts = FrozenRows.of(model).parts
    assert {t: (p.name, p.rest is model.visual.head) for t, p in parts.items()} == {"image": ("image trunk (timm)", True)}

    batchnorm = next(m for m in model.visual.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))
    batchnorm.running_mean.add_(1.0)  # statistics that moved make their module's weights count as changed
    freeze_unchanged(model, start, {k: v.clone() for k, v in model.state_dict().items()})
    assert FrozenRows.of(model).parts == {}


def distinct_pairs(folder: Path) -> Path:
    """16 pairs of two captions each, every caption distinct: 32 texts to encode (an Encoder encodes
    a text once however many pairs share it)."""
    write_pairs(folder, n=16, captions_per_image=2)
    for path in folder.glob("*.txt"):
        path.write_text(path.read_text().replace("caption 1 of a", f"caption 1 of {path.stem}, a"))
    return folder


def test_a_run_measures_each_validation_item_once_and_interpolate_reuses_the_rows(tmp_path, tiny_config):
    distinct_pairs(tmp_path / "pairs")
    cache = str(tmp_path / "cache")

    def refine(name, *extra):
        args = tiny_refine_args(tmp_path / "pairs", tmp_path / name, tiny_config, "--epochs", "3", "--lr", "1e-3",
                                "--val-split", "0.5", "--lock-image", "--lock-text", "--cache-dir", cache, *extra)
        run_cli(*args, check=True)
        return json.loads((tmp_path / name / "run.json").read_text())

    reused = refine("reused")
    recomputed = refine("recomputed", "--no-precompute")
    # before + 3 per-epoch measurements + the gallery: the towers ran once, on 8 images and 16 captions
    assert reused["measurement_rows"] == {"parts": {"image": "image tower", "text": "text tower"},
                                          "items_encoded": {"image": 8, "text": 16}}
    assert recomputed["measurement_rows"] is None
    assert reused["after"] == pytest.approx(recomputed["after"], abs=1e-4)
    assert reused["before"] == pytest.approx(recomputed["before"], abs=1e-4)

    entries = lambda: json.loads(run_cli("cache", "ls", "--cache-dir", cache, "--json", check=True).stdout)["entries"]  # noqa: E731
    eval_rows = sorted(e["path"] for e in entries() if e["kind"] == "eval-rows")
    assert len(eval_rows) == 2
    result = run_cli("interpolate", tmp_path / "reused", "--alpha", "0.5,1", "--out", tmp_path / "wise", check=True)
    assert sorted(e["path"] for e in entries() if e["kind"] == "eval-rows") == eval_rows  # read, not built again
    assert "feature cache hit: eval-rows" in result.stderr + result.stdout
    wise = json.loads((tmp_path / "wise" / "run.json").read_text())
    assert wise["interpolation"]["measured"]["α=1"] == pytest.approx(reused["after"], abs=1e-4)


def test_a_sweeps_later_runs_read_the_measurement_rows_of_its_first(tmp_path, tiny_config):
    pairs = distinct_pairs(tmp_path / "pairs")
    out = tmp_path / "sweep"
    run_cli("sweep", pairs, "--model", tiny_config, "--pretrained", "none", "--out", out, "--lock-image", "--lock-text",
            "--lr", "1e-3,1e-2", "--epochs", "2", "--val-split", "0.5", "--workers", "0", "--batch-size", "8",
            "--cache-dir", tmp_path / "cache", check=True)
    first, second = (json.loads((out / name / "run.json").read_text())["measurement_rows"]["items_encoded"]
                     for name in ("01-lr=0.001", "02-lr=0.01"))
    assert first == {"image": 8, "text": 16} and second == {"image": 0, "text": 0}
