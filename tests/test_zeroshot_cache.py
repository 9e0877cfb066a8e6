"""The zero-shot classifier of a model with fixed weights is built once and kept in the feature cache."""

from __future__ import annotations

import json

import pytest
import torch

from clipfit.eval.encode import encoder_for
from clipfit.eval.zeroshot import class_embeddings
from clipfit.cache import FeatureCache, encoder_identity
from conftest import run_cli, tiny_refine_args, write_pairs
from test_eval_zeroshot import CLASSES, write_image_folder

TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}", "{c}"]


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    from clipfit.models import load_model

    torch.manual_seed(0)
    return load_model(str(tiny_config), "none")


class CountingEncoder:
    """Counts the prompts an Encoder is asked to encode."""

    def __init__(self, encoder):
        self.encoder, self.prompts = encoder, 0
        original = encoder.texts

        def texts(prompts, description=""):
            self.prompts += len(prompts)
            return original(prompts, description)

        encoder.texts = texts


def test_second_build_is_a_cache_hit_with_identical_rows_and_other_templates_are_another_key(tmp_path, tiny_model,
                                                                                              tiny_config):
    cache = FeatureCache(tmp_path / "cache")
    encoder = encoder_for(tiny_model, tiny_model.model, torch.device("cpu"), 4, 0, "fp32",
                          identity=encoder_identity(str(tiny_config), "none", 0), feature_cache=cache)
    counter = CountingEncoder(encoder)
    first = class_embeddings(encoder, CLASSES, TEMPLATES)
    assert counter.prompts == len(CLASSES) * len(TEMPLATES) and cache.builds == 1
    second = class_embeddings(encoder, CLASSES, TEMPLATES)
    assert counter.prompts == len(CLASSES) * len(TEMPLATES) and cache.hits == 1  # nothing encoded again
    assert torch.equal(first, second)
    uncached = class_embeddings(encoder_for(tiny_model, tiny_model.model, torch.device("cpu"), 4, 0, "fp32"),
                                CLASSES, TEMPLATES)
    assert torch.equal(first, uncached)  # kept as float32: the cache changes no bit

    other = class_embeddings(encoder, CLASSES, TEMPLATES[:2])
    assert cache.builds == 2 and not torch.allclose(other, first)
    class_embeddings(encoder, CLASSES[::-1], TEMPLATES)  # class order is part of the key too
    assert cache.builds == 3
    assert [e.kind for e in cache.entries()] == ["zeroshot-classifier"] * 3


def test_a_model_without_fixed_identity_is_never_cached(tmp_path, tiny_model):
    cache = FeatureCache(tmp_path / "cache")
    encoder = encoder_for(tiny_model, tiny_model.model, torch.device("cpu"), 4, 0, "fp32", feature_cache=cache)
    class_embeddings(encoder, CLASSES, TEMPLATES)
    assert cache.entries() == [] and cache.builds == 0


def test_eval_zeroshot_reuses_the_classifier_of_a_weights_file_but_not_of_random_weights(tmp_path, tiny_config,
                                                                                         tiny_model):
    from clipfit.models import save_state_dict

    images = write_image_folder(tmp_path / "classes", per_class=2)
    weights = tmp_path / "tiny.safetensors"
    save_state_dict(tiny_model.model.state_dict(), weights)
    common = ["eval", "zeroshot", "folder", "--data", images, "--model", tiny_config, "--workers", "0",
              "--device", "cpu", "--json", "--cache-dir", tmp_path / "cache"]
    runs = [run_cli(*common, "--pretrained", weights, check=True) for _ in range(2)]
    entries = FeatureCache(tmp_path / "cache").entries()
    assert [e.kind for e in entries] == ["zeroshot-classifier"]
    assert entries[0].shapes["classifier"] == [len(CLASSES), 32]
    assert json.loads(runs[0].stdout)["metrics"] == json.loads(runs[1].stdout)["metrics"]

    run_cli(*common, "--pretrained", "none", check=True)  # drawn unseeded: no identity to key it by
    assert len(FeatureCache(tmp_path / "cache").entries()) == 1


def test_refine_caches_the_starting_models_classifier_only(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=8)
    images = write_image_folder(tmp_path / "classes", per_class=2)
    befores = []
    for run in ("first", "second"):
        args = tiny_refine_args(pairs, tmp_path / run, tiny_config, "--max-steps", "1", "--lr", "1e-2",
                                "--eval-zeroshot", f"folder={images}", "--cache-dir", str(tmp_path / "cache"))
        run_cli(*args, check=True)
        info = json.loads((tmp_path / run / "run.json").read_text())
        befores.append({k: v for k, v in info["before"].items() if k.startswith("zeroshot/")})
        entries = [e for e in FeatureCache(tmp_path / "cache").entries() if e.kind == "zeroshot-classifier"]
        assert len(entries) == 1  # the starting model's, built by the first run; the trained model's never
        assert entries[0].key_parts["model"]["spec"] == str(tiny_config)
    assert befores[0] == befores[1]
