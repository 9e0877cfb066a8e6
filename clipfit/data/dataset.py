"""The training dataset and the order it is read in.

Order and caption choice depend only on (seed, epoch, position), never on worker count or
timing, so an interrupted run resumed from a checkpoint reads exactly what it would have.
"""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from clipfit.data.images import BadImage, file_stamp, open_rgb
from clipfit.data.pairs import Pair
from clipfit.data.text import distinct
from clipfit.errors import DataError
from clipfit.progress import printable


def open_checked(pair: Pair, max_pixels: int) -> Image.Image:
    """Decode a pair's image as `clipfit data check` found it. One that vanished, changed or stopped
    decoding since is a DataError naming it (exit 3): skipping it would change every later batch,
    so the run would match neither the check's count nor a resumed run."""
    try:
        if pair.stamp is not None and file_stamp(pair.image) != pair.stamp:
            reason = "changed (size or modification time differ)"
        else:
            return open_rgb(pair.image, max_pixels)
    except FileNotFoundError:
        reason = "vanished"
    except (OSError, BadImage) as e:
        reason = f"became unreadable ({getattr(e, 'strerror', None) or e})"
    raise DataError(f"{printable(pair.image)}: {reason} after the run checked it; put it back unchanged "
                    "and resume (--resume), or start the run again without it")


def caption_index(seed: int, epoch: int, index: int, count: int) -> int:
    """Which of an image's captions epoch `epoch` trains on."""
    if count == 1:
        return 0
    return random.Random(f"{seed}:{epoch}:{index}").randrange(count)


