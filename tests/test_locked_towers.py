"""Locked towers: the frozen part of each tower is found, computed once per item, and a run that
looks its outputs up trains exactly as one that recomputes them every step."""

import json

import pytest
import torch

from clipfit.config import RefineConfig
from clipfit.models import evaluating, load_model
from clipfit.run import prepare_model
from clipfit.frozen.towers import frozen_output, frozen_parts
from conftest import run_cli, tiny_refine_args, write_pairs
from test_locking import TIMM_TINY, timm_model


def locked(loaded, **flags):
    return prepare_model(loaded, RefineConfig(**flags), torch.device("cpu"))


def test_clip_towers_lock_whole(tiny_config):
    assert frozen_parts(locked(load_model(str(tiny_config), "none"))) == {}
    parts = frozen_parts(locked(load_model(str(tiny_config), "none"), lock_image=True, lock_text=True))
    assert {tower: (part.name, part.rest) for tower, part in parts.items()} == {
        "image": ("image tower", None), "text": ("text tower", None)}


def test_lora_adapters_make_a_locked_tower_trainable(tiny_config):
    model = locked(load_model(str(tiny_config), "none"), lock_text=True, lora=True)
    assert "text" not in frozen_parts(model)


def test_timm_trunk_is_frozen_and_its_head_trains(tmp_path):
    model = locked(timm_model(tmp_path), lock_image=True)
    part = frozen_parts(model)["image"]
    assert part.rest is model.visual.head and any(p.requires_grad for p in part.rest.parameters())
    images = torch.randn(3, 3, 32, 32)
    with evaluating(model), torch.no_grad():
        assert torch.allclose(part.rest(frozen_output(model, part, images)), model.encode_image(images), atol=1e-6)


def test_hugging_face_text_transformer_is_frozen_and_its_projection_trains():
    loaded = load_model("lite0-minilm", None)
    model = locked(loaded, lock_text=True)
    part = frozen_parts(model)["text"]
    assert part.rest is model.text.proj and part.name.startswith("text transformer")
    tokens = loaded.tokenizer(["a red bicycle", "two cats asleep on a sofa"])
    with evaluating(model), torch.no_grad():
        assert torch.allclose(part.rest(frozen_output(model, part, tokens)), model.encode_text(tokens), atol=1e-5)


def timm_run(tmp_path, name, *extra, lock=("--lock-image", "--lock-text")):
    config = tmp_path / "timm-tiny-test.json"
    if not config.exists():  # a rewritten model file is a new model to the feature cache
        config.write_text(json.dumps(TIMM_TINY))
    out = tmp_path / name
    run_cli(*tiny_refine_args(tmp_path / "pairs", out, config, "--epochs", "2", "--lr", "1e-3", "--log-every", "1",
                              *lock, *extra), check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row], json.loads((out / "run.json").read_text())


def test_cached_locked_towers_train_as_recomputed_ones(tmp_path, decodes):
    write_pairs(tmp_path / "pairs", n=16)
    cached_losses, info = timm_run(tmp_path, "cached", "--method", "refine")
    cached_decodes = decodes["n"]
    recomputed_losses, recomputed = timm_run(tmp_path, "recomputed", "--method", "refine", "--no-precompute")

    assert len(cached_losses) == 4 and cached_losses == pytest.approx(recomputed_losses, abs=1e-5)
    towers = info["locked_towers"]["towers"]
    assert towers["image"] == {"part": "image trunk (timm)", "rows": 16, "dim": 1280}
    assert towers["text"]["part"] == "text tower" and recomputed["locked_towers"] is None
    assert recomputed["teacher_forward_passes"] == 4  # one per step: nothing was precomputed
    # Once, for the trunk (the teacher starts from its rows), against once per epoch.
    assert cached_decodes == 16 and decodes["n"] - cached_decodes == 2 * 16
    assert info["teacher_forward_passes"] == 0  # only the teacher's projection head ran, on the trunk rows


def test_augmented_images_are_not_cached(tmp_path):
    write_pairs(tmp_path / "pairs", n=16)
    _, info = timm_run(tmp_path, "augmented", "--augment")
    assert set(info["locked_towers"]["towers"]) == {"text"}


def test_a_tower_without_lora_adapters_is_cached_whole(tmp_path):
    # peft freezes every base weight; the timm image tower has no adapter targets, so all of it is frozen.
    write_pairs(tmp_path / "pairs", n=16)
    cached, info = timm_run(tmp_path, "cached", "--method", "refine", "--lora", lock=())
    recomputed, _ = timm_run(tmp_path, "recomputed", "--method", "refine", "--lora", "--no-precompute", lock=())
    assert info["locked_towers"]["towers"] == {"image": {"part": "image tower", "rows": 16, "dim": 16}}
    assert cached == pytest.approx(recomputed, abs=1e-5)


def test_a_later_run_on_the_same_pairs_reuses_the_rows_from_the_feature_cache(tmp_path, decodes):
    write_pairs(tmp_path / "pairs", n=16)
    first, info = timm_run(tmp_path, "first", "--method", "refine", "--cache-dir", str(tmp_path / "cache"))
    decoded_by_first = decodes["n"]
    again, reused = timm_run(tmp_path, "again", "--method", "refine", "--cache-dir", str(tmp_path / "cache"))
    assert info["locked_towers"]["items_encoded_by_rank_0"] == 16
    assert reused["locked_towers"]["items_encoded_by_rank_0"] == 0 and decodes["n"] == decoded_by_first
    assert again == first  # the same numbers, read back from the same file
    # the measurements' frozen rows too: the training subset's images (trunk) and captions (whole tower)
    assert info["measurement_rows"]["items_encoded"] == {"image": 16, "text": 16}
    assert reused["measurement_rows"]["items_encoded"] == {"image": 0, "text": 0}
    assert reused["after"] == info["after"] and reused["before"] == info["before"]
    kinds = json.loads(run_cli("cache", "ls", "--cache-dir", tmp_path / "cache", "--json", check=True).stdout)
    assert sorted(entry["kind"] for entry in kinds["entries"]) == ["eval-rows", "eval-rows", "locked-rows"]
