"""The frozen teacher: the model as it was when the run started.

With LoRA the student itself, adapters disabled, is the teacher (no second copy in memory);
otherwise a frozen copy in eval mode. It encodes only the towers the methods read (`towers`:
DCLIP reads the starting model's text embeddings alone). When the student sees no augmentation
the teacher's outputs are computed once per image and per caption before training, in a fixed
order, so epochs cost no teacher forward passes and a resumed run sees the very same numbers.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn

from clipfit.distributed import Distributed
from clipfit.frozen.rows import ItemRows, RowStore, encode_items
from clipfit.frozen.towers import FrozenPart, LockedInputs
from clipfit.models import encode_text, evaluating

TOWERS = frozenset({"image", "text"})


class FrozenTeacher:
    def __init__(self, model: nn.Module, device: torch.device, autocast, towers: frozenset[str] = TOWERS):
        self.uses_adapters = hasattr(model, "disable_adapter")
        self.student = model
        self.copy = None if self.uses_adapters else frozen_copy(model)
        self.device, self.autocast = device, autocast
        self.towers = frozenset(towers)
        self.rows: ItemRows | None = None
        self.forward_passes = 0
        self.encoded = {"image": 0, "text": 0}  # items each tower encoded, per step or precomputed

    def model_and_context(self):
        if self.uses_adapters:
            return self.student, self.student.disable_adapter()
        return self.copy, nullcontext()

    def encode(self, images: torch.Tensor | None, texts: torch.Tensor | None):
        self.forward_passes += 1
        model, adapters_off = self.model_and_context()
        # Evaluation mode: the student's dropout (e.g. a Hugging Face text tower's) must not jitter the teacher.
        with torch.no_grad(), adapters_off, evaluating(model), self.autocast():
            image = model.encode_image(images.to(self.device), normalize=False).float() if images is not None else None
            text = encode_text(model, texts.to(self.device)).float() if texts is not None else None
        self.encoded["image"] += 0 if images is None else len(images)
        self.encoded["text"] += 0 if texts is None else len(texts)
        return image, text

    def precompute(self, dataset, batch_size: int, workers: int = 0, locked: LockedInputs | None = None,
                   shards: Distributed | None = None, store: RowStore | None = None) -> None:
        """Encode every image and every caption of the teacher's towers once, in dataset order
        (under torchrun, `shards`: each rank its share; with a `store`, kept in the feature cache
        for later runs).

        A tower whose frozen part `locked` already holds starts from those rows: only the
        teacher's copy of the trainable remainder runs on them."""
        parts = {tower: part for tower, part in (locked.parts if locked is not None else {}).items()
                 if tower in self.towers}
        encoders = {"image": lambda pixels: self.encode(pixels, None)[0], "text": lambda tokens: self.encode(None, tokens)[1]}
        encoders = {tower: None if tower in parts or tower not in self.towers else encode
                    for tower, encode in encoders.items()}
        self.rows = encode_items(dataset, encoders["image"], encoders["text"], batch_size, workers, shards, store,
                                 "teacher-rows", {"towers": [t for t, e in encoders.items() if e is not None]})
        for tower, part in parts.items():
            self.rows.put(tower, self.remainder(part, locked.rows.of(tower), batch_size))

    @torch.no_grad()
    def remainder(self, part: FrozenPart, frozen_rows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The teacher's output from a tower's frozen-part rows (they are the output when nothing remains)."""
        if part.rest is None:
            return frozen_rows
        name = next(name for name, module in self.student.named_modules() if module is part.rest)
        model, adapters_off = self.model_and_context()
        rest = model.get_submodule(name)
        with adapters_off, self.autocast(), evaluating(rest):
            return torch.cat([rest(frozen_rows[start:start + batch_size].to(self.device)).float().cpu()
                              for start in range(0, len(frozen_rows), batch_size)])

    def __call__(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(image, text) embeddings of the batch; None for a tower the teacher does not encode."""
        if self.rows is None:
            return self.encode(batch["image"] if "image" in self.towers else None,
                               batch["text"] if "text" in self.towers else None)
        image = self.rows.image_rows(batch["index"]).to(self.device) if "image" in self.towers else None
        text = self.rows.text_rows(batch["index"], batch["caption"]).to(self.device) if "text" in self.towers else None
        return image, text


def frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
