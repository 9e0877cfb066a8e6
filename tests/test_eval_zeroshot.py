"""Zero-shot classification against a direct implementation, template averaging, data sets, linear probe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipfit.errors import DataError, UsageError
from clipfit.eval.datasets import read_templates, stratified_split
from clipfit.eval.sets import load_labelled
from clipfit.eval.encode import encoder_for
from clipfit.eval.linear_probe import fit_logistic
from clipfit.eval.zeroshot import class_embeddings, classification_metrics, zeroshot

CLASSES = ["apple", "boat", "cat", "dog", "egg", "fish", "goat"]


def write_image_folder(root: Path, classes=CLASSES, per_class: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(30 * k, 40, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    from clipfit.models import load_model

    torch.manual_seed(0)
    return load_model(str(tiny_config), "none")


def direct_zeroshot(loaded, root: Path, classnames: list[str], templates: list[str]):
    """Written from the definition, independently of clipfit.eval: (classifier, logits, targets)."""
    model = loaded.model.eval()
    with torch.no_grad():
        weights = []
        for name in classnames:
            tokens = loaded.tokenizer([t.replace("{c}", name) for t in templates])
            embedded = F.normalize(model.encode_text(tokens), dim=-1).mean(dim=0)
            weights.append(embedded / embedded.norm())
        classifier = torch.stack(weights, dim=1)
        images, targets = [], []
        for label, folder in enumerate(sorted(p.name for p in root.iterdir())):
            for path in sorted((root / folder).iterdir()):
                images.append(loaded.preprocess_val(Image.open(path).convert("RGB")))
                targets.append(label)
        features = F.normalize(model.encode_image(torch.stack(images)), dim=-1)
    return classifier.T, 100.0 * features @ classifier, torch.tensor(targets)


def test_zeroshot_matches_a_direct_implementation(tmp_path, tiny_model):
    root = write_image_folder(tmp_path / "folder")
    templates_file = tmp_path / "templates.txt"
    templates = ["a photo of a {c}.", "a drawing of the {c}", "{c}"]
    templates_file.write_text("\n".join(templates))
    classifier, logits, targets = direct_zeroshot(tiny_model, root, CLASSES, templates)

    data = load_labelled("folder", root, templates_file=str(templates_file))
    encoder = encoder_for(tiny_model, tiny_model.model, torch.device("cpu"), batch_size=4, workers=0, precision="fp32")
    ours = zeroshot(encoder, data)

    top1 = 100.0 * (logits.argmax(1) == targets).float().mean().item()
    top5 = 100.0 * np.mean([t in row for row, t in zip(logits.topk(5, dim=1).indices.tolist(), targets.tolist())])
    per_class = [100.0 * (logits.argmax(1)[targets == c] == c).float().mean().item() for c in range(len(CLASSES))]
    assert ours["acc1"] == pytest.approx(top1, abs=1e-4)  # float32 means; one image is 4.8 points
    assert ours["acc5"] == pytest.approx(top5, abs=1e-4)  # float32 means; one image is 4.8 points
    assert ours["mean_per_class_recall"] == pytest.approx(np.mean(per_class), abs=1e-4)  # float32 means; one image is 4.8 points
    assert torch.allclose(class_embeddings(encoder, CLASSES, templates), classifier, atol=1e-5)
    scale = tiny_model.model.logit_scale.exp().item()  # calibration at the model's own temperature
    assert ours["ece"] == pytest.approx(numpy_ece(scale / 100.0 * logits.numpy(), targets.numpy()), abs=1e-4)
    assert len(set(logits.argmax(1).tolist())) > 1  # the random model is not constant, so the check has teeth


def numpy_ece(logits: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s ECE written out with numpy's bin edges, as a cross-check."""
    exp = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = exp / exp.sum(1, keepdims=True)
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == targets
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        members = (confidence > low) & (confidence <= high)
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return 100.0 * total


