"""Models whose every weight is loaded are built without drawing random weights first
(clipfit.models.placeholder_weights), and end up exactly as open_clip's own build-then-load:
same tensors, dtypes, modes and trainable flags. Random weights (--pretrained none) are drawn
as before, from the seed."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import open_clip
import pytest
import torch

from clipfit import starter
from clipfit.config import RefineConfig
from clipfit.models import ModelError, load_model, placeholder_weights, save_state_dict
from clipfit.run import prepare_model


def same_model(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    left, right = ours.state_dict(), reference.state_dict()
    assert left.keys() == right.keys()
    different = [k for k in left if left[k].dtype != right[k].dtype or not torch.equal(left[k], right[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert {n: m.training for n, m in ours.named_modules()} == {n: m.training for n, m in reference.named_modules()}
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == \
        {n: p.requires_grad for n, p in reference.named_parameters()}
    assert not any(p.is_meta for p in ours.parameters())


def built_then_loaded(arch: str, state: dict) -> torch.nn.Module:
    """open_clip's way: a random model, then every weight copied over it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(arch, pretrained_text=False)
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, tiny_config):
    torch.manual_seed(7)
    reference = load_model(str(tiny_config), "none").model
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_state_dict(reference.state_dict(), path)
    return path, reference


def test_a_weights_file_loads_as_build_then_load(weights_file, tiny_config):
    path, reference = weights_file
    loaded = load_model(str(tiny_config), str(path)).model
    same_model(loaded, reference)
    same_model(loaded, built_then_loaded("tiny-test", reference.state_dict()))


def test_random_weights_are_drawn_from_the_seed_as_before(tiny_config):
    torch.manual_seed(3)
    ours = load_model(str(tiny_config), "none").model
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = open_clip.create_model("tiny-test", pretrained_text=False)
    same_model(ours, reference)


def test_the_starter_loads_as_transformers_and_open_clip_build_it():
    # the reference: towers built with their random weights, MiniLM by transformers' from_pretrained
    reference = starter.create_starter(aligned=False)[0]
    starter.load_aligned_weights(reference)
    same_model(load_model("lite0-minilm", "aligned").model, reference)


def test_a_run_folder_loads_as_open_clip_loads_it(tiny_run):
    _, _, run_dir = tiny_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = open_clip.create_model(f"local-dir:{run_dir}")
    same_model(load_model(str(run_dir)).model, reference)


def test_lora_adapters_on_a_loaded_model_are_those_of_build_then_load(weights_file, tiny_config):
    # refine seeds again once the model is built, so the adapters depend on the seed alone
    path, reference = weights_file
    config = RefineConfig(lora=True)
    loaded = load_model(str(tiny_config), str(path))
    torch.manual_seed(11)
    ours = prepare_model(loaded, config, torch.device("cpu"))
    base = built_then_loaded("tiny-test", reference.state_dict())
    torch.manual_seed(11)
    theirs = prepare_model(SimpleNamespace(model=base), config, torch.device("cpu"))
    same_model(ours, theirs)


def test_a_weight_no_file_holds_is_one_clear_error(weights_file, tiny_config, tmp_path):
    path, reference = weights_file
    partial = {k: v for k, v in reference.state_dict().items() if k != "text_projection"}
    save_state_dict(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ModelError, match="text_projection"):
        load_model(str(tiny_config), str(tmp_path / "partial.safetensors"))


def test_placeholders_are_only_made_inside_the_context():
    with placeholder_weights():
        inside = torch.nn.Linear(3, 2)
    outside = torch.nn.Linear(3, 2)
    assert inside.weight.is_meta and not outside.weight.is_meta
