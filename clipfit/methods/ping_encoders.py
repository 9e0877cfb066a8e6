"""CLIP-PING's frozen encoders (--ping-image-encoder, --ping-text-encoder), loaded only when
something must actually be encoded.

An encoder is described by its `identity` (what a FeatureCache key needs; computable without
loading) and a `load()` returning a callable that maps a batch of inputs to embeddings:
image encoders take preprocessed pixel tensors (with `preprocess` for PIL images), text
encoders take a list of strings.

Specs: `SPEC[@PRETRAINED]` for open_clip (architecture name or model-config JSON with its
weights after @, e.g. ViT-B-32@openai or tiny.json@weights.safetensors; hf-hub:org/name and
clipfit run folders need no @), or, for text, a local Hugging Face / sentence-transformers
folder (a folder with config.json), encoded with transformers' AutoModel and mean pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from clipfit.errors import ModelError, UsageError
from clipfit.cache import encoder_identity
from clipfit.models import encode_text, evaluating


@dataclass
class LoadedEncoder:
    encode: Callable  # batch -> (B, d) float tensor, on the CPU
    preprocess: Callable | None = None  # PIL image -> pixel tensor (image encoders)


@dataclass
class FrozenEncoder:
    label: str  # for logs and the report
    identity: dict
    load: Callable[[], LoadedEncoder]
    is_starting_model: bool = False


def split_spec(spec: str) -> tuple[str, str | None]:
    """'ViT-B-32@openai' -> ('ViT-B-32', 'openai'); no @ -> (spec, None)."""
    name, at, pretrained = spec.rpartition("@")
    return (name, pretrained) if at and name else (spec, None)


def needs_weights(name: str) -> bool:
    from clipfit.rundir import is_run_dir

    return not (name.startswith("hf-hub:") or name == "lite0-minilm" or is_run_dir(Path(name)))


def is_hf_text_folder(spec: str) -> bool:
    path = Path(spec)
    return path.is_dir() and (path / "config.json").is_file()


def eval_no_grad(model: nn.Module, forward: Callable) -> Callable:
    """Wrap `forward` so it runs under no_grad with `model` in eval mode, returning float32 on the CPU."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    @torch.no_grad()
    def encode(batch):
        return forward(batch).float().cpu()

    return encode


def open_clip_encoder(spec: str, flag: str, tower: str, device: torch.device, seed: int) -> FrozenEncoder:
    """Image or text tower of an open_clip model named by `spec` (see the module docstring)."""
    name, pretrained = split_spec(spec)
    if pretrained is None and needs_weights(name):
        raise UsageError(f"{flag} {spec}: name its weights after @, e.g. {name}@openai or "
                         f"{name}@weights.safetensors (@none for random weights)")

    def load() -> LoadedEncoder:
        from clipfit import models

        with torch.random.fork_rng():  # random init must not move the run's own random stream
            torch.manual_seed(seed)
            loaded = models.load_model(name, pretrained or "none")
        model = loaded.model.to(device)
        if tower == "image":
            return LoadedEncoder(eval_no_grad(model, lambda pixels: model.encode_image(pixels.to(device))),
                                 loaded.preprocess_val)
        tokenizer = loaded.tokenizer
        return LoadedEncoder(eval_no_grad(model, lambda texts: encode_text(model, tokenizer(texts).to(device))))

    return FrozenEncoder(spec, {**encoder_identity(name, pretrained, seed), "tower": tower}, load)


def hf_text_encoder(folder: str, flag: str, device: torch.device) -> FrozenEncoder:
    """A local transformers text model: mean of the last hidden states over real (unpadded) tokens."""

    def load() -> LoadedEncoder:
        try:
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModel.from_pretrained(folder).to(device)
        except Exception as e:  # transformers raises many kinds; the user needs the folder and the reason
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelError(f"{flag} {folder}: cannot load it as a Hugging Face text model ({first})") from None
        max_length = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)

        def forward(texts):
            tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt").to(device)
            hidden = model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

        return LoadedEncoder(eval_no_grad(model, forward))

    identity = {**encoder_identity(folder), "kind": "hf-mean-pool"}
    return FrozenEncoder(folder, identity, load)


def starting_model_encoder(model: nn.Module, loaded, identity: dict, tower: str, device: torch.device) -> FrozenEncoder:
    """The run's own starting model, used as it is before the first step.

    `model` is the student, still at its starting weights when methods prepare (LoRA adapters
    start as a no-op), so no second copy is loaded. Its train/eval mode is restored after use.
    `identity`: the starting model's feature-cache identity (clipfit.cache.starting_model_identity).
    """

    def load() -> LoadedEncoder:
        if tower == "image":
            forward = lambda pixels: model.encode_image(pixels.to(device), normalize=False)  # noqa: E731
            preprocess = loaded.preprocess_val
        else:
            forward = lambda texts: encode_text(model, loaded.tokenizer(texts).to(device))  # noqa: E731
            preprocess = None

        @torch.no_grad()
        def encode(batch):
            with evaluating(model):
                return forward(batch).float().cpu()

        return LoadedEncoder(encode, preprocess)

    return FrozenEncoder("starting model", {**identity, "tower": tower}, load, is_starting_model=True)


def starting_identity(run) -> dict:
    """The run's starting model's feature-cache identity; `run`: clipfit.methods.base.RunContext."""
    from clipfit.cache import starting_model_identity

    return starting_model_identity(run.model, run.pretrained, run.seed)


def image_encoder(spec: str | None, ctx, run) -> FrozenEncoder:
    if spec is None:
        return starting_model_encoder(ctx.model, ctx.loaded, starting_identity(run), "image", ctx.device)
    return open_clip_encoder(spec, "--ping-image-encoder", "image", ctx.device, run.seed)


def text_encoder(spec: str | None, ctx, run) -> FrozenEncoder:
    if spec is None:
        return starting_model_encoder(ctx.model, ctx.loaded, starting_identity(run), "text", ctx.device)
    if is_hf_text_folder(spec):
        return hf_text_encoder(spec, "--ping-text-encoder", ctx.device)
    return open_clip_encoder(spec, "--ping-text-encoder", "text", ctx.device, run.seed)
