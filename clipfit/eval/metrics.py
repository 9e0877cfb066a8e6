"""Metrics on embeddings: pure functions of tensors.

Each takes L2-normalised embeddings unless its docstring says otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def recall_at_k(similarity: Tensor, positives: Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """Percentage of queries (rows) with at least one positive among their top-k columns.

    `positives` is a boolean matrix of the same shape marking the correct columns.
    """
    order = similarity.argsort(dim=1, descending=True)
    hits = positives.gather(1, order)
    first_hit = torch.where(hits.any(1), hits.float().argmax(1), torch.full_like(hits[:, 0], hits.shape[1], dtype=torch.long))
    return {k: 100.0 * (first_hit < k).float().mean().item() for k in ks}


def mean_reciprocal_rank(similarity: Tensor, positives: Tensor) -> float:
    """Mean over queries of 1 / (rank of the first positive), ranks starting at 1."""
    order = similarity.argsort(dim=1, descending=True)
    hits = positives.gather(1, order)
    first_hit = hits.float().argmax(1)
    return (1.0 / (first_hit + 1).float()).mean().item()


def paired_retrieval(image: Tensor, text: Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Image→text and text→image Recall@k and MRR when row i of each is the only match."""
    similarity = image @ text.T
    positives = torch.eye(len(image), dtype=torch.bool)
    i2t, t2i = recall_at_k(similarity, positives, ks), recall_at_k(similarity.T, positives, ks)
    metrics = {f"image_to_text_R@{k}": v for k, v in i2t.items()}
    metrics.update({f"text_to_image_R@{k}": v for k, v in t2i.items()})
    metrics["image_to_text_mrr"] = mean_reciprocal_rank(similarity, positives)
    metrics["text_to_image_mrr"] = mean_reciprocal_rank(similarity.T, positives)
    return metrics


def modality_gap(image: Tensor, text: Tensor) -> float:
    """‖mean(image) − mean(text)‖₂, the distance of the modality centroids (Liang et al. 2022)."""
    return (image.mean(0) - text.mean(0)).norm().item()
