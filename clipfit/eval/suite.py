"""Before/after evaluation inside `clipfit refine`, with the same code as `clipfit eval`.

Results are flat `group/name/metric` keys in run.json's `before` and `after` (rates in
points), next to the validation yardsticks of clipfit.eval.split.evaluate_split:
  zeroshot/<set>/acc1 ...          one group per zero-shot set --eval-zeroshot names (DATASET=PATH,
                                   wds/NAME, a built-in suite or a suite file: clipfit.eval.suites)
  retrieval/<folder>/... and       one group per --eval-retrieval PAIRS, then per retrieval set of
                                   --eval-zeroshot's suites (wds/flickr30k)
  retrieval/validation/...         the run's own validation split, when --val-split > 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfit.errors import GateFailed

ZEROSHOT_METRIC = "acc1"


@dataclass
class Suite:
    zeroshot: dict[str, Any] = field(default_factory=dict)  # name → LabelledImages or WdsSet
    retrieval: dict[str, Any] = field(default_factory=dict)  # name → pairs (list[Pair]) or a retrieval WdsSet

    def __bool__(self) -> bool:
        return bool(self.zeroshot or self.retrieval)


def planned_sets(zeroshot_specs: list[str], retrieval_paths: list[str],
                 with_validation: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every set's name, known before anything is read: zero-shot sets (name → SetSpec) and
    retrieval sets (name → None for the validation split, a PAIRS path, or a SetSpec)."""
    from clipfit.eval.suites import named, parse_specs, unique_name

    specs = named(parse_specs(zeroshot_specs))
    zeroshot = {name: spec for name, spec in specs.items() if spec.task == "zeroshot"}
    retrieval: dict[str, Any] = {"validation": None} if with_validation else {}
    for path in retrieval_paths:
        retrieval[unique_name(Path(path).resolve().name, retrieval)] = path
    for name, spec in specs.items():
        if spec.task == "retrieval":
            retrieval[unique_name(name, retrieval)] = spec
    return zeroshot, retrieval


def set_names(zeroshot_specs: list[str], retrieval_paths: list[str], with_validation: bool) -> tuple[list[str], list[str]]:
    """The names load_suite gives the zero-shot sets and the retrieval sets (after the validation split)."""
    zeroshot, retrieval = planned_sets(zeroshot_specs, retrieval_paths, with_validation)
    return list(zeroshot), list(retrieval)


def load_suite(zeroshot_specs: list[str], retrieval_paths: list[str], val_pairs: list, workers: int, warn) -> Suite:
    """Read every set once (`workers` threads check a retrieval folder); before and after evaluate the same data."""
    from clipfit.eval.retrieval import load_eval_pairs
    from clipfit.eval.suites import load_set

    zeroshot, retrieval = planned_sets(zeroshot_specs, retrieval_paths, bool(val_pairs))
    suite = Suite({name: load_set(spec) for name, spec in zeroshot.items()})
    for name, source in retrieval.items():
        if source is None:
            suite.retrieval[name] = val_pairs
        else:
            suite.retrieval[name] = load_eval_pairs(source, workers, warn) if isinstance(source, str) else load_set(source)
    warn_trivial(suite, warn)
    return suite


def warn_trivial(suite: Suite, warn) -> None:
    """One warning per set whose scores cannot tell models apart (clipfit.eval.metrics.trivial_set)."""
    from clipfit.eval.metrics import trivial_set

    problems = {f"--eval-zeroshot {name}": trivial_set(data.class_count, "class") for name, data in suite.zeroshot.items()}
    problems.update({("the validation split" if name == "validation" else f"--eval-retrieval {name}"):
                     trivial_set(len(pairs), "pair") for name, pairs in suite.retrieval.items()
                     if isinstance(pairs, list)})  # a streamed set's size is known once it is read
    for where, problem in problems.items():
        if problem:
            warn(f"{where}: {problem}")


def evaluate_suite(suite: Suite, encoder, max_pixels: int | None = None) -> dict[str, float]:
    """Every set of the suite through `encoder` (clipfit.eval.encode.Encoder); pairs already
    encoded by this encoder under the same name are not encoded again."""
    from clipfit.eval.retrieval import geometry_metrics, retrieval_features, retrieval_metrics
    from clipfit.eval.zeroshot import zeroshot

    results: dict[str, float] = {}
    for name, data in suite.zeroshot.items():
        results.update({f"zeroshot/{name}/{k}": v for k, v in zeroshot(encoder, data).items()})
    for name, pairs in suite.retrieval.items():
        features = retrieval_features(encoder, pairs, f"retrieval:{name}", max_pixels)
        metrics = {**retrieval_metrics(features), **geometry_metrics(features)}
        results.update({f"retrieval/{name}/{k}": v for k, v in metrics.items()})
    return results


def gate(points: float | None, before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    """--fail-on-zeroshot-drop: every zero-shot set's top-1 may drop by at most `points`
    (a negative value demands a rise of at least −points)."""
    if points is None:
        return None
    sets = {}
    for key in after:
        group, _, metric = key.rpartition("/")
        if key.startswith("zeroshot/") and metric == ZEROSHOT_METRIC and key in deltas(before, after):
            drop = before[key] - after[key]
            sets[group.removeprefix("zeroshot/")] = {"before": before[key], "after": after[key], "drop": drop,
                                                     "passed": drop <= points}
    return {"max_drop": points, "sets": sets, "passed": all(s["passed"] for s in sets.values())}


def enforce_gate(info: dict[str, Any]) -> None:
    """Raise GateFailed (exit 6) when the run's recorded gate failed; call after saving everything."""
    result = info.get("gate")
    if not result or result["passed"]:
        return
    failed = [f"{name} top-1 {s['before']:.2f} -> {s['after']:.2f} (drop {s['drop']:+.2f} points)"
              for name, s in result["sets"].items() if not s["passed"]]
    limit = result["max_drop"]
    rule = f"at most {limit:g} points" if limit >= 0 else f"a rise of at least {-limit:g} points"
    raise GateFailed(f"--fail-on-zeroshot-drop {limit:g}: {'; '.join(failed)}; allowed {rule} "
                     f"(run saved in {info['run_dir']})")


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after − before for every metric with a value on both sides (see clipfit.eval.metrics.undefined)."""
    from clipfit.eval.metrics import is_number

    return {k: after[k] - before[k] for k in after if is_number(after[k]) and is_number(before.get(k))}
