"""ImageNet's distribution shifts in their usual on-disk form, scored as WiSE-FT scores them:
ImageNet's classifier, a class mask for ImageNet-R and -A, ObjectNet's classes pooled from
ImageNet's through the release's own mapping files. Folders are generated here; the model is tiny
and random, with one template so ImageNet's 1,000 classes cost 1,000 prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipfit.errors import DataError, UsageError
from clipfit.eval.catalog import benchmark_classnames, imagenet_synsets
from clipfit.eval.sets import load_labelled
from clipfit.eval.encode import encoder_for
from clipfit.eval.zeroshot import zeroshot
from test_eval_zeroshot import tiny_model  # noqa: F401 (a fixture)

TEMPLATE = "a photo of a {c}."


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("templates") / "one.txt"
    path.write_text(TEMPLATE + "\n")
    return str(path)


@pytest.fixture(scope="module")
def encoder(tiny_model, tmp_path_factory):
    """One encoder with a fixed identity and a feature cache: ImageNet's classifier is built once."""
    from clipfit.cache import FeatureCache

    return encoder_for(tiny_model, tiny_model.model, torch.device("cpu"), 8, 0, "fp32", identity={"test": "tiny"},
                       feature_cache=FeatureCache(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def imagenet_logits(tiny_model):
    """Cosine scores of an image against ImageNet's 1,000 classes, from the definition."""
    names = benchmark_classnames("imagenet1k").items
    with torch.no_grad():
        classifier = F.normalize(tiny_model.model.eval().encode_text(tiny_model.tokenizer([TEMPLATE.format(c=c) for c in names])), dim=-1)

    def logits(paths, load) -> torch.Tensor:
        with torch.no_grad():
            pixels = torch.stack([tiny_model.preprocess_val(load(p)) for p in paths])
            return F.normalize(tiny_model.model.encode_image(pixels), dim=-1) @ classifier.T
    return logits


def save_images(folder: Path, count: int, seed: int, border: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = np.clip(rng.normal(40 * seed % 255, 50, (40, 44, 3)), 0, 255).astype(np.uint8)
        if border:  # ObjectNet's images carry a red frame
            pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_imagenet_v2_folders_are_class_indices(tmp_path, template):
    for seed, folder in enumerate(("0", "7", "999")):
        save_images(tmp_path / "v2" / folder, 1, seed)
    data = load_labelled("imagenet-v2", tmp_path / "v2", templates_file=template)
    assert data.labels == [0, 7, 999] and data.groups is None and data.name == "imagenetv2"
    assert data.classes == benchmark_classnames("imagenet1k").items
    (tmp_path / "v2" / "n01440764").mkdir()
    with pytest.raises(DataError, match="named by ImageNet index"):
        load_labelled("imagenet-v2", tmp_path / "v2")


def test_imagenet_sketch_is_told_apart_from_all_1000_classes(tmp_path, template):
    for seed, synset in enumerate(("n01443537", "n15075141")):
        save_images(tmp_path / "sketch" / synset, 1, seed)
    data = load_labelled("imagenet-sketch", tmp_path / "sketch", templates_file=template)
    assert data.labels == [1, 999] and data.groups is None and data.class_count == 1000


@pytest.mark.parametrize("shift", ["imagenet-r", "imagenet-a"])
def test_r_and_a_score_among_the_classes_present(tmp_path, template, encoder, imagenet_logits, shift):
    synsets = ["n01443537", "n01484850", "n02009912", "n04591713"]  # any four of ImageNet's
    for seed, synset in enumerate(synsets):
        save_images(tmp_path / shift / synset, 3, seed + 1)
    data = load_labelled(shift, tmp_path / shift, templates_file=template)
    indices = [imagenet_synsets().index(s) for s in synsets]
    assert data.groups == [[i] for i in indices] and data.class_count == 4 and data.labels == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    ours = zeroshot(encoder, data)
    logits = imagenet_logits(data.images, data.load)
    masked = logits[:, indices]  # WiSE-FT's projection: logits[:, mask]
    labels = torch.tensor(data.labels)
    assert ours["acc1"] == pytest.approx(100 * (masked.argmax(1) == labels).float().mean().item(), abs=1e-4)
    unmasked = (logits.argmax(1) == torch.tensor(indices)[labels]).float().mean().item()
    assert ours["acc1"] > 100 * unmasked  # told apart from the 4 classes present, not from all 1000
    (tmp_path / "names.txt").write_text("".join(f"class {i}\n" for i in range(4)))
    with pytest.raises(UsageError, match=r"has 1000 classes \(its classifier's rows; it scores 4 of them\)"):
        load_labelled(shift, tmp_path / shift, classnames_file=str(tmp_path / "names.txt"))


def write_objectnet(root: Path) -> Path:
    """An ObjectNet release in its usual form: images/<folder>/ and the four mappings/ files, with a
    folder the mappings do not map to ImageNet (left out) and ILSVRC-2012 ids in an order of their own."""
    release = root / "objectnet-1.0"
    for seed, folder in enumerate(("alarm_clock", "banana", "chair", "rake")):
        save_images(release / "images" / folder, 2, seed + 3, border=True)
    mappings = release / "mappings"
    mappings.mkdir(parents=True)
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "banana": "Banana", "chair": "Chair", "rake": "Rake"}))
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Alarm clock": "analog clock; digital clock", "Banana": "banana", "Chair": "barber chair; folding chair"}))
    names_2012 = ["banana", "analog clock", "barber chair", "digital clock", "folding chair"]
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(names_2012) + "\n")
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({"954": 0, "409": 1, "423": 2, "530": 3, "559": 4}))
    return release


def test_objectnet_pools_imagenet_classes_through_the_release_mappings(tmp_path, template, encoder, imagenet_logits):
    write_objectnet(tmp_path)
    for root in (tmp_path, tmp_path / "objectnet-1.0"):  # the release folder or the folder holding it
        data = load_labelled("objectnet", root, templates_file=template)
        assert data.groups == [[409, 530], [954], [423, 559]]  # alarm_clock, banana, chair; rake is not ImageNet's
        assert data.labels == [0, 0, 1, 1, 2, 2] and all(p.parent.name != "rake" for p in data.images)
    image = data.load(data.images[0])
    assert image.size == (40, 36)  # 44 x 40 less the 2-pixel frame on every side
    assert not (np.asarray(image)[[0, -1]] == (255, 0, 0)).all(-1).any()
    ours = zeroshot(encoder, data)
    logits = imagenet_logits(data.images, data.load)
    pooled = torch.stack([logits[:, g].max(1).values for g in data.groups], dim=1)  # WiSE-FT's project_logits
    labels = torch.tensor(data.labels)
    assert ours["acc1"] == pytest.approx(100 * (pooled.argmax(1) == labels).float().mean().item(), abs=1e-4)
    assert encoder.feature_cache.builds == 1  # every shift used ImageNet's one classifier, built once


def test_objectnet_without_its_mappings_is_a_data_error(tmp_path):
    release = write_objectnet(tmp_path)
    (release / "mappings" / "objectnet_to_imagenet_1k.json").unlink()
    with pytest.raises(DataError, match="objectnet_to_imagenet_1k.json: cannot read"):
        load_labelled("objectnet", release)
    (release / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Banana": "plantain"}))
    with pytest.raises(DataError, match="'plantain'"):
        load_labelled("objectnet", release)
    with pytest.raises(DataError, match="not the ObjectNet release"):
        load_labelled("objectnet", release / "images")
