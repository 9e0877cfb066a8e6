"""Which evaluated candidate to keep: one rule for `refine --select-best` (a training step),
`clipfit sweep` (a run) and `clipfit interpolate` (a WiSE-FT α).

A candidate is one measurement, a flat dict as clipfit.run.measure returns it: the validation
split's yardsticks under bare names (`clip_loss`, `text_to_image_R@1`, ...) and the suite's
results as `zeroshot/SET/acc1`, `retrieval/SET/...`. Users name metrics as

    val/clip_loss  val/image_to_text_R@1  val/text_to_image_R@1  val/modality_gap
    val/acc1  val/acc5  val/mean_per_class_recall  val/ece
                                    (a folder of classes: its split measured as a classifier)
    mean-R@1                        (val/image_to_text_R@1 + val/text_to_image_R@1) / 2
    zeroshot/SET/METRIC  retrieval/SET/METRIC

The rule: a candidate is eligible when every held-out zero-shot set's top-1 is at most
`max_zeroshot_drop` points below the starting model's (any candidate, without a limit); among
eligible ones the best score wins, ties going to the earlier candidate. Pure functions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clipfit.errors import UsageError

SPLIT_METRICS = ("clip_loss", "image_to_text_R@1", "text_to_image_R@1", "modality_gap")
CLASSIFIER_METRICS = ("acc1", "acc5", "mean_per_class_recall", "ece")  # of a labelled folder's split
MEAN_R1 = "mean-R@1"
GEOMETRY_METRICS = ("modality_gap", "modality_gap_mse", "alignment", "uniformity_image", "uniformity_text")
ZEROSHOT_METRICS = ("acc1", "acc5", "mean_per_class_recall", "ece", *GEOMETRY_METRICS)
RETRIEVAL_METRICS = tuple(f"{kind}_retrieval_recall@{k}" for kind in ("image", "text") for k in (1, 5, 10)) + (
    "image_retrieval_mrr", "text_retrieval_mrr", *GEOMETRY_METRICS)
LOWER_IS_BETTER = {"clip_loss", "ece", *GEOMETRY_METRICS}  # what clipfit.report marks better when it falls
HELD_OUT = "zeroshot/"  # the sets --max-zeroshot-drop guards
GUARDED_METRIC = "acc1"


@dataclass(frozen=True)
class Rule:
    metric: str
    max_zeroshot_drop: float | None = None


@dataclass
class Choice:
    index: int | None  # of the chosen candidate; None when no candidate is eligible
    score: float | None
    scores: list[float | None]
    drops: list[float | None]  # worst held-out zero-shot top-1 drop of each candidate, in points
    eligible: list[bool]
    since_best: int  # candidates evaluated after the chosen one (what --patience counts)
    labels: list[str] = field(default_factory=list)

    def reason(self, rule: Rule) -> str:
        """One sentence: what was chosen, by which number, among how many."""
        if self.index is None:
            return (f"no candidate kept held-out zero-shot top-1 within {rule.max_zeroshot_drop:g} points of the "
                    f"starting model's (--max-zeroshot-drop); the last one is kept")
        label = self.labels[self.index] if self.labels else f"candidate {self.index}"
        word = "lowest" if lower_is_better(rule.metric) else "highest"
        excluded = self.eligible.count(False)
        guard = (f"; {excluded} of {len(self.eligible)} had held-out zero-shot top-1 more than "
                 f"{rule.max_zeroshot_drop:g} points below the start and were not eligible" if excluded else "")
        return f"{label}: {word} {rule.metric} ({self.score:.4g}) of {len(self.scores)} evaluated{guard}"


def metric_key(metric: str) -> str:
    return metric.removeprefix("val/")


def lower_is_better(metric: str) -> bool:
    """For a user's metric name or a measurement's key (`zeroshot/SET/ece`, `clip_loss`)."""
    return metric != MEAN_R1 and metric_key(metric).rpartition("/")[2] in LOWER_IS_BETTER


def metric_value(metrics: dict[str, float], metric: str) -> float | None:
    """The metric's value in one measurement; None when it was not measured or is not a number."""
    if metric == MEAN_R1:
        parts = [metrics.get(f"{d}_R@1") for d in ("image_to_text", "text_to_image")]
        value = None if None in parts else sum(parts) / 2
    else:
        value = metrics.get(metric_key(metric))
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def selectable_metrics(has_validation: bool, zeroshot_sets: list[str], retrieval_sets: list[str],
                       labelled: bool = False, classes: int | None = None) -> list[str]:
    """What a run measures: `labelled` adds the split's classifier metrics (acc5 only with more than 5
    `classes`, as clipfit.eval.zeroshot.classification_metrics; all of them while the count is unknown)."""
    names = [f"val/{m}" for m in SPLIT_METRICS] + [MEAN_R1] if has_validation else []
    if has_validation and labelled:
        names += [f"val/{m}" for m in CLASSIFIER_METRICS if m != "acc5" or classes is None or classes > 5]
    names += [f"zeroshot/{s}/{m}" for s in zeroshot_sets for m in ZEROSHOT_METRICS]
    names += [f"retrieval/{s}/{m}" for s in retrieval_sets for m in RETRIEVAL_METRICS]
    return names


