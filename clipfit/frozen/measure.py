"""The frozen parts' outputs for measurements: computed once, reused by every measurement.

A model measured several times changes only in its trainable part between measurements: before
training, at every --eval-every (and so for --select-best), after training, for the report's
gallery, and for each `clipfit interpolate` α. The frozen part of a tower (clipfit.frozen.towers:
a locked tower, a timm trunk or Hugging Face transformer under a trainable projection, a tower
LoRA put no adapter in) gives the same output for an evaluation item every time, so
`FrozenRows` computes it once per item and every measurement runs only the trainable rest on it
(nothing, when the whole tower is frozen). Full fine-tuning has no frozen part: every
measurement runs the whole model, as before.

With a `RowStore` the rows are entries of the feature cache, keyed by the starting model, the
frozen part, the items' content and the settings that change the numbers: a later run on the
same evaluation sets (a sweep's next run, `clipfit interpolate` of the run) reads them back
instead of encoding again. The evaluation encoder (clipfit.eval.encode.Encoder) is the one user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from clipfit.frozen.rows import RowStore
from clipfit.frozen.towers import FrozenPart, frozen_parts

EVAL_ROWS_FORMAT = 1


@dataclass
class FrozenRows:
    parts: dict[str, FrozenPart]  # the measured model's frozen part per tower
    store: RowStore | None = None  # where rows outlive this process; None: in memory only
    rows: dict[str, Tensor] = field(default_factory=dict)  # key → the frozen part's outputs, in the encoder's order
    encoded: dict[str, int] = field(default_factory=lambda: {"image": 0, "text": 0})  # items run through a frozen part here

    @classmethod
    def of(cls, model: nn.Module, store: RowStore | None = None) -> FrozenRows:
        """The frozen parts of `model` as it is now (what requires no gradient; see frozen_parts)."""
        return cls(frozen_parts(model), store)

    def part(self, tower: str) -> FrozenPart | None:
        return self.parts.get(tower)

    def of_items(self, tower: str, items: dict, count: int, compute: Callable[[], Tensor]) -> Tensor:
        """The frozen part's output for the `count` items `items` names (their content, in order):
        `compute()` once, then from memory (or from the feature cache, in a later process)."""
        what = {"tower": tower, "part": self.parts[tower].name, "count": count, **items}
        key = json.dumps(what, sort_keys=True, default=str)
        if key not in self.rows:
            self.rows[key] = self.build(tower, what, count, compute)
        return self.rows[key]

    def build(self, tower: str, what: dict, count: int, compute: Callable[[], Tensor]) -> Tensor:
        def counted() -> dict[str, Tensor]:
            rows = compute()
            self.encoded[tower] += len(rows)
            return {"rows": rows}

        if self.store is None:
            return counted()["rows"]
        key = self.store.key_for("eval-rows", {"eval_rows_format": EVAL_ROWS_FORMAT, **what})
        # an entry of another length is rebuilt (clipfit.cache), never indexed past its end
        return self.store.cache.get_or_build(key, counted, float_dtype=torch.float32, rows={"rows": count})["rows"]

    def facts(self) -> dict:
        """For run.json: which frozen parts measurements reused, and the items this process encoded."""
        return {"parts": {tower: part.name for tower, part in self.parts.items()},
                "items_encoded": {tower: self.encoded[tower] for tower in self.parts}}


def freeze_unchanged(model: nn.Module, start: dict[str, Tensor], *ends: dict[str, Tensor]) -> None:
    """Mark as frozen every weight of `model` that is the same in the state dict `start` and in every
    one of `ends` (a locked tower's, or one LoRA left alone), so that `FrozenRows.of` finds the frozen
    parts of any model built from them (clipfit interpolate: lerp of equal tensors is that tensor,
    exactly; clipfit soup: so is their mean). A module whose buffers differ (BatchNorm statistics)
    counts as changed, weights and all."""
    def moved(name: str) -> bool:
        return any(not torch.equal(start[name], end[name]) for end in ends)

    changed_buffers = [name for name, _ in model.named_buffers() if name in start and moved(name)]  # persistent ones
    for name, param in model.named_parameters():
        param.requires_grad_(moved(name) or any(name.startswith(b.rpartition(".")[0] + ".") for b in changed_buffers))
