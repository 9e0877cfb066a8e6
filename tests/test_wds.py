"""wds/NAME sets: CLIP_benchmark's WebDataset layout, written with webdataset's own ShardWriter
(classification, multilabel, multi-caption retrieval), scored against direct computations of
CLIP_benchmark's definitions, streamed, cached, and read from a hub-shaped local cache.

No test reaches a network: the hub is a closed local port or switched off (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipfit.errors import DataError
from clipfit.eval.encode import encoder_for
from clipfit.eval.wds import ShardSamples, open_wds, write_wds
from clipfit.eval.zeroshot import zeroshot
from conftest import cli_env, run_cli
from test_eval_zeroshot import tiny_model  # noqa: F401 (a fixture)
from hub_cache import closed_port, lay_out, offline_env

CLASSES = ["apple", "boat", "cat", "dog", "egg", "fish", "goat"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}", "{c}"]  # the set's own, not ImageNet's 80
TINY = ("--pretrained", "none", "--workers", "0", "--batch-size", "4", "--device", "cpu")


def image_bytes(k: int, rng, extension: str = "webp") -> bytes:
    pixels = np.clip(rng.normal(30 * (k % 7), 40, (36, 30, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format={"jpg": "jpeg"}.get(extension, extension),
                                 **({"lossless": True} if extension == "webp" else {}))
    return buffer.getvalue()


def write_set(root: Path, kind: str, n: int = 13, per_shard: int = 5, seed: int = 0) -> Path:
    """A set of `kind` in CLIP_benchmark's layout: several shards, mixed image formats."""
    rng = np.random.default_rng(seed)
    formats = ("webp", "png", "jpg")

    def target(i: int):
        if kind == "classification":
            return i % len(CLASSES)
        if kind == "multilabel":
            return np.array([(i + k) % 3 == 0 for k in range(len(CLASSES))], dtype=np.int64)
        return [f"a picture number {i}", f"another caption of image {i}", f"a third one of {i}"][: 1 + i % 3]

    samples = ((image_bytes(i, rng, formats[i % 3]), formats[i % 3], target(i)) for i in range(n))
    labelled = kind != "retrieval"
    write_wds(root, samples, kind, CLASSES if labelled else None, TEMPLATES if labelled else None, per_shard=per_shard)
    return root


def encoder(loaded, workers: int = 0, batch_size: int = 4, **kwargs):
    return encoder_for(loaded, loaded.model, torch.device("cpu"), batch_size, workers, "fp32", **kwargs)


