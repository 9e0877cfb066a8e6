"""What a method is: the terms it adds to the loss and what it needs to compute them.

The training loop owns the model and the batches; a method turns one step's features into
named loss terms. Methods never step optimisers or write files except through `save`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from clipfit.distributed import Distributed
from clipfit.losses import positives_of

if TYPE_CHECKING:  # a real import would load the model code while plugins register (clipfit.config)
    from clipfit.data.pairs import Pair
    from clipfit.models import LoadedModel


@dataclass
class StepInputs:
    """Everything a method may look at in one training step.

    `images`/`texts` are what the encoder was given: pixels and tokens, or a locked tower's
    precomputed outputs (clipfit.frozen). `image_raw`/`text_raw` are the projected, unnormalised
    embeddings (encode_*(normalize=False)); `image`/`text` their L2-normalised versions. `teacher()` returns the frozen starting
    model's unnormalised (image, text) embeddings for this batch, computed at most once per
    step however many methods ask; a tower no method names in `Method.teacher_towers` is None. With --grad-accum N every field holds the step's whole batch
    (all N micro-batches, rows in order): a method computes its loss on "the batch" and the loop
    turns that into one accumulated gradient (Trainer.accumulated_gradients). `generator` is
    seeded from (seed, step) and the loss is computed once per step, so each pair of the batch gets
    its own draws, and they are reproducible across interruption and resume. `gather(t)` returns the rows of `t` from
    every process of a distributed run (this process's rows keep their gradient): a loss over the
    batch computed on gathered features sees the global batch; alone, `t` itself. `groups` holds
    each row's positives group (clipfit.data.dataset.item_group: its class, or its normalised
    caption), None with --no-multi-positive; `positives()` turns it into the batch's targets.
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
    teacher: Callable[[], tuple[Tensor | None, Tensor | None]]
    captions: Tensor | None = None  # which of each image's captions this row trains on
    gather: Callable[[Tensor], Tensor] = lambda t: t
    groups: Tensor | None = None  # int64 per row: rows of one group are positives of each other
    found: dict[str, Tensor | None] = field(default_factory=dict, repr=False)  # positives(), once per step

    def positives(self) -> Tensor | None:
        """P over the global batch (the groups gathered as the features are): B×B bool, P_ij when
        rows i and j are positives of each other, on the features' device. None when no two rows
        share a group or without groups (--no-multi-positive): the losses' one-hot targets
        (clipfit.losses). Every loss with in-batch negatives passes it on."""
        if "positives" not in self.found:
            groups = None if self.groups is None else self.gather(self.groups.to(self.image.device))
            self.found["positives"] = None if groups is None else positives_of(groups)
        return self.found["positives"]


@dataclass(frozen=True)
class RunContext:
    """What a method is told about the run it is part of, when it is built (its own settings are
    its options). `weights` are the loss weights of every term of the run after --weight: the
    method's defaults (`Method.default_terms`) merged with the other methods' and the user's."""

    seed: int
    batch_size: int  # pairs per step and process
    grad_accum: int  # micro-batches per step: a batch-level loss spans batch_size x grad_accum pairs
    workers: int  # DataLoader worker processes the method may use to encode its own inputs
    max_image_pixels: int  # decompression-bomb limit for the images the method opens itself
    lora: bool  # only LoRA adapters train (the base weights are frozen already)
    resuming: bool  # continuing an interrupted run in the same folder (--resume)
    model: str  # the starting model as --model and --pretrained name it (its feature-cache identity)
    pretrained: str
    multi_positive: bool = True  # rows of one class or caption are positives (work a method does itself)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class MethodContext:
    """What a method gets once, before training: see `Method.prepare`."""

    model: nn.Module  # the (possibly peft-wrapped) student
    loaded: LoadedModel  # the starting model
    pairs: list[Pair]  # the training pairs, indexed like StepInputs.indices
    device: torch.device
    run_dir: Path
    cache_dir: Path
    log: Callable[[str], None]
    # The processes of a torchrun run: every rank prepares, so work done once (feature banks,
    # a teacher) must be shared (FeatureCache.get_or_build(shards=dist), dist.from_main), and
    # only rank 0 may write the run folder.
    dist: Distributed = Distributed()
    warn: Callable[[str], None] | None = None  # shown even with --quiet (e.g. a damaged cache entry)


ALL_OUTPUTS = frozenset({"image", "text", "logit_scale"})  # what a step's encoder returns (Method.outputs_read)


def both_towers_read(terms: set[str], logit_scale: bool) -> frozenset[str]:
    """`Method.outputs_read` of terms that read both towers' features, and the model's logit scale
    when `logit_scale`; nothing when no term is computed."""
    if not terms:
        return frozenset()
    return ALL_OUTPUTS if logit_scale else ALL_OUTPUTS - {"logit_scale"}


class Method:
    """Base class. Subclasses set `name` and `terms` (term -> default weight), and `teacher_towers`
    when their terms read `StepInputs.teacher()`; the one-line summary is the registry's
    (clipfit.methods.REGISTRY). A method is built with its options (its MethodOptions dataclass, or
    None when it has no flags) and the run's RunContext."""

    name: ClassVar[str] = ""
    terms: ClassVar[dict[str, float]] = {}
    teacher_towers: ClassVar[frozenset[str]] = frozenset()  # "image", "text": what step.teacher() must fill

    def outputs_read(self, terms: set[str]) -> frozenset[str]:
        """Which of the step's model outputs ("image", "text", "logit_scale") computing `terms` reads.
        A trainable part nothing reads gets no gradient, which DDP must be told; the default claims
        nothing, so a method that does not say runs with DDP's slower, always-safe setting."""
        return frozenset()

    def __init__(self, options: Any, run: RunContext):
        self.options = options
        self.run = run

    @classmethod
    def default_terms(cls, options: Any) -> dict[str, float]:
        """Loss terms and their default weights under these options (before --weight)."""
        return dict(cls.terms)

    def prepare(self, ctx: MethodContext) -> None:
        """One-off work before the first step (feature banks, teacher training...)."""

    def restrict(self, model: nn.Module, log: Callable[[str], None]) -> None:
        """Freeze the model weights this method does not train (before the optimiser is built and
        frozen parts are precomputed); e.g. DCLIP's image tower outside its projections."""

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
