"""Frozen work (clipfit.frozen): the teacher encodes only the towers the methods read, the pixel
policy and order of prepare_frozen, and DDP's find_unused_parameters following from the loss terms."""

from __future__ import annotations

import json

import pytest
import torch

from clipfit.config import RefineConfig
from clipfit.data.dataset import PairDataset
from clipfit.data.layouts import load_pairs
from clipfit.frozen.prepare import FrozenPlan, prepare_frozen
from clipfit.frozen.teacher import FrozenTeacher
from clipfit.methods import build_methods
from clipfit.models import load_model
from clipfit.distributed import Distributed
from clipfit.parallel import build_encoder, unused_parameters
from clipfit.precision import autocast_for
from clipfit.run import method_run
from conftest import run_cli, tiny_refine_args, write_pairs


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(str(tiny_config), "none")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny):
    pairs = load_pairs(str(write_pairs(tmp_path_factory.mktemp("frozen") / "pairs", n=6, size=24, captions_per_image=2)))
    return PairDataset(pairs.pairs, tiny.preprocess_val, tiny.tokenizer, seed=0, max_pixels=10**8)


def composite(spec: str, *weights: str, **settings):
    config = RefineConfig(method=spec, weight=list(weights), **settings)
    return build_methods(spec, config.method_options(), method_run(config), {w.split("=")[0]: float(w.split("=")[1]) for w in weights})


# --- which teacher towers, and which outputs the loss reads -------------------------------------

def test_methods_name_the_teacher_towers_they_read_and_the_composite_unites_them():
    assert composite("contrastive").teacher_towers == frozenset() and not composite("contrastive").needs_teacher
    assert composite("dclip").teacher_towers == {"text"}
    assert composite("refine").teacher_towers == {"image", "text"}
    assert composite("ping+dclip").teacher_towers == {"text"}
    assert composite("lite+dclip+refine").teacher_towers == {"image", "text"}


def test_find_unused_parameters_is_off_for_contrastive_and_on_for_refine_at_default_weights(tiny):
    model = tiny.model
    assert unused_parameters(model, composite("contrastive").outputs_read) == []
    assert unused_parameters(model, composite("refine").outputs_read) == ["logit_scale"]  # clip weight 0
    assert unused_parameters(model, composite("refine", "clip=0.5").outputs_read) == []
    assert unused_parameters(model, composite("refine", hycd_logits="scaled-cos").outputs_read) == []
    # lite's own critic scale leaves the model's unused; --lite-critic logit-scale reads it
    assert unused_parameters(model, composite("lite", lite_critic="learned").outputs_read) == ["logit_scale"]
    assert unused_parameters(model, composite("lite", lite_critic="logit-scale").outputs_read) == []
    # with only DCLIP's text term, the whole image tower (and the scale: τ is fixed) gets no gradient
    text_only = unused_parameters(model, composite("dclip", "dclip_img=0", "dclip_con=0").outputs_read)
    assert "logit_scale" in text_only and any(n.startswith("visual.") for n in text_only)
    assert not any(n.startswith(("transformer.", "token_embedding")) for n in text_only)
    # --grad-accum: the scale's gradient flows through the first micro-batch's backward only
    assert unused_parameters(model, composite("contrastive").outputs_read, grad_accum=2) == ["logit_scale"]


def test_build_encoder_hands_ddp_the_decision(tiny, monkeypatch):
    seen = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda module, **kwargs: seen.append(kwargs["find_unused_parameters"]) or module)
    for find_unused in (False, True):
        build_encoder(tiny.model, state=Distributed(0, 2), device=torch.device("cpu"), find_unused=find_unused)
    build_encoder(tiny.model)  # one process: no DDP
    assert seen == [False, True]


# --- the teacher encodes only what is read -------------------------------------------------------

@pytest.mark.parametrize("towers, images", [({"text"}, 0), ({"image", "text"}, 6)])
def test_the_teacher_encodes_only_its_towers(tiny, dataset, towers, images):
    teacher = FrozenTeacher(tiny.model, torch.device("cpu"), autocast_for(torch.device("cpu"), "fp32"), towers)
    teacher.precompute(dataset, batch_size=4)
    assert teacher.encoded == {"image": images, "text": 12}  # 6 pairs, 2 captions each
    batch = {"index": torch.tensor([0, 5]), "caption": torch.tensor([1, 0])}
    image, text = teacher(batch)
    assert text.shape == (2, 32) and (image is None) == ("image" not in towers)


def test_a_dclip_run_never_encodes_teacher_images(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=8, size=24)
    out, cache = tmp_path / "run", tmp_path / "cache"
    run_cli(*tiny_refine_args(pairs, out, tiny_config, "--method", "dclip", "--dclip-teacher-epochs", "1",
                              "--cache-dir", str(cache)), check=True)
    teacher = json.loads((out / "run.json").read_text())["teacher"]
    assert teacher == {"towers": ["text"], "precomputed": True, "items_encoded_by_rank_0": {"image": 0, "text": 8}}
    entries = json.loads(run_cli("cache", "ls", "--cache-dir", cache, "--json", check=True).stdout)["entries"]
    rows = [entry["shapes"] for entry in entries if entry["kind"] == "teacher-rows"]
    assert rows == [{"texts": [8, 32]}]  # the cached teacher rows hold captions only


