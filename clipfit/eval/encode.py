"""Encode images and texts for evaluation: batched, eval mode, no gradients, cached per data.

One `Encoder` serves one model state: a command makes one, and refine makes one for the
starting model and another for the result, so a cache never outlives the weights it holds.
Every feature any evaluation sees passes `Encoder.run`, which refuses NaN and infinite outputs:
NaN scores every comparison false, so NaN embeddings would otherwise rank every match first.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clipfit.cache import image_list_hash, texts_hash
from clipfit.data.text import distinct
from clipfit.data.tokens import needed_lengths, text_trim_rule
from clipfit.errors import DataError, TrainingError
from clipfit.features import ordered_loader
from clipfit.frozen.measure import FrozenRows
from clipfit.frozen.towers import frozen_output
from clipfit.models import encode_text, evaluating, use_channels_last
from clipfit.precision import autocast
from clipfit.progress import track


class ImageFiles(Dataset):
    """Preprocessed images from a list of paths, decoded by `load` (a path → PIL image)."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable, load: Callable):
        self.paths, self.preprocess, self.load = list(paths), preprocess, load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from clipfit.data.images import BadImage
        from clipfit.progress import printable

        try:
            return self.preprocess(self.load(self.paths[i]))
        except (BadImage, OSError) as e:
            raise DataError(f"{printable(self.paths[i])}: {e}") from None


