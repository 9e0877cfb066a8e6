"""Zero-shot classification, computed as CLIP_benchmark does.

Class embedding = mean of the L2-normalised embeddings of the class name in every template,
renormalised. Logits = 100 · cos(image, class). The classifier (one row per class) of a model
with fixed weights is kept in the feature cache, keyed by the model, the class names and the
templates: ImageNet's 80,000 prompts are encoded once per model, not once per evaluation. Top-1, top-5 (with more than 5 classes),
mean per-class recall (sklearn's balanced accuracy: classes without images are left out), and the
expected calibration error `ece` of the softmax at the model's own logit scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clipfit.cache import texts_hash
from clipfit.eval.datasets import LabelledImages, fill
from clipfit.eval.encode import Encoder
from clipfit.eval.metrics import expected_calibration_error, geometry
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


def zeroshot(encoder: Encoder, data: LabelledImages) -> dict[str, float]:
    """Classification metrics (percent), then geometry with the class embeddings as the text side."""
    classifier = class_embeddings(encoder, data.classes, data.templates)
    images = encoder.images(data.images, data.load, data.key)
    labels = torch.tensor(data.labels)
    similarity = images @ classifier.T
    metrics = classification_metrics(100.0 * similarity, labels)
    metrics["ece"] = expected_calibration_error(model_logit_scale(encoder) * similarity, labels)
    return {**metrics, **geometry(images, classifier, (images, classifier[labels]))}


def model_logit_scale(encoder: Encoder) -> float:
    """exp(logit_scale) of the encoder's model: the temperature its own softmax uses, at which
    calibration is judged (ranking metrics use CLIP_benchmark's fixed 100, which ranks alike)."""
    return float(base_logit_scale(encoder.model).detach().exp())
