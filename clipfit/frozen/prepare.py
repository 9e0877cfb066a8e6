"""Frozen work before training, in its one order, and what the loop gets from it.

A run has up to three kinds of frozen work: the locked towers' frozen parts (--lock-image,
--lock-text, or a tower LoRA leaves without adapters; clipfit.frozen.towers), the starting model
as a teacher for the methods that read it (clipfit.frozen.teacher), and the decoded pixels
(--cache-images). `prepare_frozen` does it in the only order that works:

1. the locked towers' outputs, once per training item, where their input is the same every epoch;
2. the pixel policy: the loop reads no pixels where the image tower's rows stand in for them;
   otherwise --cache-images decodes every image once, now;
3. the teacher's outputs, once per item, when every tower it encodes has a fixed input: it starts
   from step 1's rows and reads step 2's pixels.

It returns one `FrozenInputs`, all the loop (clipfit.train.Trainer) needs of frozen work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from clipfit.distributed import Distributed
from clipfit.frozen.rows import RowStore
from clipfit.frozen.teacher import FrozenTeacher
from clipfit.frozen.towers import FrozenPart, LockedInputs, frozen_parts, precompute_locked
from clipfit.precision import autocast_for


@dataclass(frozen=True)
class FrozenPlan:
    """What frozen work a run asks for. Which towers are locked is the model's to say (what
    requires no gradient): `prepare_frozen` reads it there once."""

    teacher_towers: frozenset[str]  # the teacher's towers the methods read; empty: no teacher
    # Towers whose input is the same every epoch (captions always, images unless augmented), whose
    # frozen outputs may be computed once; empty with --no-precompute or a stream (no stable item index).
    cacheable: frozenset[str]
    preload_images: bool  # --cache-images: decode every image the loop reads once, up front
    batch_size: int
    workers: int
    device: torch.device
    precision: str


@dataclass
class FrozenInputs:
    """What the training loop gets from frozen work."""

    parts: dict[str, FrozenPart]  # every tower's frozen part, cached or not: kept in eval mode
    dataset: Any  # the training dataset as the loop reads it (without pixels it does not need)
    locked: LockedInputs | None = None  # precomputed outputs of the cached frozen parts
    teacher: FrozenTeacher | None = None

    @property
    def rests(self) -> dict[str, nn.Module | None]:
        """Per cached tower, the trainable remainder the step runs on its rows (None: nothing)."""
        return {tower: part.rest for tower, part in self.locked.parts.items()} if self.locked else {}

    @property
    def eval_modules(self) -> list[nn.Module]:
        return [module for part in self.parts.values() for module in part.modules]

    def step_inputs(self, batch: dict, device: torch.device) -> dict[str, Tensor]:
        """The cached towers' rows for this batch, which replace its pixels or tokens."""
        return self.locked.step_inputs(batch, device) if self.locked else {}

    def teacher_features(self, batch: dict) -> tuple[Tensor | None, Tensor | None]:
        if self.teacher is None:
            raise RuntimeError("a loss term read step.teacher() but no method declares teacher_towers")
        return self.teacher(batch)

    def facts(self) -> dict[str, Any]:
        """For run.json."""
        teacher = self.teacher
        return {"teacher_forward_passes": teacher.forward_passes if teacher else 0,
                "teacher": {"towers": sorted(teacher.towers), "precomputed": teacher.rows is not None,
                            "items_encoded_by_rank_0": dict(teacher.encoded)} if teacher else None,
                "locked_towers": self.locked.facts if self.locked else None}


def prepare_frozen(model: nn.Module, dataset, plan: FrozenPlan, store: RowStore | None, dist: Distributed,
                   log: Callable[[str], None]) -> FrozenInputs:
    """The frozen work `plan` asks for, in order (see the module's docstring); under torchrun every
    rank encodes its share of the items, and with a `store` rows are kept in the feature cache."""
    autocast = autocast_for(plan.device, plan.precision)
    parts = frozen_parts(model)
    cached = {tower: part for tower, part in parts.items() if tower in plan.cacheable}
    locked = None
    if cached:
        locked = precompute_locked(model, dataset, cached, plan.batch_size, plan.workers, plan.device, autocast,
                                   dist, store)
        log(f"locked {' and '.join(locked.parts)} tower: frozen outputs of every training item ready "
            f"({locked.seconds:.1f} s, {locked.facts['mib']:.1f} MiB)")
    dataset = loop_dataset(dataset, "image" in cached, plan.preload_images, plan.workers, log)
    teacher = None
    if plan.teacher_towers:
        teacher = FrozenTeacher(model, plan.device, autocast, plan.teacher_towers)
        if plan.teacher_towers <= plan.cacheable:
            log("encoding the training pairs once with the frozen teacher")
            teacher.precompute(dataset, plan.batch_size, plan.workers, locked, dist, store)
    return FrozenInputs(parts, dataset, locked, teacher)


def loop_dataset(dataset, without_pixels: bool, preload: bool, workers: int, log: Callable[[str], None]):
    """The pixel policy: a view of `dataset` that carries no pixels when the image tower's rows
    replace them; else, with `preload`, every image decoded once into memory."""
    if without_pixels:
        view = copy.copy(dataset)  # the same pairs, tokenizer and seed; the run's dataset keeps its pixels
        view.with_images = False
        return view
    if preload:
        dataset.preload(threads=max(1, workers))
        log(f"cached {len(dataset)} images in memory ({dataset.pixels.nbytes / 2**20:.0f} MiB)")
    return dataset
