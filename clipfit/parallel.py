"""How the model runs a training step: both towers in one module, optionally compiled
(--compile) and, under torchrun, wrapped in DistributedDataParallel."""

from __future__ import annotations

import torch
from torch import nn


class PairEncoder(nn.Module):
    """Image and text embeddings (projected, unnormalised) in one forward call.

    The loop calls this instead of model.encode_image/encode_text: DistributedDataParallel only
    synchronises gradients of what runs through its wrapped module's forward, and torch.compile
    only compiles a module's forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(images, normalize=False), self.model.encode_text(texts, normalize=False)


def build_encoder(model: nn.Module, compile: bool = False) -> nn.Module:
    encoder: nn.Module = PairEncoder(model)
    if compile:
        encoder = torch.compile(encoder)
    return encoder