def caption_group(caption: str) -> int:
    """A caption's positives group: a 63-bit id of its text after whitespace and case normalisation
    (runs of whitespace as one space, ends stripped, casefolded), the same in every process and run."""
    normalised = " ".join(caption.split()).casefold()
    digest = hashlib.blake2b(normalised.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def item_group(pair: Pair, caption: int) -> int:
    """The positives group of `pair` trained on its caption number `caption`: rows of one group are
    positives of each other (multi-positive targets). A labelled pair's group is its class; any
    other pair's, the caption's (`caption_group`)."""
    return pair.label if pair.label is not None else caption_group(pair.captions[caption])


def item_seed(seed: int, epoch: int, index: int) -> int:
    return random.Random(f"augment:{seed}:{epoch}:{index}").getrandbits(63)


class PairDataset(Dataset):
    """Items are addressed as (epoch, index) so the caption choice travels with the request.

    Random augmentation is seeded per item from (seed, epoch, index) too, so what an item looks
    like does not depend on the worker that loads it, on persistent workers' RNG history, or on
    whether the run was resumed.
    """

    def __init__(self, pairs: list[Pair], transform: Callable, tokenizer: Callable, seed: int,
                 max_pixels: int):
        self.pairs, self.transform, self.tokenizer = pairs, transform, tokenizer
        self.with_images = True  # False: items carry no pixels (clipfit.frozen.prepare.loop_dataset)
        self.seed, self.max_pixels = seed, max_pixels
        self.pixels: torch.Tensor | None = None  # every image, transformed, once preload() ran
        self.token_lengths: list[list[int]] | None = None  # per pair, per caption (measure_lengths)

    def __len__(self) -> int:
        return len(self.pairs)

    def decode(self, index: int, epoch: int = 0) -> torch.Tensor:
        image = open_checked(self.pairs[index], self.max_pixels)
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream untouched
            torch.manual_seed(item_seed(self.seed, epoch, index))
            return self.transform(image)

    def image(self, index: int, epoch: int = 0) -> torch.Tensor:
        if self.pixels is not None:
            return self.pixels[index]
        return self.decode(index, epoch)

    def preload(self, threads: int = 1) -> None:
        """Decode and transform every image once, into one shared-memory tensor (--cache-images).

        Done in the main process before any DataLoader exists: workers, forked or spawned, then
        read this one copy instead of each decoding (and caching) its own. Only for a
        deterministic transform; the caller refuses it together with augmentation.
        """
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # Pillow releases the GIL
            images = list(pool.map(self.decode, range(len(self))))
        self.pixels = torch.stack(images).share_memory_()

    def measure_lengths(self, batch_size: int = 256) -> None:
        """Tokens of every caption, padding left out (for --length-buckets); each distinct text tokenized once."""
        from clipfit.data.tokens import KEEP_THROUGH_REAL, TrimRule, needed_lengths

        texts, where = distinct([caption for pair in self.pairs for caption in pair.captions])
        rule = TrimRule(KEEP_THROUGH_REAL, pad_id=0)  # open_clip's tokenizers pad with 0
        lengths = [n for start in range(0, len(texts), batch_size)
                   for n in needed_lengths(self.tokenizer(texts[start:start + batch_size]), rule).tolist()]
        flat = [lengths[row] for row in where]
        self.token_lengths, position = [], 0
        for pair in self.pairs:
            self.token_lengths.append(flat[position:position + len(pair.captions)])
            position += len(pair.captions)

    def caption_tokens(self, epoch: int, index: int) -> int:
        """Tokens of the caption item `index` trains on in `epoch`."""
        lengths = self.token_lengths[index]
        return lengths[caption_index(self.seed, epoch, index, len(lengths))]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        pair = self.pairs[index]
        which = caption_index(self.seed, epoch, index, len(pair.captions))
        item = {"text": self.tokenizer([pair.captions[which]])[0], "index": index, "caption": which,
                "group": item_group(pair, which)}
        if self.with_images:
            item["image"] = self.image(index, epoch)
        return item


def batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches only (a tiny last batch makes a degenerate contrastive loss);
    a dataset smaller than one batch trains on all of it as a single batch."""
    return max(1, n // (batch_size * world_size))


BUCKET_WINDOW = 50  # --length-buckets: global batches whose items are sorted by caption length together


def length_bucketed(order: list[int], length_of: Callable[[int], int], global_size: int, batches: int,
                    generator: torch.Generator) -> list[int]:
    """The first `batches` global batches of `order`, regrouped so each holds captions of about one
    length: windows of BUCKET_WINDOW batches are sorted by length and cut into batches again, and
    the batches are then shuffled. Every item of those batches stays, once; the order is still a
    function of the seed and the epoch alone."""
    used, window = order[:batches * global_size], BUCKET_WINDOW * global_size
    grouped = []
    for start in range(0, len(used), window):
        part = sorted(used[start:start + window], key=length_of)
        grouped += [part[i:i + global_size] for i in range(0, len(part), global_size)]
    return [item for b in torch.randperm(len(grouped), generator=generator).tolist() for item in grouped[b]]


class EpochBatches(Sampler):
    """Seeded per-epoch permutation cut into batches, starting at batch `start`.

    With several processes each global batch of batch_size*world_size items is cut into
    per-rank slices, so the union over ranks is what one process would see. With `lengths`
    ((epoch, index) -> caption tokens; --length-buckets) batches hold captions of similar length.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world_size: int = 1, lengths: Callable[[int, int], int] | None = None):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world_size, self.lengths = rank, world_size, lengths

    def move_to(self, epoch: int, start: int = 0) -> None:
        """Point a sampler owned by a long-lived (persistent-worker) DataLoader at another epoch."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.world_size) - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        global_size = min(self.batch_size * self.world_size, self.n)
        if self.lengths is not None:
            batches = batches_per_epoch(self.n, self.batch_size, self.world_size)
            order = length_bucketed(order, lambda i: self.lengths(self.epoch, i), global_size, batches, generator)
        for b in range(self.start, batches_per_epoch(self.n, self.batch_size, self.world_size)):
            chunk = order[b * global_size:(b + 1) * global_size]
            per_rank = len(chunk) // self.world_size
            mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank]
            yield [(self.epoch, i) for i in mine]
