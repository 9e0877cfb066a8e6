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

Where nothing else is said, the metric is the target's: the validation split's mean-R@1, else the
first retrieval set's text→image R@1, else the first zero-shot set's top-1; and for `sweep`,
`soup` and `interpolate` the limit is DEFAULT_MAX_DROP points when held-out zero-shot sets are
measured. A candidate's place on the trade-off plane is its target gain over the start (signed so
that up is better) against its held-out change (minus the worst top-1 drop, so right is better);
`pareto_front` marks the candidates no other beats on both.
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
START = "start"  # the starting model's label on the trade-off plane
DEFAULT_MAX_DROP = 1.0  # points: sweep, soup and interpolate keep held-out top-1 this close to the start


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

    def reason(self, rule: Rule, fallback: str = "the last one is kept") -> str:
        """One sentence: what was chosen, by which number, among how many; `fallback` says what is
        kept when no candidate is eligible."""
        if self.index is None:
            return (f"no candidate kept held-out zero-shot top-1 within {points_text(rule.max_zeroshot_drop)} of the "
                    f"starting model's (--max-zeroshot-drop); {fallback}")
        label = self.labels[self.index] if self.labels else f"candidate {self.index}"
        word = "lowest" if lower_is_better(rule.metric) else "highest"
        excluded = self.eligible.count(False)
        guard = (f"; {excluded} of {len(self.eligible)} had held-out zero-shot top-1 more than "
                 f"{points_text(rule.max_zeroshot_drop)} below the start and were not eligible" if excluded else "")
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


def points_text(value: float) -> str:
    """'1 point', '2.5 points'."""
    return f"{value:g} point" + ("" if value == 1 else "s")


def default_metric(has_validation: bool, zeroshot_sets: list[str], retrieval_sets: list[str],
                   labelled: bool = False) -> str | None:
    """The target metric when none is named: on the validation split, a labelled folder's top-1
    (val/acc1) or mean-R@1; else the first retrieval set's text→image R@1, else the first zero-shot
    set's top-1; None when nothing is measured."""
    if has_validation:
        return "val/acc1" if labelled else MEAN_R1
    if retrieval_sets:
        return f"retrieval/{retrieval_sets[0]}/image_retrieval_recall@1"
    return f"zeroshot/{zeroshot_sets[0]}/{GUARDED_METRIC}" if zeroshot_sets else None


def retention_limit(given: float | None, zeroshot_sets: list[str], flag: str = "--max-zeroshot-drop") -> float | None:
    """The held-out guard of sweep, soup and interpolate: the limit given, else DEFAULT_MAX_DROP
    points when zero-shot sets are measured, else none."""
    if given is not None and not math.isfinite(given):
        raise UsageError(f"{flag} {given}: expected a finite number of points")
    if given is not None and not zeroshot_sets:
        raise UsageError(f"{flag} {given:g} guards held-out zero-shot top-1, but no zero-shot set is measured "
                         "(add --eval-zeroshot DATASET=PATH)")
    if given is not None:
        return given
    return DEFAULT_MAX_DROP if zeroshot_sets else None


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


def record(choice: Choice, rule: Rule, fallback: str = "the last one is kept") -> dict:
    """run.json's / sweep.json's account of a choice: the rule, what was kept and why, every candidate."""
    return {
        "metric": rule.metric, "direction": "lower" if lower_is_better(rule.metric) else "higher",
        "max_zeroshot_drop": rule.max_zeroshot_drop,
        "chosen": choice.labels[choice.index] if choice.index is not None else None,
        "reason": choice.reason(rule, fallback),
        "candidates": [{"label": label, "score": score, "zeroshot_drop": drop, "eligible": ok}
                       for label, score, drop, ok in zip(choice.labels, choice.scores, choice.drops, choice.eligible)],
    }


@dataclass(frozen=True)
class TradeoffPoint:
    """One model on the trade-off plane: target gain over the start (up is better) and held-out
    change, minus the worst zero-shot top-1 drop in points (right is better); None where unmeasured."""

    label: str
    gain: float | None
    change: float | None
    kind: str = "candidate"  # how the plot draws it: start, candidate, run, soup, wise

    @property
    def placed(self) -> bool:
        return self.gain is not None and self.change is not None


def gain(score: float | None, start_score: float | None, direction: str) -> float | None:
    if score is None or start_score is None:
        return None
    return (start_score - score) if direction == "lower" else (score - start_score)


def tradeoff_points(selection: dict, kind: str = "candidate") -> list[TradeoffPoint]:
    """Each candidate of a selection record (`record`, with its `start_score`) on the plane."""
    return [TradeoffPoint(c["label"], gain(c["score"], selection.get("start_score"), selection["direction"]),
                          None if c["zeroshot_drop"] is None else -c["zeroshot_drop"], kind)
            for c in selection["candidates"]]


def pareto_front(points: list[TradeoffPoint]) -> list[int]:
    """Indices of the placed points that no other placed point matches or beats on both gain and
    held-out change while beating it on one (duplicates are all on the front), in input order."""
    placed = [(i, p) for i, p in enumerate(points) if p.placed]

    def dominated(p: TradeoffPoint) -> bool:
        return any(q.gain >= p.gain and q.change >= p.change and (q.gain > p.gain or q.change > p.change)
                   for _, q in placed)

    return [i for i, p in placed if not dominated(p)]


def place(label: str, metrics: dict[str, float], start: dict[str, float], metric: str, kind: str) -> TradeoffPoint:
    """One measurement on the trade-off plane, against the starting model's."""
    direction = "lower" if lower_is_better(metric) else "higher"
    drop = zeroshot_drop(start, metrics)
    return TradeoffPoint(label, gain(metric_value(metrics, metric), metric_value(start, metric), direction),
                         None if drop is None else -drop, kind)


def alpha_points(interpolation: dict, start: dict[str, float], metric: str | None = None, prefix: str = "",
                 kind: str = "candidate") -> list[TradeoffPoint]:
    """The start, then each α of an interpolation record (run.json's) in order of α and the tuned
    model (α = 1) as its run recorded it, by `metric` (default: the record's); labels get `prefix`."""
    metric, measured = metric or interpolation["metric"], dict(interpolation["measured"])
    alphas = list(interpolation["alphas"])
    if interpolation.get("tuned_measured") and 1.0 not in alphas:
        measured["α=1 (tuned)"], alphas = interpolation["tuned_measured"], alphas + [1.0]
    order = sorted(zip(alphas, measured), key=lambda pair: pair[0])
    return [place(START, start, start, metric, "start")] + [
        place(prefix + label, measured[label], start, metric, kind) for _, label in order]
