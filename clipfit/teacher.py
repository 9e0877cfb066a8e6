"""The frozen teacher: the model as it was when the run started.

With LoRA the student itself, adapters disabled, is the teacher (no second copy in memory);
otherwise a frozen copy in eval mode. When the student sees no augmentation the teacher's
outputs are computed once per image and per caption before training, in a fixed order, so
epochs cost no teacher forward passes and a resumed run sees the very same numbers.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import DataLoader


class FrozenTeacher:
    def __init__(self, model: nn.Module, device: torch.device, autocast):
        self.uses_adapters = hasattr(model, "disable_adapter")
        self.student = model
        self.copy = None if self.uses_adapters else frozen_copy(model)
        self.device, self.autocast = device, autocast
        self.images: dict[int, torch.Tensor] | None = None
        self.texts: dict[tuple[int, int], torch.Tensor] | None = None
        self.forward_passes = 0

    def model_and_context(self):
        if self.uses_adapters:
            return self.student, self.student.disable_adapter()
        return self.copy, nullcontext()

    def encode(self, images: torch.Tensor | None, texts: torch.Tensor | None):
        self.forward_passes += 1
        model, adapters_off = self.model_and_context()
        with torch.no_grad(), adapters_off, self.autocast():
            image = model.encode_image(images.to(self.device), normalize=False).float() if images is not None else None
            text = model.encode_text(texts.to(self.device), normalize=False).float() if texts is not None else None
        return image, text

    def precompute(self, dataset, batch_size: int, workers: int = 0) -> None:
        """Encode every image and every caption once, in dataset order."""
        self.images, self.texts = {}, {}
        for batch in DataLoader(range(len(dataset)), batch_size=batch_size):
            indices = batch.tolist()
            pixels = torch.stack([dataset.image(i) for i in indices])
            image, _ = self.encode(pixels, None)
            self.images.update({i: image[row].cpu() for row, i in enumerate(indices)})
        captions = [(i, c) for i, pair in enumerate(dataset.pairs) for c in range(len(pair.captions))]
        for start in range(0, len(captions), batch_size):
            keys = captions[start:start + batch_size]
            tokens = dataset.tokenizer([dataset.pairs[i].captions[c] for i, c in keys])
            _, text = self.encode(None, tokens)
            self.texts.update({key: text[row].cpu() for row, key in enumerate(keys)})

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is None:
            return self.encode(batch["image"], batch["text"])
        indices, captions = batch["index"].tolist(), batch["caption"].tolist()
        image = torch.stack([self.images[i] for i in indices]).to(self.device)
        text = torch.stack([self.texts[(i, c)] for i, c in zip(indices, captions)]).to(self.device)
        return image, text


def frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
