"""Encoding pair lists with a frozen model: batched, eval mode, no gradients.

Feature banks for methods (PING, DCLIP) are built with `image_bank` and `text_bank`;
clipfit.cache.FeatureCache keeps such features on disk between runs and, under torchrun, builds
each entry once for all ranks (each rank encoding its share of the items). The cache's names are
re-exported here for code that imported them from this module.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from clipfit.cache import (CACHE_FORMAT, CACHE_SUBDIR, CacheEntry, FeatureCache, cache_key,
                           captions_hash, encoder_identity, files_fingerprint, first_rows, images_hash,
                           items_built_by_rank, load_mapped, read_header, starting_model_identity)
from clipfit.data.dataset import open_checked
from clipfit.data.text import distinct
from clipfit.data.workers import Loader
from clipfit.progress import track

__all__ = ["ordered_loader", "image_bank", "text_bank",
           # re-exported from clipfit.cache
           "CACHE_FORMAT", "CACHE_SUBDIR", "CacheEntry", "FeatureCache", "cache_key", "captions_hash",
           "encoder_identity", "files_fingerprint", "first_rows", "images_hash", "items_built_by_rank",
           "load_mapped", "read_header", "starting_model_identity"]


def ordered_loader(dataset, batch_size: int, workers: int = 0, **kwargs) -> Loader:
    """A loader in item order that leaves the global random stream alone: iterating a plain
    DataLoader draws a worker seed from it, and whether a feature-cache hit skips a loop must
    not change what the rest of the run draws. Use it as `with ordered_loader(...) as loader:`,
    so its workers end with the block."""
    return Loader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                      generator=torch.Generator(), **kwargs)


# --- feature banks: every item of a pair list, encoded once ----------------------------------

class _Images(Dataset):
    def __init__(self, pairs, preprocess, max_pixels: int):
        self.pairs, self.preprocess, self.max_pixels = pairs, preprocess, max_pixels

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.preprocess(open_checked(self.pairs[i], self.max_pixels))


@torch.no_grad()
def image_bank(pairs, encode: Callable[[Tensor], Tensor], preprocess: Callable, batch_size: int = 64,
               workers: int = 0, max_pixels: int = 89_478_485) -> Tensor:
    """L2-normalised embeddings of every pair's image, in pair order (N×d float32, CPU).

    `encode` maps a batch of preprocessed pixels to embeddings; `preprocess` is the encoder's
    evaluation transform (no augmentation), so the bank does not depend on the epoch.
    """
    with ordered_loader(_Images(pairs, preprocess, max_pixels), batch_size, workers) as loader:
        rows = [F.normalize(encode(pixels).float(), dim=-1) for pixels in track(loader, "bank: images", len(pairs))]
    return torch.cat(rows)


@torch.no_grad()
def text_bank(pairs, encode: Callable[[list[str]], Tensor], batch_size: int = 64) -> Tensor:
    """One L2-normalised text embedding per pair, in pair order (N×d float32, CPU): the normalised
    mean of its captions' normalised embeddings, so every caption of a pair counts. Each distinct
    caption text is encoded once."""
    texts, where = distinct([text for pair in pairs for text in pair.captions])
    owners = torch.tensor([owner for owner, pair in enumerate(pairs) for _ in pair.captions])
    chunks = (texts[start:start + batch_size] for start in range(0, len(texts), batch_size))
    embedded = torch.cat([F.normalize(encode(chunk).float(), dim=-1)
                          for chunk in track(chunks, "bank: captions", len(texts))])
    sums = torch.zeros(len(pairs), embedded.shape[1]).index_add_(0, owners, embedded[torch.tensor(where)])
    return F.normalize(sums, dim=-1)