# --- prepare_frozen: order and pixel policy -----------------------------------------------------

def plan(**changes) -> FrozenPlan:
    settings = dict(teacher_towers=frozenset({"image", "text"}), cacheable=frozenset({"image", "text"}),
                    preload_images=False, batch_size=4, workers=0, device=torch.device("cpu"), precision="fp32")
    return FrozenPlan(**{**settings, **changes})


def test_cache_images_decodes_once_before_the_teacher_reads_the_pixels(tiny_config, dataset, decodes):
    model = load_model(str(tiny_config), "none").model
    own = PairDataset(dataset.pairs, dataset.transform, dataset.tokenizer, 0, 10**8)
    frozen = prepare_frozen(model, own, plan(preload_images=True), None, Distributed(), lambda _message: None)
    assert decodes["n"] == 6 and frozen.dataset is own and own.pixels is not None  # teacher read the preloaded pixels
    assert frozen.teacher.rows is not None and frozen.locked is None and frozen.rests == {}


def test_a_cached_locked_image_tower_leaves_the_loop_without_pixels(tiny_config, dataset, decodes):
    model = load_model(str(tiny_config), "none").model
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    frozen = prepare_frozen(model, dataset, plan(preload_images=True), None, Distributed(), lambda _message: None)
    assert decodes["n"] == 6  # once, for the locked rows; the teacher starts from them, nothing is preloaded
    assert not frozen.dataset.with_images and "image" not in frozen.dataset[(0, 0)]
    assert dataset.with_images and dataset.pixels is None  # the run's dataset is left as it was
    assert frozen.rests == {"image": None} and frozen.eval_modules == [model.visual]
    steps = frozen.step_inputs({"index": torch.tensor([2, 3]), "caption": torch.tensor([0, 1])}, torch.device("cpu"))
    assert set(steps) == {"image"} and steps["image"].shape == (2, 32)
    facts = frozen.facts()
    assert facts["locked_towers"]["towers"] == {"image": {"part": "image tower", "rows": 6, "dim": 32}}
    assert facts["teacher"]["items_encoded_by_rank_0"] == {"image": 0, "text": 12}


def test_without_precompute_nothing_is_cached_and_the_teacher_runs_per_step(tiny_config, dataset):
    model = load_model(str(tiny_config), "none").model
    model.lock_text_tower(unlocked_layers=0)
    frozen = prepare_frozen(model, dataset, plan(cacheable=frozenset()), None, Distributed(), lambda _message: None)
    assert frozen.locked is None and frozen.teacher.rows is None and frozen.dataset is dataset
    assert frozen.step_inputs({"index": torch.tensor([0])}, torch.device("cpu")) == {}
    assert frozen.eval_modules  # the locked text tower stays in eval mode, cached or not
    assert frozen.facts()["teacher_forward_passes"] == 0


# --- identical captions share one row -------------------------------------------------------------

def test_identical_captions_are_encoded_once_and_each_caption_finds_its_own_row(tiny):
    from pathlib import Path

    from clipfit.data.pairs import Pair
    from clipfit.frozen.rows import dataset_captions, encode_items, encode_share

    templates = ("a photo of a {c}.", "a drawing of a {c}.", "a {c}.")
    pairs = [Pair(Path(f"{i}.png"), tuple(t.replace("{c}", "cat" if i % 3 else "dog") for t in templates), f"{i}.png",
                  label=int(i % 3 > 0)) for i in range(7)]
    dataset = PairDataset(pairs, tiny.preprocess_val, tiny.tokenizer, seed=0, max_pixels=10**8)
    encoded = []

    def encode(tokens):  # a stand-in text tower: a fixed function of the tokens, counting its rows
        encoded.append(len(tokens))
        return tokens[:, :6].float()

    rows = encode_items(dataset, None, encode, batch_size=4)
    assert sum(encoded) == 6  # 2 classes x 3 templates, not 7 images x 3
    for i, pair in enumerate(pairs):
        for c, caption in enumerate(pair.captions):
            row = rows.text_rows(torch.tensor([i]), torch.tensor([c]))
            assert torch.equal(row, tiny.tokenizer([caption])[:, :6].float())
    # shares of contiguous items (each rank's under torchrun) concatenate to the same rows in the same order
    captions = dataset_captions(dataset)
    shares = [encode_share(dataset, captions, None, encode, 4, 0, part)
              for part in (range(0, 1), range(1, 2), range(2, 7))]
    assert [len(s.get("texts", [])) for s in shares] == [3, 3, 0]
    assert torch.equal(torch.cat([s["texts"] for s in shares if "texts" in s]), rows.texts)
