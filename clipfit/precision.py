"""--precision: the one table from its names to autocast, for training, evaluation and frozen work.

Its own module, importing only torch, so the loop (clipfit.train), the evaluation encoder
(clipfit.eval.encode) and frozen work (clipfit.frozen) share it without importing each other.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Callable

import torch

AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context for `precision` on `device`; fp32 computes as written (no context)."""
    dtype = AUTOCAST[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def autocast_for(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """`autocast(device, precision)` as a factory: a fresh context for every `with`."""
    return partial(autocast, device, precision)
