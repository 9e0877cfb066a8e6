"""Evaluating a run's own split: the validation yardsticks every method is judged by (CLIP loss,
R@1 both ways, modality gap), on the validation pairs or, without them, a training subset. A
labelled folder's split is also a zero-shot set of the run's own classes and templates, measured
as a classifier built from the model's text tower (top-1, top-5, mean per-class recall, ECE, and
the confusion matrix behind the report's per-class table)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from clipfit.data.images import DEFAULT_MAX_PIXELS, open_rgb
from clipfit.data.dataset import item_group
from clipfit.data.pairs import Pair
from clipfit.data.training import RunData
from clipfit.eval.datasets import LabelledImages
from clipfit.eval.encode import Encoder, encoder_for
from clipfit.eval.metrics import modality_gap, paired_retrieval
from clipfit.eval.retrieval import encode_pairs_all_captions, first_captions
from clipfit.eval.zeroshot import classifier_metrics, confusion_matrix
from clipfit.losses import clip_loss, positives_of
from clipfit.models import LoadedModel, base_logit_scale

VALIDATION_KEY = "retrieval:validation"  # the suite's name for the validation split: encoded once for both
TRAINING_SUBSET = 256  # pairs measured when there is no validation split


def eval_pairs(data: RunData) -> tuple[list[Pair], str]:
    """The pairs a run is measured on, and what run.json calls them."""
    if data.val:
        return data.val, "validation"
    # a labelled folder's pairs come class by class: every n-th spreads the subset over the classes
    every = -(-len(data.train) // TRAINING_SUBSET) if data.classes else 1
    return data.train[::every][:TRAINING_SUBSET], "training subset"


def eval_key(data: RunData) -> str:
    """The evaluation pairs' name in an Encoder's cache."""
    return VALIDATION_KEY if data.val else eval_pairs(data)[1]


def evaluate_split(model: nn.Module, pairs: list[Pair], loaded: LoadedModel, device: torch.device, batch_size: int,
                   max_pixels: int = DEFAULT_MAX_PIXELS, encoder: Encoder | None = None,
                   key: str = VALIDATION_KEY, multi_positive: bool = True) -> dict[str, float]:
    """Validation yardsticks every method is judged by: CLIP loss, R@1 both ways, modality gap,
    on each image with its first caption. With `multi_positive`, as in training, items of one class
    or with the same caption are positives of each other: the loss takes targets uniform over them
    and R@1 counts any of them as found (otherwise a class's identical captions tie, and R@1 could
    not rise above chance). `key` names the pairs in `encoder`'s cache."""
    encoder = encoder or encoder_for(loaded, model, device, batch_size, 0, "fp32")
    features = encode_pairs_all_captions(encoder, pairs, key, max_pixels)
    image, text = features.image, first_captions(features)
    positives = positives_of(torch.tensor([item_group(p, 0) for p in pairs])) if multi_positive else None
    retrieval = paired_retrieval(image, text, ks=(1,), positives=positives)
    with torch.no_grad():
        loss = clip_loss(image, text, base_logit_scale(model).exp().float().cpu(), positives).item()
    return {"clip_loss": loss, "image_to_text_R@1": retrieval["image_to_text_R@1"],
            "text_to_image_R@1": retrieval["text_to_image_R@1"], "modality_gap": modality_gap(image, text)}


def split_classes(data: RunData, max_pixels: int = DEFAULT_MAX_PIXELS) -> LabelledImages | None:
    """A labelled folder's evaluation pairs as a zero-shot set of its classes and templates (None for
    captioned layouts). Its images are keyed as the split's, so an Encoder encodes them once for both."""
    if data.classes is None:
        return None
    pairs, name = eval_pairs(data)
    return LabelledImages(name, eval_key(data), [p.image for p in pairs], [p.label for p in pairs],
                          list(data.classes.names), list(data.classes.templates),
                          partial(open_rgb, max_pixels=max_pixels))


def evaluate_classes(encoder: Encoder, labelled: LabelledImages | None) -> dict[str, float]:
    """The split measured as a classifier (clipfit.eval.zeroshot.classifier_metrics); nothing
    without classes."""
    return classifier_metrics(encoder, labelled) if labelled is not None else {}


def class_facts(encoder: Encoder, labelled: LabelledImages | None) -> dict | None:
    """What run.json keeps for the report: the classes, the confusion matrix (rows: true class,
    columns: predicted) and each class's top-1 (percent; None for a class without images here)."""
    if labelled is None:
        return None
    matrix = confusion_matrix(encoder, labelled)
    return {"classes": labelled.classes, "confusion": matrix,
            "per_class_acc1": [100.0 * row[i] / sum(row) if sum(row) else None for i, row in enumerate(matrix)]}
