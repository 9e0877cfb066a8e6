"""Image↔text retrieval and embedding geometry on a pairs folder (any clipfit layout).

Every caption of an image is a query and a target: text→image asks each caption to find its
image; image→text counts an image as found when any of its captions is in the top k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from clipfit.data.pairs import Pair
from clipfit.eval.encode import Encoder
from clipfit.eval.metrics import caption_retrieval, geometry


@dataclass
class PairFeatures:
    image: Tensor  # (images, dim)
    text: Tensor  # (captions, dim)
    text_image: Tensor  # caption j belongs to image text_image[j]


def encode_pairs_all_captions(encoder: Encoder, pairs: list[Pair], key: str, max_pixels: int | None = None) -> PairFeatures:
    """Every image and every caption of `pairs`, encoded once per `key` and Encoder."""
    from functools import partial

    from clipfit.data.images import DEFAULT_MAX_PIXELS, open_rgb

    if ("pairs", key) not in encoder.cache:
        load = partial(open_rgb, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
        image = encoder.images([p.image for p in pairs], load, key)
        captions = [c for p in pairs for c in p.captions]
        text_image = torch.tensor([i for i, p in enumerate(pairs) for _ in p.captions], dtype=torch.long)
        encoder.cache["pairs", key] = PairFeatures(image, encoder.texts(captions, "captions"), text_image)
    return encoder.cache["pairs", key]


def retrieval_features(encoder: Encoder, data, key: str, max_pixels: int | None = None) -> PairFeatures:
    """A retrieval set's features: a pair list (encoded once per `key`) or a streamed set
    (clipfit.eval.wds.WdsSet, once per its shards)."""
    if isinstance(data, list):
        return encode_pairs_all_captions(encoder, data, key, max_pixels)
    return data.pair_features(encoder)


def first_captions(features: PairFeatures) -> Tensor:
    """Each image's first caption embedding, one row per image."""
    starts = torch.ones_like(features.text_image, dtype=torch.bool)
    starts[1:] = features.text_image[1:] != features.text_image[:-1]
    return features.text[starts]


def retrieval_metrics(features: PairFeatures) -> dict[str, float]:
    return caption_retrieval(features.image, features.text, features.text_image)


def geometry_metrics(features: PairFeatures) -> dict[str, float]:
    return geometry(features.image, features.text, (features.image[features.text_image], features.text))


def load_eval_pairs(path: str | Path, workers: int = 4, warn=None) -> list[Pair]:
    """Usable pairs of a folder; unreadable images are left out with one warning."""
    from clipfit.data.check import check_pairset
    from clipfit.data.layouts import load_pairs
    from clipfit.errors import DataError

    report = check_pairset(load_pairs(path), find_duplicates=False, workers=max(1, workers))
    if not report.usable:
        raise DataError(f"{path}: no readable image-caption pairs")
    if report.bad_images and warn:
        warn(f"{path}: left out {len(report.bad_images)} unreadable image(s), e.g. "
             f"{report.bad_images[0].path}: {report.bad_images[0].reason}")
    return report.usable
