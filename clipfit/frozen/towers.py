"""Locked towers: which part of each tower is frozen, and its outputs computed once.

`--lock-image` / `--lock-text` freeze a tower's trunk through open_clip (`lock_image_tower`,
`lock_text_tower`). What stays trainable depends on the tower: nothing for CLIP's own ViT and
text transformer, the projection head for a timm image tower (`TimmModel.head`) or a Hugging
Face text tower (`HFTextEncoder.proj`). With --lora, a tower without adapter targets is frozen
whole the same way. The frozen part is a fixed feature extractor, so it runs in evaluation mode
(no dropout, BatchNorm statistics fixed), cached or not; and when its input is the same every
epoch (captions always; images without --augment) its output per item is computed once before
training and each step only runs the trainable remainder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from clipfit.distributed import Distributed
from clipfit.frozen.rows import ItemRows, RowStore, encode_items
from clipfit.models import base_model, encode_text, evaluating


@dataclass
class FrozenPart:
    tower: str  # "image" or "text"
    name: str  # what is frozen, for logs and run.json
    modules: list[nn.Module]  # kept in eval mode during training
    rest: nn.Module | None  # the trainable remainder, fed the frozen part's output; None: whole tower frozen


def all_frozen(modules: list[nn.Module]) -> bool:
    params = [p for module in modules for p in module.parameters()]
    return bool(params) and not any(p.requires_grad for p in params)


def image_part(inner: nn.Module) -> FrozenPart | None:
    visual = inner.visual
    if all_frozen([visual]):
        return FrozenPart("image", "image tower", [visual], None)
    if type(visual).__name__ == "TimmModel" and all_frozen([visual.trunk]):
        return FrozenPart("image", "image trunk (timm)", [visual.trunk], visual.head)
    return None


def text_part(inner: nn.Module) -> FrozenPart | None:
    text = getattr(inner, "text", None)
    if text is None:  # CLIP keeps its text modules on the model itself
        modules = [module for name, module in inner.named_children() if name != "visual"]
        own = [p for name, p in inner.named_parameters(recurse=False) if not name.startswith("logit_")]
        frozen = all_frozen(modules) and not any(p.requires_grad for p in own)
        return FrozenPart("text", "text tower", modules, None) if frozen else None
    if all_frozen([text]):
        return FrozenPart("text", "text tower", [text], None)
    if type(text).__name__ == "HFTextEncoder" and all_frozen([text.transformer]) \
            and not any(p.requires_grad for p in text.pooler.parameters()):
        return FrozenPart("text", "text transformer (Hugging Face)", [text.transformer, text.pooler], text.proj)
    return None


def frozen_parts(model: nn.Module) -> dict[str, FrozenPart]:
    """The frozen part of each tower that has one (LoRA adapters in a tower make it trainable)."""
    inner = base_model(model)
    found = {"image": image_part(inner), "text": text_part(inner)}
    return {tower: part for tower, part in found.items() if part is not None}


def frozen_output(model: nn.Module, part: FrozenPart, inputs: Tensor) -> Tensor:
    """What the frozen part hands to the trainable remainder (the embedding, if none)."""
    encode = model.encode_image if part.tower == "image" else partial(encode_text, model)
    if part.rest is None:
        return encode(inputs, normalize=False)
    captured: list[Tensor] = []
    handle = part.rest.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        encode(inputs, normalize=False)
    finally:
        handle.remove()
    return captured[-1]


@dataclass
class LockedInputs:
    """Precomputed frozen-part outputs, and how a step turns them into embeddings."""

    parts: dict[str, FrozenPart]  # the towers whose frozen part is cached
    rows: ItemRows
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)

    def step_inputs(self, batch: dict, device: torch.device) -> dict[str, Tensor]:
        """{"image": rows, "text": rows} for the towers that are cached."""
        found = {}
        if "image" in self.parts:
            found["image"] = self.rows.image_rows(batch["index"]).to(device, non_blocking=True)
        if "text" in self.parts:
            found["text"] = self.rows.text_rows(batch["index"], batch["caption"]).to(device, non_blocking=True)
        return found


def precompute_locked(model: nn.Module, dataset, parts: dict[str, FrozenPart], batch_size: int, workers: int,
                      device: torch.device, autocast, shards: Distributed | None = None,
                      store: RowStore | None = None) -> LockedInputs:
    """Outputs of the frozen `parts` for every training item (under torchrun, `shards`: each rank
    encodes its share; with a `store`, kept in the feature cache for later runs)."""

    def encoder(tower: str):
        if tower not in parts:
            return None

        def encode(inputs: Tensor) -> Tensor:
            with autocast():
                return frozen_output(model, parts[tower], inputs.to(device))
        return encode

    started = time.perf_counter()
    with evaluating(model):
        rows = encode_items(dataset, encoder("image"), encoder("text"), batch_size, workers, shards, store,
                            "locked-rows", {tower: part.name for tower, part in parts.items()})
    seconds = time.perf_counter() - started
    facts = {tower: {"part": part.name, "rows": rows.of(tower).shape[0], "dim": rows.of(tower).shape[1]}
             for tower, part in parts.items()}
    return LockedInputs(parts, rows, seconds, {"towers": facts, "seconds": round(seconds, 3),
                                               "mib": round(rows.nbytes / 2**20, 2),
                                               "items_encoded_by_rank_0": rows.encoded_here})