def members(root: Path, split: str = "test") -> list[tuple[str, bytes]]:
    """Every (member name, bytes) of the split's shards, in shard order: what CLIP_benchmark reads."""
    found = []
    for number in range(int((root / split / "nshards.txt").read_text())):
        with tarfile.open(root / split / f"{number}.tar") as tar:
            found += [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    return found


def direct_images(loaded, root: Path) -> tuple[torch.Tensor, list]:
    """Image embeddings and raw targets written from the layout's definition, independently of clipfit.eval."""
    samples: dict[str, dict] = {}
    for name, data in members(root):
        key, _, extension = name.partition(".")
        samples.setdefault(key, {})[extension] = data
    pixels, targets = [], []
    for sample in samples.values():
        extension = next(e for e in ("webp", "png", "jpg", "jpeg") if e in sample)
        image = Image.open(io.BytesIO(sample[extension]))
        image.load()
        pixels.append(loaded.preprocess_val(image.convert("RGB")))
        targets.append(sample.get("cls") or sample.get("npy") or sample.get("txt"))
    with torch.no_grad():
        return F.normalize(loaded.model.eval().encode_image(torch.stack(pixels)), dim=-1), targets


def direct_classifier(loaded, classes: list[str], templates: list[str]) -> torch.Tensor:
    with torch.no_grad():
        rows = [F.normalize(loaded.model.encode_text(loaded.tokenizer([t.format(c=c) for t in templates])), dim=-1).mean(0)
                for c in classes]
    return F.normalize(torch.stack(rows), dim=-1)


def test_the_layout_is_clip_benchmarks(tmp_path):
    root = write_set(tmp_path / "set", "classification")
    assert (root / "test" / "nshards.txt").read_text() == "3\n"  # 13 samples, 5 a shard
    assert (root / "classnames.txt").read_text().splitlines() == CLASSES and not (root / "dataset_type.txt").exists()
    names = [name for name, _ in members(root)]
    assert set(names[:2]) == {"s0000000.webp", "s0000000.cls"} and {"s0000001.png", "s0000002.jpg"} <= set(names)
    data = open_wds("wds/mine", root)
    assert (data.kind, data.classes, data.templates) == ("classification", CLASSES, TEMPLATES)
    assert data.sources["templates"] == str(root / "zeroshot_classification_templates.txt")
    assert [s.name for s in data.shards] == ["0.tar", "1.tar", "2.tar"]


@pytest.mark.parametrize("workers", [0, 2])
def test_classification_scores_as_a_direct_computation(tmp_path, tiny_model, workers):
    root = write_set(tmp_path / "set", "classification")
    ours = zeroshot(encoder(tiny_model, workers), open_wds("wds/mine", root))
    images, raw = direct_images(tiny_model, root)
    targets = torch.tensor([int(t) for t in raw])
    similarity = images @ direct_classifier(tiny_model, CLASSES, TEMPLATES).T
    predicted = similarity.argmax(1)
    assert len(set(predicted.tolist())) > 1  # the random model is not constant, so the comparison has teeth
    assert ours["acc1"] == pytest.approx(100 * (predicted == targets).float().mean().item(), abs=1e-4)
    top5 = (similarity.topk(5, dim=1).indices == targets[:, None]).any(1).float().mean().item()
    assert ours["acc5"] == pytest.approx(100 * top5, abs=1e-4)
    from sklearn.metrics import balanced_accuracy_score

    assert ours["mean_per_class_recall"] == pytest.approx(100 * balanced_accuracy_score(targets, predicted), abs=1e-4)
    assert list(ours)[:2] == ["acc1", "ece"]  # calibration next to top-1


def test_multilabel_is_clip_benchmarks_mean_average_precision(tmp_path, tiny_model):
    root = write_set(tmp_path / "set", "multilabel")
    data = open_wds("wds/voc2007_multilabel", root)
    assert data.kind == "multilabel"
    ours = zeroshot(encoder(tiny_model), data)
    images, raw = direct_images(tiny_model, root)
    targets = torch.tensor(np.stack([np.load(io.BytesIO(t)) for t in raw]))
    scores = 100 * images @ direct_classifier(tiny_model, CLASSES, TEMPLATES).T
    per_class = []
    for c in range(len(CLASSES)):  # the definition, one class at a time
        truth = targets[scores[:, c].argsort(descending=True), c].double()
        precision = truth.cumsum(0) / torch.arange(1, len(truth) + 1)
        per_class.append((precision * truth).sum() / max(truth.sum(), 1))
    assert ours == {"mean_average_precision": pytest.approx(100 * torch.stack(per_class).mean().item(), abs=1e-5)}


def test_multi_caption_retrieval_finds_an_image_by_any_caption(tmp_path, tiny_model):
    root = write_set(tmp_path / "set", "retrieval", n=14)
    data = open_wds("wds/flickr30k", root)
    features = data.pair_features(encoder(tiny_model, workers=2))
    images, raw = direct_images(tiny_model, root)
    captions = [t.decode().splitlines() for t in raw]
    assert [len(c) for c in captions][:3] == [1, 2, 3]  # one, two and three captions per image
    owner = torch.tensor([i for i, lines in enumerate(captions) for _ in lines])
    with torch.no_grad():
        text = F.normalize(tiny_model.model.encode_text(tiny_model.tokenizer([c for lines in captions for c in lines])), dim=-1)
    assert torch.allclose(features.image, images, atol=1e-5) and torch.allclose(features.text, text, atol=1e-5)
    assert torch.equal(features.text_image, owner)
    from clipfit.eval.retrieval import retrieval_metrics

    ours = retrieval_metrics(features)
    scores = images @ text.T
    for k in (1, 5):  # image -> text: found when ANY of its captions is in the top k (CLIP_benchmark's rule)
        top = scores.topk(k, dim=1).indices
        found = [(owner[top[i]] == i).any().item() for i in range(len(images))]
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(100 * np.mean(found), abs=1e-4)
        top = scores.T.topk(k, dim=1).indices  # text -> image: each caption finds its image
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(
            100 * (top == owner[:, None]).any(1).float().mean().item(), abs=1e-4)


def test_shards_stream_a_batch_at_a_time(tmp_path, tiny_model, monkeypatch):
    """Pixels of one batch in memory, not of the set: the first batch comes after decoding 4 images of 13."""
    import clipfit.eval.wds as wds

    root = write_set(tmp_path / "set", "classification")
    decoded = []
    original = wds.decode_image
    monkeypatch.setattr(wds, "decode_image", lambda data, where: decoded.append(where) or original(data, where))
    batches = iter(ShardSamples(open_wds("wds/mine", root).shards, "classification", tiny_model.preprocess_val, 4))
    first = next(batches)
    assert first["image"].shape[0] == 4 and len(decoded) == 4
    assert sum(len(b["order"]) for b in batches) == 9 and len(decoded) == 13


def test_features_go_into_the_feature_cache(tmp_path, tiny_model, monkeypatch):
    from clipfit.cache import FeatureCache
    import clipfit.eval.wds as wds

    root = write_set(tmp_path / "set", "classification")
    cache = FeatureCache(tmp_path / "cache")
    identity = {"model": "tiny, fixed for this test"}
    first = zeroshot(encoder(tiny_model, identity=identity, feature_cache=cache), open_wds("wds/mine", root))
    assert cache.builds == 2 and sorted(e.kind for e in cache.entries()) == ["eval-wds", "zeroshot-classifier"]
    monkeypatch.setattr(wds, "tar_samples", lambda shard: pytest.fail("a cached set read its shards"))
    again = zeroshot(encoder(tiny_model, identity=identity, feature_cache=cache), open_wds("wds/mine", root))
    assert again == first and cache.hits == 2


def test_class_names_and_templates_fall_back_to_clip_benchmarks_files(tmp_path, tiny_model):
    root = write_set(tmp_path / "set", "classification")
    (root / "zeroshot_classification_templates.txt").unlink()
    data = open_wds("wds/vtab/cifar10", root)
    assert len(data.templates) == 18 and data.sources["templates"].endswith("templates.json[cifar10]")
    (root / "classnames.txt").unlink()
    with pytest.raises(DataError, match="no classnames.txt"):
        open_wds("wds/mine", root)


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "test" / "nshards.txt").unlink(), "nshards.txt: not found"),
    (lambda root: (root / "test" / "2.tar").unlink(), "2.tar: not found"),
    (lambda root: (root / "dataset_type.txt").write_text("detection\n"), "not a dataset type"),
])
def test_a_broken_layout_is_one_line_exit_3(tmp_path, tiny_config, damage, message):
    root = write_set(tmp_path / "set", "classification")
    damage(root)
    result = run_cli("eval", "zeroshot", "wds/mine", "--data", root, "--model", tiny_config, *TINY)
    assert result.returncode == 3 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_unreadable_image_names_its_shard_and_sample(tmp_path, tiny_model):
    root = tmp_path / "set"
    write_wds(root, [(image_bytes(0, np.random.default_rng(0)), "png", 0), (b"not an image", "png", 1)],
              classes=CLASSES, templates=TEMPLATES)
    with pytest.raises(DataError, match=r"0\.tar \(sample s0000001\): not a readable image"):
        zeroshot(encoder(tiny_model), open_wds("wds/mine", root))


