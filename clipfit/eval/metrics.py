"""Metrics on embeddings: pure functions of tensors.

Each takes L2-normalised embeddings unless its docstring says otherwise. Rates (recall,
accuracy) are percentages; CLIP_benchmark's JSON wants fractions, which clipfit.eval.results
converts to when it writes one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

NO_POSITIVE = math.inf
ECE_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) and the robust fine-tuning papers use
UNIFORMITY_SAMPLE = 4096  # a seeded subsample keeps the pairwise distances at 8M
CHUNK = 1024  # query rows scored at a time: a (CHUNK x keys) matrix instead of (queries x keys)


class Undefined(float):
    """NaN that says why a metric has no value; written to JSON as null with that reason
    (clipfit.io.dumps_json). Arithmetic on it gives plain NaN."""

    reason: str

    def __new__(cls, reason: str) -> "Undefined":
        value = super().__new__(cls, math.nan)
        value.reason = reason
        return value


def undefined(reason: str) -> float:
    return Undefined(reason)


def is_number(value) -> bool:
    """A metric with a value: a finite int or float (not None, NaN or infinite)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def trivial_set(candidates: int, what: str) -> str | None:
    """Why scores ranking among `candidates` items are perfect whatever the model, or None.

    With one candidate every query's first guess is right: Recall@k, top-1 and MRR are 100%."""
    if candidates >= 2:
        return None
    return f"only {candidates} {what}: every query has one candidate, so its scores are 100% whatever the model"


def ranks_of_first_positive(similarity: Tensor, positives: Tensor) -> Tensor:
    """0-based rank of each row's best-scoring positive column (inf when a row has none).

    Ties count against the query: a negative scoring the same as the best positive ranks
    above it, so a collapsed model (all scores equal) gets recall 0, never 100.
    """
    best = similarity.masked_fill(~positives, -math.inf).max(dim=1, keepdim=True).values
    above = ((similarity >= best) & ~positives).sum(dim=1).float()
    return torch.where(positives.any(dim=1), above, torch.full_like(above, NO_POSITIVE))


def chunked_ranks(queries: Tensor, keys: Tensor, positives_of: Callable[[int, int], Tensor]) -> Tensor:
    """ranks_of_first_positive for queries @ keys.T, a chunk of rows at a time.

    `positives_of(start, stop)` returns the boolean positives of query rows start:stop.
    """
    ranks = [ranks_of_first_positive(queries[start:start + CHUNK] @ keys.T, positives_of(start, min(start + CHUNK, len(queries))))
             for start in range(0, len(queries), CHUNK)]
    return torch.cat(ranks) if ranks else torch.zeros(0)


