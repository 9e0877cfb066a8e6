"""Zero-shot classification, computed as CLIP_benchmark does.

Class embedding = mean of the L2-normalised embeddings of the class name in every template,
renormalised. Logits = 100 · cos(image, class); where a set groups the classifier's rows
(ImageNet's shifts, clipfit.eval.shifts) a class's logit is the largest of its rows'. The classifier (one row per class) of a model
with fixed weights is kept in the feature cache, keyed by the model, the class names and the
templates: ImageNet's 80,000 prompts are encoded once per model, not once per evaluation. Top-1, top-5 (with more than 5 classes),
mean per-class recall (sklearn's balanced accuracy: classes without images are left out), and the
expected calibration error `ece` of the softmax at the model's own logit scale, listed next to top-1.
A multi-label set (several classes per image) gets CLIP_benchmark's one metric for it, the mean
average precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clipfit.cache import texts_hash
from clipfit.eval.datasets import fill
from clipfit.eval.encode import Encoder
from clipfit.eval.metrics import expected_calibration_error, geometry, mean_average_precision
from clipfit.models import base_logit_scale


CLASSIFIER_FORMAT = 1


def class_embeddings(encoder: Encoder, classnames: list[str], templates: list[str]) -> Tensor:
    """(classes, dim): each class's template embeddings averaged and renormalised; from the
    encoder's feature cache when its model has a fixed identity."""

    def build() -> Tensor:
        texts = [fill(template, name) for name in classnames for template in templates]
        embedded = encoder.texts(texts, "class prompts")  # already normalised, class-major order
        return F.normalize(embedded.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)

    cache = getattr(encoder, "feature_cache", None)
    if getattr(encoder, "identity", None) is None or cache is None:
        return build()
    key = {"kind": "zeroshot-classifier", "format": CLASSIFIER_FORMAT, "model": encoder.identity,
           "classes": texts_hash(classnames), "templates": texts_hash(templates),
           "counts": [len(classnames), len(templates)], "precision": encoder.precision, "device": encoder.device.type}
    return cache.get_or_build(key, lambda: {"classifier": build()}, float_dtype=torch.float32)["classifier"]


def top_k_accuracy(logits: Tensor, targets: Tensor, k: int) -> float:
    top = logits.topk(k, dim=1).indices
    return 100.0 * (top == targets[:, None]).any(dim=1).float().mean().item()


def mean_per_class_recall(predictions: Tensor, targets: Tensor) -> float:
    recalls = [(predictions[targets == c] == c).float().mean() for c in targets.unique()]
    return 100.0 * torch.stack(recalls).mean().item()


def classification_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    metrics = {"acc1": top_k_accuracy(logits, targets, 1)}
    if logits.shape[1] > 5:
        metrics["acc5"] = top_k_accuracy(logits, targets, 5)
    metrics["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=1), targets)
    return metrics


def zeroshot_scores(encoder: Encoder, data) -> tuple[Tensor, Tensor, Tensor]:
    """(image embeddings, classifier, targets) of a set, computed once per Encoder and set.

    `data` is a clipfit.eval.datasets.LabelledImages or a clipfit.eval.wds.WdsSet: anything with
    `key`, `classes`, `templates`, `groups` and `features(encoder)` giving (image embeddings, targets)."""
    if ("zeroshot", data.key) not in encoder.cache:
        images, targets = data.features(encoder)
        encoder.cache["zeroshot", data.key] = (images, class_embeddings(encoder, data.classes, data.templates), targets)
    return encoder.cache["zeroshot", data.key]


def classifier_metrics(encoder: Encoder, data) -> dict[str, float]:
    """Top-1, ECE, top-5 (more than 5 classes) and mean per-class recall (percent) of a set; a
    multi-label set's mean average precision."""
    images, classifier, targets = zeroshot_scores(encoder, data)
    if targets.dim() == 2:  # one 0/1 column per class: multi-label
        return {"mean_average_precision": mean_average_precision(100.0 * images @ classifier.T, targets)}
    similarity = pooled(images @ classifier.T, data.groups)
    metrics = classification_metrics(100.0 * similarity, targets)
    ece = expected_calibration_error(model_logit_scale(encoder) * similarity, targets)
    return {"acc1": metrics.pop("acc1"), "ece": ece, **metrics}


def zeroshot(encoder: Encoder, data) -> dict[str, float]:
    """Classification metrics (percent), then geometry with the class embeddings as the text side."""
    metrics = classifier_metrics(encoder, data)
    images, classifier, targets = zeroshot_scores(encoder, data)
    if targets.dim() == 2:
        return metrics
    classes = class_rows(classifier, data.groups)
    return {**metrics, **geometry(images, classes, (images, classes[targets]))}


def confusion_matrix(encoder: Encoder, data) -> list[list[int]]:
    """Images of true class i (row) predicted as class j (column)."""
    images, classifier, targets = zeroshot_scores(encoder, data)
    n = data.class_count
    cells = targets * n + pooled(images @ classifier.T, data.groups).argmax(dim=1)
    return torch.bincount(cells, minlength=n * n).view(n, n).tolist()


def pooled(scores: Tensor, groups: list[list[int]] | None) -> Tensor:
    """Each evaluated class's score, the largest of its classifier rows' scores (WiSE-FT's class
    mask for ImageNet-R and -A, its pooling for ObjectNet); without groups, `scores` as they are."""
    if groups is None:
        return scores
    width = max(map(len, groups))
    index = torch.tensor([group + group[:1] * (width - len(group)) for group in groups])  # a repeat changes no max
    return scores[:, index].amax(dim=2)


def class_rows(classifier: Tensor, groups: list[list[int]] | None) -> Tensor:
    """One embedding per evaluated class: its row, or its group's rows averaged and renormalised."""
    if groups is None:
        return classifier
    return F.normalize(torch.stack([classifier[group].mean(dim=0) for group in groups]), dim=-1)


def model_logit_scale(encoder: Encoder) -> float:
    """exp(logit_scale) of the encoder's model: the temperature its own softmax uses, at which
    calibration is judged (ranking metrics use CLIP_benchmark's fixed 100, which ranks alike)."""
    return float(base_logit_scale(encoder.model).detach().exp())
