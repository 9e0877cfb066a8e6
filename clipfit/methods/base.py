"""What a method is: the terms it adds to the loss and what it needs to compute them.

The training loop owns the model and the batches; a method turns one step's features into
named loss terms. Methods never step optimisers or write files except through `save`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from clipfit.parallel import Distributed


@dataclass
class StepInputs:
    """Everything a method may look at in one training step.

    `images`/`texts` are what the encoder was given: pixels and tokens, or a locked tower's
    precomputed outputs (clipfit.towers). `image_raw`/`text_raw` are the projected, unnormalised
    embeddings (encode_*(normalize=False)); `image`/`text` their L2-normalised versions. `teacher()` returns the frozen starting
    model's unnormalised (image, text) embeddings for this batch, computed at most once per
    step however many methods ask. `generator` is seeded from (seed, step) so random draws
    are reproducible across interruption and resume. `gather(t)` returns the rows of `t` from
    every process of a distributed run (this process's rows keep their gradient): a loss over the
    batch computed on gathered features sees the global batch; alone, `t` itself.
    """

    images: Tensor
    texts: Tensor
    indices: Tensor
    image_raw: Tensor
    text_raw: Tensor
    image: Tensor
    text: Tensor
    logit_scale: Tensor
    generator: torch.Generator
    step: int
    teacher: Callable[[], tuple[Tensor, Tensor]]
    captions: Tensor | None = None  # which of each image's captions this row trains on
    gather: Callable[[Tensor], Tensor] = lambda t: t


@dataclass
class MethodContext:
    """What a method gets once, before training: see `Method.prepare`."""

    model: nn.Module  # the (possibly peft-wrapped) student
    loaded: Any  # clipfit.models.LoadedModel of the starting model
    config: Any  # clipfit.config.RefineConfig
    pairs: list  # the training pairs (clipfit.data.layouts.Pair), indexed like StepInputs.indices
    device: torch.device
    run_dir: Path
    cache_dir: Path
    log: Callable[[str], None]
    frozen_features: Callable[..., Any] = None  # encodes a pair list with the frozen model
    extra: dict = field(default_factory=dict)  # timings and facts for the report
    # The processes of a torchrun run: every rank prepares, so work done once (feature banks,
    # a teacher) must be shared (FeatureCache.get_or_build(shards=dist), dist.from_main), and
    # only rank 0 may write the run folder.
    dist: Distributed = Distributed()
    warn: Callable[[str], None] | None = None  # shown even with --quiet (e.g. a damaged cache entry)


class Method:
    """Base class. Subclasses set `name`, `summary` and `terms` (term -> default weight)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    terms: ClassVar[dict[str, float]] = {}
    needs_teacher: ClassVar[bool] = False

    def __init__(self, config: Any):
        self.config = config

    def prepare(self, ctx: MethodContext) -> None:
        """One-off work before the first step (feature banks, teacher training...)."""

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters (heads); they join the optimiser."""
        return []

    def losses(self, step: StepInputs, wanted: set[str]) -> dict[str, Tensor]:
        """Unweighted loss terms for this step; only the names in `wanted` need computing."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to checkpoint and resume (e.g. head weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what `state_dict` returned."""

    def save(self, run_dir: Path) -> None:
        """Write the method's own artefacts into the run folder."""

    def report(self) -> dict[str, Any]:
        """Facts for report.md/run.json (bank build time, teacher curve...)."""
        return {}
