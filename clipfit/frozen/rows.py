"""Per-item outputs of frozen computations, computed once before training.

A frozen computation (the starting model as a teacher, a locked tower) that sees the same input
every epoch gives the same output every epoch: `encode_items` runs it once per image and once
per distinct caption text, in dataset order, and training steps look rows up by (index, caption)
instead of running it again. Identical captions share one row: a labelled folder's N images
with 80 templates each are classes × 80 texts, not 80·N. Lookups return the very same numbers in
a resumed run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from clipfit.cache import FeatureCache, captions_hash, images_hash
from clipfit.data.text import distinct
from clipfit.distributed import Distributed, build_in_shares
from clipfit.features import ordered_loader
from clipfit.progress import track

Encode = Callable[[Tensor], Tensor]
ROWS_FORMAT = 2  # 2: one text row per distinct caption text (1: one per caption of every item)


@dataclass
class Captions:
    """A dataset's captions, each distinct text once: caption c of item i is text
    `rows[starts[i] + c]`; `first_item[j]` is the item text j first appears in."""

    texts: list[str]
    rows: Tensor
    starts: Tensor
    first_item: list[int]


def dataset_captions(dataset) -> Captions:
    flat = [caption for pair in dataset.pairs for caption in pair.captions]
    counts = torch.tensor([len(pair.captions) for pair in dataset.pairs])
    texts, rows = distinct(flat)
    owner = [i for i, pair in enumerate(dataset.pairs) for _ in pair.captions]
    first_item = [0] * len(texts)
    for position in reversed(range(len(flat))):  # the earliest position of a text is written last
        first_item[rows[position]] = owner[position]
    return Captions(texts, torch.tensor(rows, dtype=torch.long), torch.cumsum(counts, 0) - counts, first_item)


@dataclass
class ItemRows:
    """`images[i]`: row of image i; `text_rows(i, c)`: row of caption c of image i (see Captions)."""

    images: Tensor | None
    texts: Tensor | None
    captions: Captions
    encoded_here: int = 0  # items this process encoded (its share under torchrun)

    def of(self, tower: str) -> Tensor | None:
        return self.images if tower == "image" else self.texts

    def put(self, tower: str, rows: Tensor) -> None:
        setattr(self, "images" if tower == "image" else "texts", rows)

    def image_rows(self, indices: Tensor) -> Tensor:
        return self.images[indices.long()]

    def text_rows(self, indices: Tensor, captions: Tensor) -> Tensor:
        return self.texts[self.captions.rows[self.captions.starts[indices.long()] + captions.long()]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.texts) if t is not None)


class _DatasetImages(Dataset):
    """The dataset's images (epoch 0's view), in order."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return self.dataset.image(index)


@torch.no_grad()
def encode_share(dataset, captions: Captions, encode_images: Encode | None, encode_texts: Encode | None,
                 batch_size: int, workers: int, part: range) -> dict[str, Tensor]:
    """Rows of the items in `part`: "images" (one per item) and "texts" (one per distinct caption
    text first met in these items; the shares of contiguous parts concatenate in text order)."""
    rows = {}
    if encode_images is not None:
        with ordered_loader(Subset(_DatasetImages(dataset), part), batch_size, workers) as loader:
            rows["images"] = torch.cat([encode_images(pixels).float().cpu()
                                        for pixels in track(loader, "precompute: images", len(part))])
    texts = [text for text, item in zip(captions.texts, captions.first_item) if item in part]
    if encode_texts is not None and texts:  # under torchrun a share may meet no new text: it adds no rows
        chunks = (texts[start:start + batch_size] for start in range(0, len(texts), batch_size))
        rows["texts"] = torch.cat([encode_texts(dataset.tokenizer(chunk)).float().cpu()
                                   for chunk in track(chunks, "precompute: captions", len(texts))])
    return rows


@dataclass
class RowStore:
    """Where precomputed rows are kept: a feature cache, and what rows depend on besides the
    pairs and what is encoded (the starting model's identity; settings such as precision and
    device type that change the numbers)."""

    cache: FeatureCache
    model: dict
    settings: dict

    def key(self, kind: str, dataset, what: dict) -> dict:
        """The key of rows of a training dataset's items."""
        return self.key_for(kind, {"images": images_hash(dataset.pairs), "captions": captions_hash(dataset.pairs),
                                   "items": len(dataset), "what": what})

    def key_for(self, kind: str, items: dict) -> dict:
        """The key of rows of the items `items` names."""
        return {"kind": kind, "format": ROWS_FORMAT, "model": self.model, **items, **self.settings}


def encode_items(dataset, encode_images: Encode | None, encode_texts: Encode | None, batch_size: int,
                 workers: int = 0, shards: Distributed | None = None, store: RowStore | None = None,
                 kind: str = "rows", what: dict | None = None) -> ItemRows:
    """Every image through `encode_images` and every distinct caption text's tokens through
    `encode_texts` (either may be None), as float32 CPU rows in dataset order.

    With a `store` the rows are kept in its feature cache under a key of `kind` that names the
    pairs, the model, `what` is encoded and the settings, and read back memory-mapped: large data
    stays on disk, and a later run on the same pairs and starting model reuses them. Under
    torchrun (`shards`) each rank encodes its contiguous share of the items and every rank gets all
    rows. Images are decoded in `workers` DataLoader processes; only use this for inputs without
    random augmentation, or the rows would stand for one random view forever.
    """
    captions = dataset_captions(dataset)
    if encode_images is None and encode_texts is None:  # nothing to encode: no work, no cache entry
        return ItemRows(None, None, captions)
    shards = shards or Distributed()
    build = partial(encode_share, dataset, captions, encode_images, encode_texts, batch_size, workers)
    if store is None:
        rows, encoded = build_in_shares(build, len(dataset), shards)
    else:
        key = store.key(kind, dataset, what or {})
        needed = {name: count for name, count, encode in (("images", len(dataset), encode_images),
                  ("texts", len(captions.texts), encode_texts)) if encode is not None}
        rows = store.cache.get_or_build(key, build, float_dtype=torch.float32, shards=shards, items=len(dataset),
                                        rows=needed)
        encoded = store.cache.built_items.get(kind, 0)
    return ItemRows(rows.get("images"), rows.get("texts"), captions, encoded)
