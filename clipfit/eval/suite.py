"""Before/after evaluation inside `clipfit refine`, with the same code as `clipfit eval`.

Results are flat `group/name/metric` keys in run.json's `before` and `after` (rates in
points), next to the validation yardsticks of clipfit.eval.split.evaluate_split:
  zeroshot/<dataset>/acc1 ...      one group per --eval-zeroshot DATASET=PATH
  retrieval/<folder>/... and       one group per --eval-retrieval PAIRS
  retrieval/validation/...         the run's own validation split, when --val-split > 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfit.errors import GateFailed, UsageError

ZEROSHOT_METRIC = "acc1"


@dataclass
class Suite:
    zeroshot: dict[str, Any] = field(default_factory=dict)  # name → LabelledImages
    retrieval: dict[str, list] = field(default_factory=dict)  # name → pairs

    def __bool__(self) -> bool:
        return bool(self.zeroshot or self.retrieval)


def parse_zeroshot_spec(spec: str) -> tuple[str, str]:
    from clipfit.eval.datasets import DATASETS

    dataset, sep, path = spec.partition("=")
    if not sep or dataset not in DATASETS or not path:
        raise UsageError(f"--eval-zeroshot {spec!r}: expected DATASET=PATH with DATASET one of {', '.join(DATASETS)}")
    return dataset, path


def unique_name(name: str, taken: dict) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def set_names(zeroshot_specs: list[str], retrieval_paths: list[str], with_validation: bool) -> tuple[list[str], list[str]]:
    """The names load_suite gives the zero-shot sets (--eval-zeroshot DATASET=PATH) and the retrieval
    sets (--eval-retrieval PAIRS, after the validation split), known before anything is read."""
    zeroshot: dict[str, None] = {}
    for spec in zeroshot_specs:
        dataset, path = parse_zeroshot_spec(spec)
        zeroshot[unique_name(dataset if dataset != "folder" else Path(path).resolve().name, zeroshot)] = None
    retrieval: dict[str, None] = {"validation": None} if with_validation else {}
    for path in retrieval_paths:
        retrieval[unique_name(Path(path).resolve().name, retrieval)] = None
    return list(zeroshot), list(retrieval)


def load_suite(zeroshot_specs: list[str], retrieval_paths: list[str], val_pairs: list, workers: int, warn) -> Suite:
    """Read every set once (`workers` threads check a retrieval folder); before and after evaluate the same data."""
    from clipfit.eval.datasets import load_labelled
    from clipfit.eval.retrieval import load_eval_pairs

    zeroshot_names, retrieval_names = set_names(zeroshot_specs, retrieval_paths, bool(val_pairs))
    suite = Suite()
    for name, spec in zip(zeroshot_names, zeroshot_specs):
        dataset, path = parse_zeroshot_spec(spec)
        suite.zeroshot[name] = load_labelled(dataset, path)
    if val_pairs:
        suite.retrieval["validation"] = val_pairs
    for name, path in zip(retrieval_names[bool(val_pairs):], retrieval_paths):
        suite.retrieval[name] = load_eval_pairs(path, workers, warn)
    warn_trivial(suite, warn)
    return suite


def warn_trivial(suite: Suite, warn) -> None:
    """One warning per set whose scores cannot tell models apart (clipfit.eval.metrics.trivial_set)."""
    from clipfit.eval.metrics import trivial_set

    problems = {f"--eval-zeroshot {name}": trivial_set(len(data.classes), "class") for name, data in suite.zeroshot.items()}
    problems.update({("the validation split" if name == "validation" else f"--eval-retrieval {name}"):
                     trivial_set(len(pairs), "pair") for name, pairs in suite.retrieval.items()})
    for where, problem in problems.items():
        if problem:
            warn(f"{where}: {problem}")


def evaluate_suite(suite: Suite, encoder, max_pixels: int | None = None) -> dict[str, float]:
    """Every set of the suite through `encoder` (clipfit.eval.encode.Encoder); pairs already
    encoded by this encoder under the same name are not encoded again."""
    from clipfit.eval.retrieval import encode_pairs_all_captions, geometry_metrics, retrieval_metrics
    from clipfit.eval.zeroshot import zeroshot

    results: dict[str, float] = {}
    for name, data in suite.zeroshot.items():
        results.update({f"zeroshot/{name}/{k}": v for k, v in zeroshot(encoder, data).items()})
    for name, pairs in suite.retrieval.items():
        features = encode_pairs_all_captions(encoder, pairs, f"retrieval:{name}", max_pixels)
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
