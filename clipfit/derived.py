"""Runs made from finished runs' weights without training: WiSE-FT (`clipfit interpolate`) and
model soups (`clipfit soup`).

Both measure new weights the way the run they come from was measured (`Bench`: its pairs with
the validation split rebuilt, its --eval-* sets plus any the command adds, through
clipfit.run.measure_model) and write a normal run folder: claimed through clipfit.rundir,
run.json written by rundir.write_run_json, report by clipfit.report. The new folder's config is
the source run's, so its starting model is the source run's too (`clipfit interpolate` of a soup
interpolates towards the same start).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from clipfit.errors import UsageError

# settings that decide what a measurement measures: two runs that agree on them (and on the pairs)
# are measured on the same pairs and sets, so their recorded numbers compare directly
SPLIT_BY = ("val_split", "seed", "layout")  # with the pairs, what decides a run's validation split
MEASURED_WITH = (*SPLIT_BY, "csv_img_key", "csv_caption_key", "image_column", "caption_column",
                 "max_image_pixels", "precision", "eval_zeroshot", "eval_retrieval")
COPIED = ("pairs", "config", "resolved", "model", "start", "data_hash", "skipped", "environment", "steps", "eval_split")


def finished_run(run_dir: Path) -> dict[str, Any]:
    """run.json of a finished run; UsageError naming the folder otherwise."""
    from clipfit.eval.compare import read_run

    saved = read_run(run_dir)
    if not saved.get("after") or not isinstance(saved.get("config"), dict):
        raise UsageError(f"{run_dir}: the run has not finished (no after measurement); finish it with --resume first")
    return saved


def saved_config(saved: dict[str, Any], zeroshot: list[str] = (), retrieval: list[str] = ()):
    """The run's settings, with the command's own --eval-zeroshot / --eval-retrieval sets added."""
    from clipfit.config import RefineConfig

    known = {f.name for f in fields(RefineConfig)}
    config = RefineConfig(**{k: v for k, v in saved["config"].items() if k in known})
    return replace(config, eval_zeroshot=[*config.eval_zeroshot, *zeroshot],
                   eval_retrieval=[*config.eval_retrieval, *retrieval])


@dataclass(frozen=True)
class Measured:
    """What a bench will measure, known from run.json before anything is loaded."""

    has_validation: bool
    zeroshot: list[str]  # set names as run.json keys them
    retrieval: list[str]
    classes: int | None = None  # a folder of classes: how many (its split is also measured as a classifier)

    @classmethod
    def of(cls, config, saved: dict[str, Any]) -> "Measured":
        from clipfit.eval.suite import set_names

        has_validation = config.val_split > 0 and config.layout != "webdataset"
        classes = (saved.get("resolved") or {}).get("classes")
        return cls(has_validation, *set_names(config.eval_zeroshot, config.eval_retrieval, has_validation),
                   len(classes["names"]) if classes else None)

    def default_metric(self) -> str | None:
        from clipfit.selection import default_metric

        return default_metric(self.has_validation, self.zeroshot, self.retrieval, labelled=self.classes is not None)

    def check(self, metric: str) -> None:
        from clipfit.selection import check_metric, selectable_metrics

        check_metric(metric, selectable_metrics(self.has_validation, self.zeroshot, self.retrieval,
                                                labelled=self.classes is not None, classes=self.classes))


def same_settings(a: dict[str, Any], b: dict[str, Any], names: tuple[str, ...]) -> bool:
    """Whether two runs' run.json name the same pairs and data and agree on the settings `names`."""
    return (a.get("pairs") == b.get("pairs") and a.get("data_hash") == b.get("data_hash")
            and all(a["config"].get(k) == b["config"].get(k) for k in names))


