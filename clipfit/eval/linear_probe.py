"""The linear evaluation protocol: logistic regression on frozen, normalised image features.

Data: PATH/train/ and PATH/test/ ImageFolders with the same class folders, or one ImageFolder
that is split by --seed, per class: 20% test, then 20% of the rest for validation. With
train/ and test/, validation is 20% of train/. The L2 strength is chosen on validation from
a log grid 1e-6…1e2 (CLIP_benchmark's range), refined by half a decade around the best; the
classifier is then refitted on train + validation and scored once on test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from clipfit.errors import DataError
from clipfit.eval.datasets import LabelledImages, stratified_split
from clipfit.eval.sets import load_labelled
from clipfit.eval.encode import Encoder
from clipfit.eval.zeroshot import classification_metrics

HELD_OUT = 0.2
L2_GRID = [10.0 ** e for e in range(-6, 3)]


@dataclass
class ProbeSplits:
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages


def probe_splits(path: str | Path, seed: int) -> ProbeSplits:
    root = Path(path)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = load_labelled("folder", root / "train"), load_labelled("folder", root / "test")
        if train.classes != test.classes:
            raise DataError(f"{root}: train/ and test/ must hold the same class folders")
        train.name = test.name = root.resolve().name
    else:
        whole = load_labelled("folder", root)
        kept, held = stratified_split(whole.labels, HELD_OUT, seed)
        train, test = whole.subset(kept, "train"), whole.subset(held, "test")
    kept, held = stratified_split(train.labels, HELD_OUT, seed)
    if not held or not test.images:
        raise DataError(f"{root}: too few images per class to hold out validation and test images")
    return ProbeSplits(train.subset(kept, "fit"), train.subset(held, "val"), test)


def fit_logistic(x: Tensor, y: Tensor, classes: int, l2: float, optimizer: str = "lbfgs",
                 steps: int = 300) -> tuple[Tensor, Tensor]:
    """Weights and bias minimising mean cross-entropy + l2 · ‖W‖²; deterministic start at zero."""
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    x64 = x.double()

    def objective() -> Tensor:
        return F.cross_entropy(x64 @ weight + bias, y) + l2 * weight.pow(2).sum()

    if optimizer == "lbfgs":
        solver = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, line_search_fn="strong_wolfe",
                                   tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            solver.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        solver.step(closure)
    else:
        solver = torch.optim.Adam([weight, bias], lr=1e-2)
        for _ in range(steps):
            solver.zero_grad()
            objective().backward()
            solver.step()
    return weight.detach(), bias.detach()


def accuracy_with(x: Tensor, y: Tensor, classes: int, l2: float, val_x: Tensor, val_y: Tensor, optimizer: str) -> float:
    weight, bias = fit_logistic(x, y, classes, l2, optimizer)
    return ((val_x.double() @ weight + bias).argmax(dim=1) == val_y).float().mean().item()


def choose_l2(x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor, classes: int, optimizer: str) -> tuple[float, dict]:
    scores = {l2: accuracy_with(x, y, classes, l2, val_x, val_y, optimizer) for l2 in L2_GRID}
    best = max(scores, key=lambda l2: (scores[l2], l2))  # ties go to the stronger penalty
    for l2 in (best / math.sqrt(10), best * math.sqrt(10)):
        if L2_GRID[0] <= l2 <= L2_GRID[-1]:
            scores[l2] = accuracy_with(x, y, classes, l2, val_x, val_y, optimizer)
    best = max(scores, key=lambda l2: (scores[l2], l2))
    return best, scores


def linear_probe(encoder: Encoder, splits: ProbeSplits, optimizer: str = "lbfgs") -> dict[str, float]:
    """Test-split lp_acc1 / lp_acc5 / lp_mean_per_class_recall (CLIP_benchmark's names) and the chosen l2."""
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    x = {name: encoder.images(part.images, part.load, part.key) for name, part in parts.items()}
    y = {name: torch.tensor(part.labels) for name, part in parts.items()}
    classes = len(splits.train.classes)
    best, _ = choose_l2(x["train"], y["train"], x["val"], y["val"], classes, optimizer)
    weight, bias = fit_logistic(torch.cat([x["train"], x["val"]]), torch.cat([y["train"], y["val"]]), classes, best, optimizer)
    logits = x["test"].double() @ weight + bias
    metrics = {f"lp_{name}": value for name, value in classification_metrics(logits, y["test"]).items()}
    metrics["l2"] = best
    return metrics
