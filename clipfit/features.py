"""Encoding pair lists with a frozen model: batched, eval mode, no gradients.

Feature banks for methods (PING, DCLIP) and evaluation build on `encode_pairs`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clipfit.data.images import DEFAULT_MAX_PIXELS, open_rgb


class _ImagesAndCaptions(Dataset):
    def __init__(self, pairs, preprocess, tokenizer, caption_index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.pairs, self.preprocess, self.tokenizer, self.caption_index = pairs, preprocess, tokenizer, caption_index
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        pair = self.pairs[i]
        caption = pair.captions[min(self.caption_index, len(pair.captions) - 1)]
        return self.preprocess(open_rgb(pair.image, self.max_pixels)), self.tokenizer([caption])[0]


@torch.no_grad()
def encode_pairs(model: nn.Module, pairs, preprocess: Callable, tokenizer: Callable, device: torch.device,
                 batch_size: int = 64, workers: int = 0, normalize: bool = True,
                 autocast_dtype: torch.dtype | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and (first-)caption embeddings of every pair, as float32 on the CPU, in pair order.

    `max_pixels` is the decompression-bomb limit the pairs were checked under (--max-image-pixels)."""
    was_training = model.training
    model.eval()
    dataset = _ImagesAndCaptions(pairs, preprocess, tokenizer, max_pixels=max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size,
                        num_workers=workers, shuffle=False)
    images, texts = [], []
    try:
        for pixels, tokens in loader:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                image = model.encode_image(pixels.to(device), normalize=False)
                text = model.encode_text(tokens.to(device), normalize=False)
            images.append(image.float().cpu())
            texts.append(text.float().cpu())
    finally:
        model.train(was_training)
    image, text = torch.cat(images), torch.cat(texts)
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return image, text