def same_measurement(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs were measured on the same pairs and sets (MEASURED_WITH)."""
    return same_settings(a, b, MEASURED_WITH)


def same_split(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs held out the same validation pairs (SPLIT_BY)."""
    return same_settings(a, b, SPLIT_BY)


def load_start(config):
    """The run's starting model, seeded as refine seeds it (random-init tests depend on it)."""
    from clipfit import models
    from clipfit.run import seed_everything

    seed_everything(config.seed)
    return models.load_model(config.model, config.pretrained)


def floating_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@dataclass
class Bench:
    """Measures weights as the finished run `run_dir` was measured, in a model of its architecture."""

    run_dir: Path
    saved: dict
    config: Any  # RefineConfig: the run's, with the command's extra sets
    data: Any  # clipfit.data.training.RunData
    suite: Any  # clipfit.eval.suite.Suite
    device: torch.device
    loaded: Any  # clipfit.models.LoadedModel of the run folder: saves the new weights like it
    model: nn.Module
    added_sets: bool  # the command measures sets the run's own before lacks
    progress: Any
    frozen: Any = None  # clipfit.frozen.measure.FrozenRows: what every measurement on the bench shares
    _start: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, run_dir: Path, saved: dict, config, out_dir: Path, device_name: str | None, progress) -> "Bench":
        from clipfit import models
        from clipfit.data.training import load_data, same_data
        from clipfit.eval.suite import load_suite

        data = load_data(saved["pairs"], config, out_dir, progress)
        if not same_data(saved.get("data_hash"), data):
            raise UsageError(f"{saved['pairs']}: the pairs changed since {run_dir} was trained; its validation split "
                             "cannot be rebuilt")
        suite = load_suite(config.eval_zeroshot, config.eval_retrieval, data.val, config.workers, progress.warn)
        device = models.resolve_device(device_name or config.device)
        loaded = models.load_model(str(run_dir))
        added = (len(config.eval_zeroshot), len(config.eval_retrieval)) != (
            len(saved["config"].get("eval_zeroshot") or []), len(saved["config"].get("eval_retrieval") or []))
        return cls(run_dir, saved, config, data, suite, device, loaded, loaded.model.to(device), added, progress)

    def state(self) -> dict[str, torch.Tensor]:
        """The architecture's own tensors (names, shapes, dtypes), as a template."""
        return self.model.state_dict()

    def weights_of(self, run_dir: Path, file_name: str = "model.safetensors") -> dict[str, torch.Tensor]:
        """A run folder's weights file, checked against this architecture's tensors."""
        from clipfit import models

        state = models.read_state_dict(run_dir / file_name)
        expected = self.state()
        if state.keys() != expected.keys() or any(state[k].shape != expected[k].shape for k in expected):
            raise UsageError(f"{run_dir}: its {file_name} does not fit the architecture of {self.run_dir}")
        return state

    def start(self) -> dict[str, torch.Tensor]:
        """The starting model's weights (loaded once)."""
        if self._start is None:
            self._start = floating_copy(load_start(self.config).model.state_dict())
        return self._start

    def reuse_unchanged(self, *states: dict[str, torch.Tensor]) -> None:
        """Every weights the bench will measure are made from the start and `states`: what none of
        them changed is frozen, and its outputs are encoded once for every measurement (and read
        from the feature cache when the run's own measurements put them there)."""
        from clipfit.frozen.measure import freeze_unchanged
        from clipfit.run import measurement_rows

        freeze_unchanged(self.model, self.start(), *states)
        self.frozen = measurement_rows(self.model, self.loaded, self.config, self.device, self.progress)

    def measure(self, state: dict[str, torch.Tensor], label: str) -> dict[str, float]:
        from clipfit.run import measure_model

        self.model.load_state_dict(state)
        self.progress.info(f"measuring {label}")
        return measure_model(self.model, self.loaded, self.data, self.config, self.device, self.suite, label,
                             frozen=self.frozen)

    def before(self) -> dict[str, float]:
        """The starting model's numbers: the run's own, or measured again when the command added sets."""
        if not self.added_sets:
            return self.saved["before"]
        return self.measure(self.start(), f"the starting model of {self.run_dir}")

    def class_facts(self) -> dict[str, Any]:
        """A folder of classes: the confusion matrices of the start (the run's own) and of the weights
        in the bench's model now (clipfit.eval.split.class_facts); nothing otherwise."""
        from clipfit.eval.split import class_facts, split_classes
        from clipfit.run import run_encoder

        labelled = split_classes(self.data, self.config.max_image_pixels)
        if labelled is None:
            return {}
        encoder = run_encoder(self.model, self.loaded, self.config, self.device, f"the weights written from {self.run_dir}",
                              frozen=self.frozen)
        return {"classes_before": self.saved.get("classes_before"), "classes_after": class_facts(encoder, labelled)}

    def after_of(self, run_dir: Path, saved: dict) -> dict[str, float]:
        """A finished run's numbers on this bench: its own when it was measured the same way, else measured."""
        if not self.added_sets and same_measurement(saved, self.saved):
            return saved["after"]
        return self.measure(self.weights_of(run_dir), f"{run_dir} (measured as {self.run_dir} was)")


def write_derived(out_dir: Path, bench: Bench, state: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    """model.safetensors (and the files a loader reads) from `state`, run.json and the report."""
    from clipfit import models
    from clipfit.report import write_report
    from clipfit.rundir import write_run_json

    bench.model.load_state_dict(state)
    models.save_model(bench.loaded, bench.model, out_dir)
    record = {**{k: bench.saved[k] for k in COPIED if k in bench.saved}, "run_dir": str(out_dir),
              "train_seconds": 0.0, "methods": {}, **bench.class_facts(), **info}
    write_report(out_dir, record)
    write_run_json(out_dir, record)  # last: a folder with run.json's `after` counts as finished
    return record


def into_new_folder(out: Path, sources: dict[str, Path], saved: dict[str, Any], overwrite: bool, progress,
                    make: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Claim `out` as a run folder (never one of the `sources`, named by what they are, nor what
    the first source's refine protected: its PAIRS, cache folder and --model folder), fill it with
    `make`, and put a replaced run back if `make` fails before run.json is written."""
    from clipfit.rundir import RUN_JSON, claim_run_dir
    from clipfit.run import protected_paths

    pairs = saved.get("pairs")
    protected = {**(protected_paths(saved_config(saved), pairs) if pairs else {}), **sources}
    folder = claim_run_dir(out, False, overwrite, protected, progress.warn)
    try:
        info = make(out)
    except BaseException:
        if not (out / RUN_JSON).is_file():
            folder.abandon()
        raise
    folder.commit()
    folder.release()
    return info