def recall_from_ranks(ranks: Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    return {k: 100.0 * (ranks < k).float().mean().item() for k in ks}


def mrr_from_ranks(ranks: Tensor) -> float:
    return (1.0 / (ranks + 1)).mean().item()


def recall_at_k(similarity: Tensor, positives: Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """Percentage of queries (rows) with at least one positive among their top-k columns.

    `positives` is a boolean matrix of the same shape marking the correct columns.
    """
    return recall_from_ranks(ranks_of_first_positive(similarity, positives), ks)


def mean_reciprocal_rank(similarity: Tensor, positives: Tensor) -> float:
    """Mean over queries of 1 / (rank of the first positive), ranks starting at 1."""
    return mrr_from_ranks(ranks_of_first_positive(similarity, positives))


def paired_retrieval(image: Tensor, text: Tensor, ks=(1, 5, 10), positives: Tensor | None = None) -> dict[str, float]:
    """Image→text and text→image Recall@k and MRR when row i of each is the only match, or, with
    `positives` P (N×N bool, symmetric, True on the diagonal), when any j with P_ij is: a repeated
    caption matches every image it describes, a class's caption every image of the class."""

    def positives_of(start: int, stop: int) -> Tensor:
        if positives is not None:
            return positives[start:stop]
        return torch.arange(start, stop)[:, None] == torch.arange(len(text))[None, :]

    renamed = {}
    for direction, ranks in (("image_to_text", chunked_ranks(image, text, positives_of)),
                             ("text_to_image", chunked_ranks(text, image, positives_of))):
        renamed.update({f"{direction}_R@{k}": v for k, v in recall_from_ranks(ranks, ks).items()})
        renamed[f"{direction}_mrr"] = mrr_from_ranks(ranks)
    return renamed


def caption_retrieval(image: Tensor, text: Tensor, text_image: Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Retrieval when an image may have several captions; names as in CLIP_benchmark.

    `text_image[j]` is the index of caption j's image. image_retrieval (text→image): each
    caption must find its image. text_retrieval (image→text): an image counts as found when
    any of its captions is in the top k.
    """
    text_image = text_image.long()
    image_ids = torch.arange(len(image))
    t2i = chunked_ranks(text, image, lambda a, b: text_image[a:b, None] == image_ids[None, :])
    i2t = chunked_ranks(image, text, lambda a, b: image_ids[a:b, None] == text_image[None, :])
    metrics = {f"image_retrieval_recall@{k}": v for k, v in recall_from_ranks(t2i, ks).items()}
    metrics.update({f"text_retrieval_recall@{k}": v for k, v in recall_from_ranks(i2t, ks).items()})
    metrics["image_retrieval_mrr"] = mrr_from_ranks(t2i)
    metrics["text_retrieval_mrr"] = mrr_from_ranks(i2t)
    return metrics


def modality_gap(image: Tensor, text: Tensor) -> float:
    """‖mean(image) − mean(text)‖₂, the distance of the modality centroids (Liang et al. 2022)."""
    return (image.mean(0) - text.mean(0)).norm().item()


def modality_gap_mse(image: Tensor, text: Tensor) -> float:
    """CLIP-Refine's variant: mean squared difference of the centroids, per dimension."""
    return (image.mean(0) - text.mean(0)).pow(2).mean().item()


def alignment(image: Tensor, text: Tensor) -> float:
    """Mean squared distance of matched pairs, row i with row i (Wang & Isola 2020); lower is closer."""
    return (image - text).pow(2).sum(dim=1).mean().item()


def uniformity(embeddings: Tensor) -> float:
    """log mean over distinct pairs of exp(−2‖x − y‖²) (Wang & Isola 2020); lower is more uniform.

    Above UNIFORMITY_SAMPLE rows, a fixed random subsample of them is used."""
    if len(embeddings) < 2:
        return undefined(f"uniformity needs at least 2 embeddings, got {len(embeddings)}")
    if len(embeddings) > UNIFORMITY_SAMPLE:  # all pairs of 25k captions would be 312M distances
        keep = torch.randperm(len(embeddings), generator=torch.Generator().manual_seed(0))[:UNIFORMITY_SAMPLE]
        embeddings = embeddings[keep]
    squared = torch.pdist(embeddings.double()).pow(2)
    return (torch.logsumexp(-2 * squared, dim=0) - math.log(len(squared))).item()


def geometry(image: Tensor, text: Tensor, matched: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """Embedding-space geometry of an image set and a text set.

    `matched` holds the aligned (image, text) rows alignment is measured on; by default row i
    of `image` matches row i of `text`.
    """
    matched_image, matched_text = matched if matched is not None else (image, text)
    return {
        "modality_gap": modality_gap(image, text),
        "modality_gap_mse": modality_gap_mse(image, text),
        "alignment": alignment(matched_image, matched_text),
        "uniformity_image": uniformity(image),
        "uniformity_text": uniformity(text),
    }


def expected_calibration_error(logits: Tensor, targets: Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al. 2017), in percent like top-1.

    With p_i = max_c softmax(logits_i) the confidence of row i and B_1..B_M the rows whose
    confidence falls in (m−1)/M < p ≤ m/M (M = `bins` equal-width bins):
        ECE = Σ_m (|B_m| / n) · | acc(B_m) − conf(B_m) |
    where acc is the fraction of B_m whose arg-max is the target and conf the mean p over B_m.
    `logits` are at the temperature being judged: for a CLIP classifier, the model's logit scale
    times the cosine similarities.
    """
    if len(targets) == 0:
        return undefined("calibration error needs at least one prediction")
    probabilities = torch.softmax(logits.double(), dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == targets.to(predicted.device)).double()
    which = torch.clamp(torch.ceil(confidence * bins).long() - 1, 0, bins - 1)
    error = torch.zeros((), dtype=torch.float64)
    for m in which.unique():
        members = which == m
        error += members.double().mean() * (correct[members].mean() - confidence[members].mean()).abs()
    return 100.0 * error.item()


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Multi-label classification: the mean over classes of each class's average precision, in
    percent (CLIP_benchmark's `mean_average_precision`, there a fraction).

    `scores` and the 0/1 `targets` are (items, classes). For class c, with its column sorted by
    score from high to low and y_1..y_n the targets in that order:
        AP_c = Σ_i y_i · P_i / max(Σ_i y_i, 1),   P_i = (y_1 + … + y_i) / i
    so a class without positive items counts with AP 0, as in CLIP_benchmark.
    """
    if len(scores) == 0:
        return undefined("average precision needs at least one item")
    order = scores.argsort(dim=0, descending=True)
    truth = targets.gather(0, order).double()
    precision = truth.cumsum(0) / torch.arange(1, len(truth) + 1, dtype=torch.float64)[:, None]
    per_class = (precision * truth).sum(0) / truth.sum(0).clamp(min=1)
    return 100.0 * per_class.mean().item()