def check_metric(metric: str, valid: list[str], flag: str = "--select-best") -> None:
    if metric not in valid:
        listing = ", ".join(valid) if valid else "none (add --val-split, --eval-zeroshot or --eval-retrieval)"
        raise UsageError(f"{flag} {metric!r}: not a metric this run measures; valid: {listing}")


def zeroshot_drop(start: dict[str, float], metrics: dict[str, float]) -> float | None:
    """The largest top-1 drop (points) over the held-out zero-shot sets; None without any."""
    drops = [start[k] - v for k, v in metrics.items()
             if k.startswith(HELD_OUT) and k.rpartition("/")[2] == GUARDED_METRIC and k in start]
    return max(drops) if drops else None


def is_eligible(drop: float | None, limit: float | None) -> bool:
    if limit is None:
        return True
    return drop is not None and drop <= limit + 1e-9  # tolerate float noise on an exact-limit drop


def choose(candidates: list[dict[str, float]], start: dict[str, float], rule: Rule,
           labels: list[str] | None = None) -> Choice:
    """The best eligible candidate under `rule`; `start` is the starting model's measurement."""
    scores = [metric_value(c, rule.metric) for c in candidates]
    drops = [zeroshot_drop(start, c) for c in candidates]
    eligible = [s is not None and is_eligible(d, rule.max_zeroshot_drop) for s, d in zip(scores, drops)]
    sign = -1.0 if lower_is_better(rule.metric) else 1.0
    best = None
    for i, score in enumerate(scores):
        if eligible[i] and (best is None or sign * score > sign * scores[best]):
            best = i
    since = len(candidates) - 1 - best if best is not None else len(candidates)
    return Choice(best, scores[best] if best is not None else None, scores, drops, eligible, since, list(labels or []))


def patience_exhausted(choice: Choice, patience: int | None) -> bool:
    """--patience K: K evaluations in a row without a new best."""
    return bool(patience) and choice.since_best >= patience


def record(choice: Choice, rule: Rule) -> dict:
    """run.json's / sweep.json's account of a choice: the rule, what was kept and why, every candidate."""
    return {
        "metric": rule.metric, "direction": "lower" if lower_is_better(rule.metric) else "higher",
        "max_zeroshot_drop": rule.max_zeroshot_drop,
        "chosen": choice.labels[choice.index] if choice.index is not None else None,
        "reason": choice.reason(rule),
        "candidates": [{"label": label, "score": score, "zeroshot_drop": drop, "eligible": ok}
                       for label, score, drop, ok in zip(choice.labels, choice.scores, choice.drops, choice.eligible)],
    }


def gain_points(selection: dict) -> list[tuple[str, float | None, float | None]]:
    """(label, gain over the first candidate's score, held-out drop) per candidate; gain is signed so
    that up is better. The first candidate is the starting model for steps and the reference otherwise."""
    sign = -1.0 if selection["direction"] == "lower" else 1.0
    reference = selection.get("start_score")
    return [(c["label"], None if c["score"] is None or reference is None else sign * (c["score"] - reference),
             c["zeroshot_drop"]) for c in selection["candidates"]]
