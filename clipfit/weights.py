"""Putting loaded weights into a built model: the placeholders a model is built with when every
weight comes from a file next (no random initialisation to overwrite), and the assignment that
fills them. clipfit.models and clipfit.starter both load this way."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from clipfit.errors import ModelError

PLACEHOLDER_DEVICE = {"device": None}


@contextmanager
def placeholder_weights() -> Iterator[None]:
    """Build a model whose every weight is loaded next without initialising its weights first.

    open_clip, timm and transformers draw a random value for every weight as they build a model,
    and loading then overwrites them all. Inside this context each parameter is a placeholder on
    the meta device (no memory, no random draws); buffers (BatchNorm statistics, attention masks,
    position ids) are built as usual. `assign_weights` puts the loaded tensors in the
    placeholders' place, and `check_loaded` names any weight no file provided. open_clip is called
    with PLACEHOLDER_DEVICE: its closing `.to(device)` then moves nothing (a placeholder holds no
    data to copy); the model is on the CPU, as its buffers were built."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        placeholder = None if param is None else type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, placeholder)

    nn.Module.register_parameter = on_meta
    notice = WeightsComeNext()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        logging.getLogger().removeFilter(notice)


class WeightsComeNext(logging.Filter):
    """open_clip says a model it built without a checkpoint is 'initialized randomly': not one built
    for its weights to be loaded next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def assign_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """`module.load_state_dict(state, strict=False)` with the tensors put in place rather than copied
    (so placeholders from `placeholder_weights` become real), each in its weight's dtype;
    returns the missing and unexpected keys."""
    own = module.state_dict()
    cast = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() and own[k].is_floating_point() else v
            for k, v in state.items()}
    return module.load_state_dict(cast, strict=False, assign=True)


def check_loaded(model: nn.Module, source: str) -> None:
    """ModelError when a weight is still a placeholder: no file held it."""
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelError(f"{source}: no weights were found for {len(left)} tensor(s), e.g. {left[0]}")
