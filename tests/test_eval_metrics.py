"""Evaluation metrics against hand-built cases, and the before/after gate's arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipfit.eval.metrics import (caption_retrieval, expected_calibration_error, geometry, mean_reciprocal_rank,
                                  modality_gap_mse, paired_retrieval, recall_at_k, uniformity)
from clipfit.eval.results import benchmark_json, is_rate
from clipfit.eval.suite import gate
from clipfit.eval.suites import SetSpec, parse_specs
from clipfit.errors import GateFailed, UsageError


def unit(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_perfectly_aligned_embeddings_give_full_recall_and_mrr_one():
    x = unit(64)
    metrics = paired_retrieval(x, x)
    assert metrics["image_to_text_R@1"] == metrics["text_to_image_R@1"] == 100.0
    assert metrics["image_to_text_mrr"] == pytest.approx(1.0)


def test_shuffled_embeddings_retrieve_at_about_chance():
    n = 400
    image, text = unit(n, 64, seed=1), unit(n, 64, seed=2)  # unrelated: any match is luck
    metrics = caption_retrieval(image, text, torch.arange(n))
    assert metrics["image_retrieval_recall@1"] < 2.0  # chance is 0.25%
    assert 0.5 < metrics["text_retrieval_recall@10"] < 6.0  # chance is 2.5%
    assert metrics["image_retrieval_mrr"] < 0.05


def test_ranks_by_hand():
    similarity = torch.tensor([[0.9, 0.5, 0.1],   # positive col 0: rank 1
                               [0.8, 0.7, 0.1],   # positive col 1: rank 2
                               [0.8, 0.7, 0.1]])  # positive col 2: rank 3
    positives = torch.eye(3, dtype=torch.bool)
    assert recall_at_k(similarity, positives, ks=(1, 2, 3)) == pytest.approx({1: 100 / 3, 2: 200 / 3, 3: 100.0})
    assert mean_reciprocal_rank(similarity, positives) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_ties_count_against_the_query_so_a_collapsed_model_scores_zero():
    same = F.normalize(torch.ones(10, 4), dim=-1)
    assert paired_retrieval(same, same)["image_to_text_R@1"] == 0.0


def test_with_positives_a_repeated_caption_is_found_by_every_image_it_describes():
    # two classes, each image's caption the class's one text: without positives the identical
    # captions tie and count against the query (R@1 0); with them, any same-class hit is found
    image = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    groups = torch.tensor([0, 0, 1, 1])
    positives = groups[:, None] == groups[None, :]
    assert paired_retrieval(image, text, ks=(1,))["image_to_text_R@1"] == 0.0
    grouped = paired_retrieval(image, text, ks=(1, 2), positives=positives)
    # image 1 (0.8, 0.6) scores class 0's text 0.8 and class 1's 0.6: found; so are the others
    assert grouped["image_to_text_R@1"] == 100.0
    # text→image: class 0's text ranks image 0 (1.0) first, class 1's image 2 (1.0): every query found
    assert grouped["text_to_image_R@1"] == 100.0
    # a misplaced image: image 3 now sits nearer class 0, so class 1's text still finds image 2,
    # but image 3 finds class 0's texts first (rank 3 of 4 behind the two tied class-0 texts)
    image[3] = torch.tensor([0.8, 0.6])
    moved = paired_retrieval(image, text, ks=(1, 3), positives=positives)
    assert moved["image_to_text_R@1"] == 75.0 and moved["image_to_text_R@3"] == 100.0
    assert moved["image_to_text_mrr"] == pytest.approx((1 + 1 + 1 + 1 / 3) / 4)


def test_positives_equal_to_the_identity_give_the_paired_numbers():
    image, text = unit(50, seed=3), unit(50, seed=4)
    assert paired_retrieval(image, text, positives=torch.eye(50, dtype=torch.bool)) == paired_retrieval(image, text)


def test_an_image_is_found_when_any_of_its_captions_is_in_the_top_k():
    image = torch.eye(3)
    # captions 0,1 belong to image 0 (caption 1 points elsewhere), caption 2 to image 1, caption 3 to image 2
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [0, 0.6, 0.8]])
    text_image = torch.tensor([0, 0, 1, 2])
    metrics = caption_retrieval(image, text, text_image, ks=(1,))
    assert metrics["text_retrieval_recall@1"] == pytest.approx(100 * 2 / 3)  # image 2 ranks caption 1, not its own, first
    assert metrics["image_retrieval_recall@1"] == pytest.approx(100 * 3 / 4)  # caption 1 finds image 2, not its own image 0


def test_geometry_by_hand():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    result = geometry(image, text)
    assert result["modality_gap"] == pytest.approx(math.sqrt(2))
    assert result["modality_gap_mse"] == pytest.approx(1.0)  # centroid difference (1, -1): squares average to 1
    assert result["alignment"] == pytest.approx(2.0)
    assert geometry(text, text)["modality_gap"] == 0.0
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniformity(antipodal) == pytest.approx(-8.0)  # squared distance 4: log exp(-8)
    assert modality_gap_mse(image, image) == 0.0


def test_alignment_uses_each_captions_own_image():
    image = torch.eye(2)
    text = torch.eye(2)[[1, 1, 0]]  # captions of images 1, 1, 0: all on their own image
    result = geometry(image, text, (image[torch.tensor([1, 1, 0])], text))
    assert result["alignment"] == 0.0


def test_benchmark_json_has_clip_benchmark_shape_and_fractions():
    record = benchmark_json("cifar10", "ViT-B-32", "openai", "zeroshot_classification",
                            {"acc1": 50.0, "acc5": 90.0, "mean_per_class_recall": 40.0, "modality_gap": 0.8})
    assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert record["metrics"] == {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.4, "modality_gap": 0.8}
    assert is_rate("image_retrieval_recall@5") and is_rate("lp_acc1") and not is_rate("text_retrieval_mrr")


def zeroshot_results(before: float, after: float) -> tuple[dict, dict]:
    return {"zeroshot/cifar10/acc1": before, "clip_loss": 1.0}, {"zeroshot/cifar10/acc1": after, "clip_loss": 0.5}


@pytest.mark.parametrize("points, before, after, passed", [
    (1.0, 50.0, 49.5, True),    # dropped 0.5 ≤ 1
    (1.0, 50.0, 48.0, False),   # dropped 2 > 1
    (0.0, 50.0, 50.0, True),    # no drop allowed, none happened
    (-2.0, 50.0, 53.0, True),   # a rise of at least 2 demanded, 3 came
    (-2.0, 50.0, 51.0, False),  # a rise of 1 is not enough
])
def test_gate_direction(points, before, after, passed):
    result = gate(points, *zeroshot_results(before, after))
    assert result["passed"] is passed
    assert result["sets"]["cifar10"]["drop"] == pytest.approx(before - after)


def test_gate_off_without_points():
    assert gate(None, *zeroshot_results(50, 0)) is None


def test_zeroshot_spec_parsing():
    assert parse_specs(["imagenet=/data/val"]) == [SetSpec("imagenet", "/data/val")]  # DATASET=PATH as before
    assert parse_specs(["wds/cars", "wds/cars=/data/cars"]) == [SetSpec("wds/cars", None), SetSpec("wds/cars", "/data/cars")]
    for bad in ("imagenet", "mnist=/x", "folder=", "wds/", "wds/cars="):
        with pytest.raises(UsageError):
            parse_specs([bad])
    assert GateFailed.exit_code == 6


def test_expected_calibration_error_by_hand():
    # confidences 0.75, 0.75, 0.9, 0.7 (softmax of [ln p/(1-p), 0]); 15 bins of width 1/15:
    # bin (11/15, 12/15]: 0.75 right, 0.75 wrong -> |0.5 - 0.75| * 2/4 = 0.125
    # bin (13/15, 14/15]: 0.9 right              -> |1 - 0.9|    * 1/4 = 0.025
    # bin (10/15, 11/15]: 0.7 wrong              -> |0 - 0.7|    * 1/4 = 0.175   total 0.325
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = torch.tensor([[logit(0.75), 0.0], [logit(0.75), 0.0], [0.0, logit(0.9)], [logit(0.7), 0.0]])
    targets = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(logits, targets) == pytest.approx(32.5)
    # the same predictions at a lower temperature are more confident, and here worse calibrated
    assert expected_calibration_error(4 * logits, targets) > 32.5


def test_expected_calibration_error_is_zero_when_confidence_matches_accuracy():
    # two rows at confidence 0.5 exactly (one right, one wrong) and one certain, right row
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [100.0, 0.0]])
    assert expected_calibration_error(logits, torch.tensor([0, 1, 0])) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


def test_mean_average_precision_by_hand():
    # class 0 ranks items 0,1,2,3 with positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2 = 5/6
    # class 1 has no positive item: AP 0, counted as CLIP_benchmark counts it; mean 5/12
    from clipfit.eval.metrics import mean_average_precision

    scores = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.3, 0.4], [0.1, 0.6]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]])
    assert mean_average_precision(scores, targets) == pytest.approx(100 * 5 / 12)
    assert mean_average_precision(scores[:, :1], targets[:, :1]) == pytest.approx(100 * 5 / 6)