class FakeEncoder:
    """Returns fixed, already-normalised text embeddings in request order."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings
        self.requested: list[str] = []

    def texts(self, texts, description=""):
        self.requested = list(texts)
        return self.embeddings


def test_class_embedding_is_the_renormalised_mean_of_normalised_template_embeddings():
    s = 2 ** -0.5
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0],   # class "a": two templates
                               [s, s], [s, s]])          # class "b": identical templates
    encoder = FakeEncoder(embeddings)
    result = class_embeddings(encoder, ["a", "b"], ["x {c}", "{c} y"])
    assert encoder.requested == ["x a", "a y", "x b", "b y"]
    assert torch.allclose(result, torch.tensor([[s, s], [s, s]]))
    assert torch.allclose(result.norm(dim=1), torch.ones(2))


def test_top5_only_with_more_than_five_classes_and_per_class_recall_averages_classes():
    targets = torch.tensor([0, 0, 0, 1])  # class 0 has 3 images, class 1 one
    logits = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0]])  # always predicts class 0
    metrics = classification_metrics(logits, targets)
    assert "acc5" not in metrics
    assert metrics["acc1"] == 75.0
    assert metrics["mean_per_class_recall"] == 50.0  # (100 + 0) / 2


def test_templates_and_classnames_files(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(["a {c}", "the {c}"]))
    assert read_templates(tmp_path / "t.json") == ["a {c}", "the {c}"]
    (tmp_path / "bad.txt").write_text("no placeholder here\n")
    with pytest.raises(UsageError, match="no {c}"):
        read_templates(tmp_path / "bad.txt")
    root = write_image_folder(tmp_path / "f", classes=["b_dir", "a_dir"], per_class=1)
    (tmp_path / "names.txt").write_text("first\nsecond\n")
    data = load_labelled("folder", root, classnames_file=str(tmp_path / "names.txt"))
    assert data.classes == ["first", "second"]  # folder order is sorted: a_dir, b_dir
    assert [p.parent.name for p in data.images] == ["a_dir", "b_dir"]
    assert len(data.templates) == 80  # open_clip's OpenAI ImageNet templates by default
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    with pytest.raises(UsageError, match="3 names"):
        load_labelled("folder", root, classnames_file=str(tmp_path / "three.txt"))


def test_imagenet_folder_uses_clip_benchmark_names_and_standard_indices(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    for synset in ("n01443537", "n01440764", "n15075141"):  # goldfish (1), tench (0), toilet tissue (999)
        (tmp_path / "val" / synset).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / synset / "x.JPEG")
    data = load_labelled("imagenet", tmp_path / "val")  # a subset of the synsets, placed without timm
    assert data.classes == list(IMAGENET_CLASSNAMES) and data.name == "imagenet1k"  # CLIP_benchmark's are open_clip's
    assert data.templates == [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert data.sources["templates"].endswith("en_zeroshot_classification_templates.json[imagenet1k]")
    assert data.labels == [0, 1, 999]
    (tmp_path / "val" / "not-a-synset").mkdir()
    with pytest.raises(DataError, match="synset"):
        load_labelled("imagenet", tmp_path / "val")


def clip_benchmark_data(file: str) -> dict:
    """CLIP_benchmark 1.6.2's data file as clipfit ships it."""
    from clipfit.eval.catalog import ASSETS

    return json.loads((ASSETS / file).read_text(encoding="utf-8"))


class FakeCifar:
    """torchvision's CIFAR classes check their files' md5, so no test can write a CIFAR folder:
    this stands in with torchvision's class names and a few images."""

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def __init__(self, root, train, download):
        assert not train and not download  # the test split, never downloaded
        self.targets = [k % 10 for k in range(12)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.new("RGB", (32, 32), (20 * self.targets[i], 100, 200 - 15 * self.targets[i])), self.targets[i]


def test_cifar_uses_its_own_templates_not_imagenets(tmp_path, monkeypatch, tiny_config, capsys):
    """CLIP_benchmark prompts CIFAR-10 with its 18 templates; clipfit used ImageNet's 80 before."""
    import torchvision.datasets

    from conftest import run_main

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCifar)
    templates = clip_benchmark_data("en_zeroshot_classification_templates.json")
    data = load_labelled("cifar10", tmp_path)
    assert data.templates == templates["cifar10"] and len(data.templates) == 18
    assert data.classes == FakeCifar.classes and data.sources["classnames"] == "torchvision FakeCifar.classes"
    capsys.readouterr()
    assert run_main(["eval", "zeroshot", "cifar10", "--data", str(tmp_path), "--model", str(tiny_config),
                     "--pretrained", "none", "--workers", "0", "--device", "cpu", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["templates"] == templates["cifar10"]  # the JSON says which templates were used
    assert record["clipfit"]["templates_source"] == "CLIP_benchmark en_zeroshot_classification_templates.json[cifar10]"
    assert record["clipfit"]["templates"] == 18 and record["clipfit"]["images"] == 12
    (tmp_path / "mine.txt").write_text("a {c}\n")
    assert load_labelled("cifar10", tmp_path, templates_file=str(tmp_path / "mine.txt")).templates == ["a {c}"]


def test_clip_benchmark_lookup_rule():
    """A set's own templates under its name (or a wds/ set's name after wds/), else ImageNet's."""
    from clipfit.eval.catalog import benchmark_classnames, benchmark_templates

    templates = clip_benchmark_data("en_zeroshot_classification_templates.json")
    assert benchmark_templates("cifar100").items == templates["cifar100"]
    assert benchmark_templates("wds/cars").items == templates["cars"]
    assert benchmark_templates("wds/vtab/dtd").items == templates["dtd"]
    assert benchmark_templates("imagenet-r").items == templates["imagenet1k"]  # none of its own
    assert benchmark_classnames("wds/vtab/eurosat").items == clip_benchmark_data("en_classnames.json")["eurosat"]
    assert benchmark_classnames("cifar10") is None  # CLIP_benchmark takes torchvision's


def test_cifar_without_files_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match="never downloads"):
        load_labelled("cifar10", tmp_path)


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = [0] * 10 + [1] * 5
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert sorted(kept + held) == list(range(15))
    assert sorted(labels[i] for i in held) == [0, 0, 1]


def test_logistic_regression_separates_separable_features_and_l2_shrinks_weights():
    x = torch.cat([torch.randn(20, 4) + 3, torch.randn(20, 4) - 3])
    y = torch.tensor([0] * 20 + [1] * 20)
    for optimizer in ("lbfgs", "adam"):
        weight, bias = fit_logistic(x, y, 2, 1e-4, optimizer)
        assert ((x.double() @ weight + bias).argmax(1) == y).all()
    strong, _ = fit_logistic(x, y, 2, 10.0)
    weak, _ = fit_logistic(x, y, 2, 1e-4)
    assert strong.norm() < weak.norm()
