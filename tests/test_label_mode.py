"""Training on a folder of classes through the real CLI: every method, LoRA, locked towers and the
feature cache, --eval-zeroshot, the split measured as a classifier (run.json, report, --select-best
val/acc1), `clipfit sweep` and `clipfit interpolate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, tiny_refine_args

CLASSES = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}
TEMPLATES = ["a photo of a {c}.", "a {c}.", "art of the {c}.", "a blurry {c}."]
VALIDATION = 6  # 0.34 of each class of 6 images: 2 per class, stratified


@pytest.fixture(scope="module")
def classes_dir(tmp_path_factory):
    """Three classes of six noisy colour squares, and a templates file of four prompts."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / "set" / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "set" / name / f"{i}.png")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def label_run(classes_dir, out, tiny_config, *extra: str) -> dict:
    run_cli(*tiny_refine_args(classes_dir / "set", out, tiny_config, "--batch-size", "6", "--val-split", "0.34",
                              "--max-steps", "2", "--lr", "1e-3", "--templates", classes_dir / "templates.txt",
                              "--cache-dir", classes_dir / "cache", *extra), check=True)
    return json.loads((out / "run.json").read_text())


def texts_encoded(info: dict, method: str) -> int:
    """Caption texts the run's frozen work encoded: the teacher's, or the locked text tower's rows."""
    if method.startswith("refine"):
        return info["teacher"]["items_encoded_by_rank_0"]["text"]
    return info["locked_towers"]["towers"]["text"]["rows"]


@pytest.mark.parametrize("method, extra", [
    ("contrastive", []),
    ("refine", ["--lora"]),
    ("lite", ["--lock-text"]),
    ("ping", ["--lock-image"]),
    ("dclip", ["--dclip-teacher-epochs", "1"]),
    ("refine+lite", ["--eval-zeroshot", "folder=SET"]),
])
def test_every_method_trains_on_classes_and_is_measured_as_a_classifier(classes_dir, tmp_path, tiny_config,
                                                                         method, extra):
    extra = [e.replace("SET", str(classes_dir / "set")) for e in extra]
    out = tmp_path / "run"
    info = label_run(classes_dir, out, tiny_config, "--method", method, *extra)
    resolved = info["resolved"]
    assert resolved["layout"] == "classes" and resolved["classes"]["names"] == list(CLASSES)
    assert resolved["classes"]["templates"] == TEMPLATES and resolved["val_pairs"] == VALIDATION
    for side in ("before", "after"):
        assert {"acc1", "mean_per_class_recall", "ece"} <= set(info[side]) and "acc5" not in info[side]  # 3 classes
        facts = info[f"classes_{side}"]
        assert facts["classes"] == list(CLASSES)
        assert [sum(row) for row in facts["confusion"]] == [2, 2, 2]
        top1 = sum(facts["confusion"][i][i] for i in range(3)) / VALIDATION * 100
        assert info[side]["acc1"] == pytest.approx(top1)  # the matrix is the classifier that scored acc1
        assert facts["per_class_acc1"] == [50.0 * facts["confusion"][i][i] for i in range(3)]
    if method in ("refine", "lite"):  # frozen text rows: 3 classes x 4 templates, not 12 images x 4
        assert texts_encoded(info, method) == 12
    if "--eval-zeroshot" in extra:
        assert "zeroshot/set/acc1" in info["after"]
    report = (out / "report.md").read_text()
    assert "## Classes (validation" in report and "| true \\ predicted | blue | green | red |" in report
    assert "| image_to_text_R@1 |" in report  # a class's captions count as found: not the group's own-caption R@1
    assert "confusion.png" in report and 'alt="Confusion matrices' in (out / "report.html").read_text()


def test_select_best_val_acc1_keeps_the_step_with_the_best_split_top1(classes_dir, tmp_path, tiny_config):
    out = tmp_path / "run"
    info = label_run(classes_dir, out, tiny_config, "--select-best", "val/acc1", "--eval-every", "1")
    scores = [c["score"] for c in info["selection"]["candidates"]]
    assert info["selection"]["metric"] == "val/acc1" and len(scores) == 3  # the start and both steps
    assert info["after"]["acc1"] == max(scores)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc1"] for r in rows if "val_acc1" in r] == scores[1:]

    # WiSE-FT at α = 0 and 1 gives back the start's and the kept step's classifier, per class too
    wise = tmp_path / "wise"
    run_cli("interpolate", out, "--alpha", "0,1", "--out", wise, "--quiet", check=True)
    measured = json.loads((wise / "run.json").read_text())["interpolation"]["measured"]
    assert measured["α=0"]["acc1"] == info["before"]["acc1"] and measured["α=1"]["acc1"] == info["after"]["acc1"]
    wise_info = json.loads((wise / "run.json").read_text())
    chosen = wise_info["interpolation"]["alpha"]
    assert wise_info["classes_after"]["confusion"] == info["classes_before" if chosen == 0 else "classes_after"]["confusion"]
    assert "## Classes" in (wise / "report.md").read_text()


def test_the_feature_cache_keys_locked_rows_by_the_captions_of_the_classes(classes_dir, tmp_path, tiny_config):
    assert label_run(classes_dir, tmp_path / "four", tiny_config, "--lock-text")["locked_towers"]["towers"]["text"]["rows"] == 12
    (tmp_path / "three.txt").write_text("\n".join(TEMPLATES[:3]) + "\n")
    fewer = label_run(classes_dir, tmp_path / "fewer", tiny_config, "--lock-text", "--templates", tmp_path / "three.txt")
    assert fewer["locked_towers"]["towers"]["text"]["rows"] == 9  # other captions: another entry, not a stale hit
    listing = json.loads(run_cli("cache", "ls", "--cache-dir", classes_dir / "cache", "--json", check=True).stdout)
    assert {e["shapes"]["texts"][0] for e in listing["entries"] if "texts" in e["shapes"]} == {9, 12}


