"""How the model runs a training step: both towers in one module, optionally compiled
(--compile) and, under torchrun (clipfit.distributed), wrapped in DistributedDataParallel.
"""

from __future__ import annotations

import torch
from torch import nn

from clipfit.distributed import Distributed
from clipfit.models import base_logit_scale, base_model, encode_text


class PairEncoder(nn.Module):
    """Image and text embeddings (projected, unnormalised) and the exponentiated logit scale
    in one forward call.

    The loop calls this instead of model.encode_image/encode_text: DistributedDataParallel only
    synchronises gradients of what runs through its wrapped module's forward, and torch.compile
    only compiles a module's forward. For a tower named in `rests` the input is a locked tower's
    precomputed output (clipfit.frozen), and only the trainable remainder runs (None: nothing).
    Token batches are trimmed to their longest real caption first (clipfit.models.encode_text).
    """

    def __init__(self, model: nn.Module, rests: dict[str, nn.Module | None] | None = None):
        super().__init__()
        self.model = model
        self.rests = dict(rests or {})  # a plain dict: these modules belong to, and are saved with, the model

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.embed("image", images, self.model.encode_image)
        text = self.embed("text", texts, self.encode_text)
        return image, text, base_logit_scale(self.model).exp()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return encode_text(self.model, tokens, normalize)  # trimmed to the batch's real length: same features

    def embed(self, tower: str, inputs: torch.Tensor, encode) -> torch.Tensor:
        if tower not in self.rests:
            return encode(inputs, normalize=False)
        rest = self.rests[tower]
        return inputs if rest is None else rest(inputs)


def tower_of(name: str, text_inside: bool) -> str:
    """Which output of a step a parameter of the open_clip model (by name) feeds: "image", "text",
    "logit_scale", or "other" (e.g. a SigLIP logit bias or a CoCa decoder: no step output)."""
    if name.startswith("visual."):
        return "image"
    if name == "logit_scale":
        return "logit_scale"
    if text_inside:  # CustomTextCLIP, CoCa: the text tower is one module
        return "text" if name.startswith("text.") else "other"
    return "other" if name.startswith("logit_") else "text"  # CLIP keeps its text modules on itself


def unused_parameters(model: nn.Module, outputs_read: frozenset[str], grad_accum: int = 1) -> list[str]:
    """Trainable parameters of `model` that a step's backward pass does not reach: those feeding an
    output ("image", "text", "logit_scale") no active loss term reads (methods.Composite.outputs_read),
    and those outside both towers. With --grad-accum the logit scale's gradient flows through the first
    micro-batch's backward only (clipfit.train.Trainer.accumulated_gradients), so the others miss it."""
    inner = base_model(model)
    text_inside = getattr(inner, "text", None) is not None
    reached = set(outputs_read) - ({"logit_scale"} if grad_accum > 1 else set())
    return [name for name, p in inner.named_parameters() if p.requires_grad and tower_of(name, text_inside) not in reached]


def build_encoder(model: nn.Module, compile: bool = False, state: Distributed = Distributed(),
                  device: torch.device | None = None, rests: dict[str, nn.Module | None] | None = None,
                  find_unused: bool = True) -> nn.Module:
    """The step's encoder. Under torchrun, `find_unused`: some trainable parameter gets no gradient
    in a step (see `unused_parameters`), which DDP must be told or its gradient reduction waits for it
    forever; telling it otherwise costs every step a walk over the autograd graph."""
    encoder: nn.Module = PairEncoder(model, rests)
    if state.active:
        ids = [state.local_rank] if device is not None and device.type == "cuda" else None
        encoder = nn.parallel.DistributedDataParallel(encoder, device_ids=ids, find_unused_parameters=find_unused)
    if compile:
        encoder = torch.compile(encoder)
    return encoder