def show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@dataclass
class Encoder:
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    batch_size: int = 64
    workers: int = 0
    precision: str = "fp32"
    quiet: bool = True
    label: str = "the model"  # names the model in errors
    cache: dict = field(default_factory=dict)
    # What the model's weights are, when that is known and fixed (a starting model, a weights file);
    # with a feature cache, zero-shot classifiers are then kept on disk for every later evaluation.
    # None for weights changed in memory (a model being trained): nothing outlives this Encoder.
    identity: dict | None = None
    feature_cache: Any = None  # clipfit.cache.FeatureCache
    # The frozen parts' outputs, shared by every encoder of the model's run (clipfit.frozen.measure);
    # None: every tower runs whole.
    frozen: FrozenRows | None = None

    def autocast(self):
        return autocast(self.device, self.precision)

    def batches(self, loader, description: str, items: int | None = None):
        """`loader`'s batches, shown as progress in batches, or in items when `items` is given."""
        if self.quiet:  # inside a command with its own Progress (refine): a phase of it
            return track(loader, f"eval: {description}", items or len(loader), size=len if items else lambda _batch: 1)
        if not show_progress(self.quiet):
            return loader
        from rich.console import Console
        from rich.progress import track as rich_track

        if items:
            return counted(rich_track(range(items), description=description, console=Console(stderr=True),
                                      transient=True), loader)
        return rich_track(loader, description=description, console=Console(stderr=True), transient=True)

    def run(self, encode: Callable, loader, description: str, items: int | None = None) -> torch.Tensor:
        """Normalised embeddings of every batch of `loader` through `encode(batch, normalize=False)`;
        `items`: how many items will come (a stream's progress counts them)."""
        return self.finished(self.outputs(partial(encode, normalize=False), loader, description, items), description)

    @torch.no_grad()
    def outputs(self, encode: Callable, batches: Iterable, description: str, items: int | None = None) -> torch.Tensor:
        """`encode(batch)` of every batch, in evaluation mode, as float32 CPU rows in batch order."""
        outputs = []
        with evaluating(self.model):
            for batch in self.batches(batches, description, items):
                with self.autocast():
                    outputs.append(encode(batch.to(self.device)).float().cpu())
        return torch.cat(outputs)

    def finished(self, features: torch.Tensor, description: str) -> torch.Tensor:
        self.check_finite(features, description)
        return F.normalize(features, dim=-1)

    def tower(self, tower: str, batches: Callable[[], Any], count: int, identity: Callable[[], dict],
              description: str) -> torch.Tensor:
        """Unnormalised outputs of `tower` ("image" or "text") for the `count` items `batches()`
        yields (a context manager giving the batches), in batch order.

        A tower with a frozen part (`frozen`, clipfit.frozen.measure) runs it once per item,
        however many times this or a later encoder of the run asks (`identity()` names the
        items by content), and only its trainable rest on those rows now."""
        encode = partial(self.model.encode_image, normalize=False) if tower == "image" else partial(encode_text, self.model)
        part = self.frozen.part(tower) if self.frozen is not None else None
        if part is None:
            with batches() as loaded:
                return self.outputs(encode, loaded, description)

        def frozen_rows() -> torch.Tensor:
            with batches() as loaded:
                return self.outputs(partial(frozen_output, self.model, part), loaded, f"{description} (frozen part)")

        rows = self.frozen.of_items(tower, identity(), count, frozen_rows)
        return rows if part.rest is None else self.outputs(part.rest, rows.split(self.batch_size), description)

    def check_finite(self, features: torch.Tensor, description: str) -> None:
        """Exit 5 naming the model when any embedding holds NaN or infinity."""
        bad = int((~torch.isfinite(features)).any(dim=-1).sum()) if features.numel() else 0
        if bad:
            hint = "" if self.precision == "fp32" else f", or --precision {self.precision} overflowed (try fp32)"
            raise TrainingError(f"{self.label}: {bad} of {len(features)} embeddings of the {description} are NaN or "
                                f"infinite; its weights hold non-finite values{hint}")

    def images(self, paths: Sequence[Path], load: Callable, key: str) -> torch.Tensor:
        """Normalised embeddings of the images at `paths`, computed once per `key`."""
        if ("images", key) not in self.cache:
            description = f"images of {Path(key).name}"
            batches = partial(ordered_loader, ImageFiles(paths, self.preprocess, load), self.batch_size, self.workers)
            identity = lambda: {"images": image_list_hash(list(paths)), "set": key}  # noqa: E731
            features = self.tower("image", batches, len(paths), identity, description)
            self.cache["images", key] = self.finished(features, description)
        return self.cache["images", key]

    def image_stream(self, batches: Iterable[torch.Tensor], description: str, items: int) -> torch.Tensor:
        """Normalised embeddings of batches of already preprocessed images, in the order they come
        (a set streamed from its shards, decoded elsewhere: clipfit.eval.wds); `items` images will come."""
        return self.run(self.model.encode_image, batches, description, items)

    def texts(self, texts: Sequence[str], description: str = "texts") -> torch.Tensor:
        """Normalised embeddings of `texts`, in order. Each distinct text is encoded once per
        Encoder: a labelled folder's captions repeat per class, and are its classifier's prompts too.

        They are encoded shortest first, so each batch holds texts of about one length and is
        trimmed to it (clipfit.models.encode_text); a text's embedding does not depend on the
        others in its batch, so the order changes nothing but the work."""
        known = self.cache.setdefault("texts", {})  # text -> its embedding, for this model state
        unique, where = distinct(texts)
        new = [text for text in unique if text not in known]
        if new:
            tokens = self.tokenizer(new)
            order = torch.argsort(needed_lengths(tokens, text_trim_rule(self.model)), stable=True)
            chunks = [tokens[order[i:i + self.batch_size]] for i in range(0, len(order), self.batch_size)]
            identity = lambda: {"texts": texts_hash(new)}  # noqa: E731
            embedded = self.tower("text", partial(nullcontext, chunks), len(new), identity, description)
            known.update(zip(new, self.finished(embedded, description)[torch.argsort(order)]))
        return torch.stack([known[text] for text in unique])[torch.tensor(where, dtype=torch.long)]


def counted(ticks: Iterator, batches: Iterable) -> Iterator:
    """`batches`, advancing the item-counting progress iterator `ticks` by each batch's length;
    `ticks` is run out at the end, which closes its bar."""
    for batch in batches:
        yield batch
        for _ in zip(range(len(batch)), ticks):
            pass
    for _ in ticks:
        pass


def encoder_for(loaded, model: nn.Module, device: torch.device, batch_size: int, workers: int, precision: str,
                quiet: bool = True, label: str | None = None, identity: dict | None = None,
                feature_cache=None, frozen: FrozenRows | None = None) -> Encoder:
    """The encoder of `model`, whose convolutional image tower it stores channels-last on CPU, as
    training does (clipfit.models.use_channels_last: faster, the same numbers to float rounding)."""
    use_channels_last(model, device)
    return Encoder(model, loaded.preprocess_val, loaded.tokenizer, device, batch_size, workers, precision, quiet,
                   label or model_label(loaded), identity=identity, feature_cache=feature_cache, frozen=frozen)


def model_label(loaded) -> str:
    """How errors name a loaded model: its run folder, or architecture and weights."""
    if loaded.source.get("kind") == "run":
        return f"model {loaded.source['path']}"
    return f"model {loaded.arch} ({loaded.pretrained})"