def test_a_sweep_chooses_among_label_runs_by_the_split_top1(classes_dir, tmp_path, tiny_config):
    out = tmp_path / "sweep"
    run_cli("sweep", classes_dir / "set", "--model", tiny_config, "--pretrained", "none", "--out", out, "--quiet",
            "--batch-size", "6", "--workers", "0", "--val-split", "0.34", "--max-steps", "1",
            "--templates", classes_dir / "templates.txt", "--method", "contrastive,lite", "--lr", "1e-3",
            "--select-best", "val/acc1", check=True)
    summary = json.loads((out / "sweep.json").read_text())
    scores = [c["score"] for c in summary["selection"]["candidates"]]
    assert summary["selection"]["metric"] == "val/acc1" and len(scores) == 2
    assert scores == [r["after"]["acc1"] for r in summary["runs"]]


def test_classifier_metrics_need_a_folder_of_classes(pairs_dir, tmp_path, tiny_config):
    out = tmp_path / "run"
    result = run_cli(*tiny_refine_args(pairs_dir, out, tiny_config, "--val-split", "0.25", "--select-best", "val/acc1"))
    assert result.returncode == 2
    assert "--select-best 'val/acc1': not a metric this run measures; valid: val/clip_loss" in result.stderr
    assert not (out / "run.json").exists()


def test_without_a_validation_split_the_measured_subset_spans_every_class(tmp_path):
    from pathlib import Path

    from clipfit.data.check import CheckReport
    from clipfit.data.pairs import ClassSet, Pair
    from clipfit.data.training import RunData
    from clipfit.eval.split import TRAINING_SUBSET, eval_pairs

    classes = ClassSet(("a", "b", "c"), ("a", "b", "c"), ("{c}",))
    pairs = [Pair(Path(f"{label}/{i}.png"), (classes.names[label],), f"{label}/{i}.png", label=label)
             for label in range(3) for i in range(200)]  # read class by class, as the layout lists them
    data = RunData(pairs, [], CheckReport("root", "classes", pairs, classes=classes), "hash")
    subset, name = eval_pairs(data)
    assert name == "training subset" and len(subset) == 200 <= TRAINING_SUBSET
    assert [sum(p.label == c for p in subset) for c in range(3)] in ([67, 67, 66], [67, 66, 67], [66, 67, 67])


def test_an_encoder_encodes_each_distinct_text_once(tiny_config):
    import torch

    from clipfit.eval.encode import encoder_for
    from clipfit.models import load_model

    loaded = load_model(str(tiny_config), "none")
    encoder = encoder_for(loaded, loaded.model, torch.device("cpu"), 2, 0, "fp32")
    rows, outputs = [], encoder.outputs  # every batch any tower runs passes Encoder.outputs
    encoder.outputs = lambda encode, chunks, *rest: rows.append(sum(map(len, chunks))) or outputs(encode, chunks, *rest)
    first = encoder.texts(["a cat", "a dog", "a cat"])
    second = encoder.texts(["a dog", "a bird"])  # the split's captions, then its classifier's prompts
    assert rows == [2, 1]
    assert torch.equal(first[0], first[2]) and torch.equal(first[1], second[0])
    alone = encoder_for(loaded, loaded.model, torch.device("cpu"), 2, 0, "fp32").texts(["a bird", "a cat"])
    assert torch.allclose(alone, torch.stack([second[1], first[0]]), atol=1e-6)


def test_the_split_counts_a_class_s_shared_caption_as_found_by_every_image_of_the_class(classes_dir, tiny_config):
    """A labelled split's first captions are one text per class; with multi-positive targets (the
    default) an image's R@1 asks whether its class's text ranks first, and the loss spreads each
    row's target over its class; one-hot, the identical texts tie and R@1 cannot rise above 0."""
    import torch
    import torch.nn.functional as F

    from clipfit.data.layouts import load_pairs
    from clipfit.data.training import split_val
    from clipfit.eval.encode import encoder_for
    from clipfit.eval.retrieval import encode_pairs_all_captions, first_captions
    from clipfit.eval.split import evaluate_split
    from clipfit.models import base_logit_scale, load_model

    loaded = load_model(str(tiny_config), "none")
    pairs = load_pairs(classes_dir / "set", templates=str(classes_dir / "templates.txt")).pairs
    val = split_val(pairs, 0.34, seed=0)[1]
    cpu = torch.device("cpu")
    encoder = encoder_for(loaded, loaded.model, cpu, 8, 0, "fp32")
    grouped = evaluate_split(loaded.model, val, loaded, cpu, 8, encoder=encoder, key="val")
    one_hot = evaluate_split(loaded.model, val, loaded, cpu, 8, encoder=encoder, key="val", multi_positive=False)
    assert one_hot["image_to_text_R@1"] == 0.0

    features = encode_pairs_all_captions(encoder, val, "val")
    image, text = features.image, first_captions(features)
    labels = torch.tensor([p.label for p in val])
    top = (image @ text.T).argmax(dim=1)
    assert grouped["image_to_text_R@1"] == pytest.approx(100 * (labels[top] == labels).float().mean().item())
    logits = base_logit_scale(loaded.model).exp().item() * image @ text.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    by_hand = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    assert grouped["clip_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    assert grouped["modality_gap"] == one_hot["modality_gap"]