def hub_copy(hf_home: Path, repo: str, root: Path) -> None:
    lay_out(hf_home, repo, {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}, repo_type="dataset")


def test_hf_hub_sets_read_the_local_cache_when_offline(tmp_path, tiny_config, tiny_model):
    from safetensors.torch import save_file

    root = write_set(tmp_path / "set", "classification")
    hub_copy(tmp_path / "hf", "someorg/wds_mine", root)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.model.state_dict().items()}, str(weights))
    model = ("--model", str(tiny_config), "--pretrained", str(weights), *TINY[2:])
    local = run_cli("eval", "zeroshot", "wds/mine", "--data", root, *model, "--json", "--cache-dir", tmp_path / "c1",
                    check=True)
    hub = subprocess.run([sys.executable, "-m", "clipfit", "eval", "zeroshot", "wds/mine", "--data",
                          "hf-hub:someorg/wds_mine", *model, "--json", "--cache-dir", str(tmp_path / "c2")],
                         capture_output=True, text=True, env=offline_env(tmp_path / "hf", cli_env()), timeout=300)
    assert hub.returncode == 0, hub.stderr
    ours, theirs = json.loads(local.stdout), json.loads(hub.stdout)
    assert theirs["metrics"] == ours["metrics"] and theirs["clipfit"]["images"] == 13
    assert str(tmp_path / "hf" / "hub" / "datasets--someorg--wds_mine") in theirs["clipfit"]["templates_source"]


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_set_without_network_is_one_line_and_exit_4_at_once(tmp_path, tiny_config, offline):
    env = offline_env(tmp_path / "hf", cli_env()) if offline else \
        {**{k: v for k, v in cli_env().items() if not k.startswith("HF_")}, "HF_HOME": str(tmp_path / "hf"),
         "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "clipfit", "eval", "zeroshot", "wds/cars", "--model", str(tiny_config),
                             *TINY], capture_output=True, text=True, env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 4 and len(lines) == 1, result.stderr
    assert lines[0].startswith("clipfit: error: hf-hub:clip-benchmark/wds_cars: ")  # the default: the hub's copy
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot reach") in lines[0]
    assert time.monotonic() - started < 60  # huggingface_hub alone retries for half a minute per file
