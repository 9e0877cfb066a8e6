"""WebDataset tar shards, the format img2dataset writes: `KEY.jpg` + `KEY.txt` (+ `KEY.json`)
members, many pairs per tar. `write_shards` makes them from any pairs folder; `ShardStream`
streams them into training without listing or decoding everything first.

Streaming trades exactness for scale, unlike PairDataset: each epoch shuffles the shard order
and the samples (in a buffer of `shuffle_buffer`), and every (rank, DataLoader worker) slot reads
its own shards, repeating them if it runs short, so an epoch is a fixed number of batches, not
exactly one visit of each pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tarfile
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipfit.data.dataset import batches_per_epoch, caption_group
from clipfit.data.images import IMAGE_EXTENSIONS, BadImage, open_rgb
from clipfit.data.text import captions_of
from clipfit.data.pairs import Pair
from clipfit.errors import DataError
from clipfit.io import atomic_path, write_json

SIZES_JSON = "sizes.json"  # open_clip's convention: shard file name -> number of pairs
IMAGE_MEMBERS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
log = logging.getLogger("clipfit")


@dataclass(frozen=True)
class ShardSet:
    root: Path
    shards: tuple[Path, ...]
    count: int  # pairs in all shards
    identity: str  # changes when any shard changes (names, sizes, contents: clipfit.cache.content_digest)


def find_shards(path: str | Path) -> ShardSet:
    """The .tar shards of a folder (or one .tar file) and how many pairs they hold."""
    root = Path(path)
    if root.is_file() and root.suffix == ".tar":
        shards, root = [root], root.parent
    elif root.is_dir():
        shards = sorted(root.glob("*.tar"))
    else:
        raise DataError(f"{root}: not a folder of .tar shards or a .tar file")
    if not shards:
        raise DataError(f"{root}: no .tar shards found (write them with `clipfit data shard PAIRS OUT`)")
    from clipfit.cache import content_digest

    digest = hashlib.sha256()
    for shard in shards:  # by content (sampled for large shards), as the feature cache's keys
        digest.update(json.dumps([shard.name, shard.stat().st_size, content_digest(shard)]).encode())
    total = sum(shard_sizes(root, shards).values())
    if total == 0:
        raise DataError(f"{root}: the shards hold no image-caption pairs")
    return ShardSet(root, tuple(shards), total, digest.hexdigest()[:16])


def shard_sizes(root: Path, shards: list[Path]) -> dict[str, int]:
    """Pairs per shard: from sizes.json, img2dataset's *_stats.json, or by listing the tar."""
    known = json.loads((root / SIZES_JSON).read_text()) if (root / SIZES_JSON).is_file() else {}
    sizes = {}
    for shard in shards:
        stats = shard.with_name(shard.stem + "_stats.json")
        if shard.name in known:
            sizes[shard.name] = int(known[shard.name])
        elif stats.is_file():
            sizes[shard.name] = int(json.loads(stats.read_text()).get("successes", 0))
        else:
            sizes[shard.name] = count_pairs(shard)
    return sizes


def count_pairs(shard: Path) -> int:
    try:
        with tarfile.open(shard) as tar:
            names = [m.name for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{shard}: not a readable tar file ({e})") from None
    keys = {tuple(name.rsplit(".", 1)) for name in names if "." in name}
    with_image = {k for k, ext in keys if ext.lower() in IMAGE_MEMBERS}
    return len(with_image & {k for k, ext in keys if ext == "txt"})


# --- writing ------------------------------------------------------------------------------

def shard_member(pair: Pair, index: int) -> dict[str, object]:
    extension = pair.image.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    return {
        "__key__": f"{index:09d}",  # webdataset splits keys at the first dot: never use file names
        extension: pair.image.read_bytes(),  # the original bytes, never re-encoded
        "txt": "\n".join(pair.captions).encode("utf-8"),
        "json": json.dumps({"key": pair.key, "captions": list(pair.captions)}).encode("utf-8"),
    }


def write_shards(pairs: list[Pair], out: Path, per_shard: int) -> list[Path]:
    """`out/000000.tar`, ... of at most `per_shard` pairs each, plus sizes.json."""
    from webdataset import TarWriter

    written, sizes = [], {}
    for number, start in enumerate(range(0, len(pairs), per_shard)):
        path = out / f"{number:06d}.tar"
        chunk = pairs[start:start + per_shard]
        with atomic_path(path) as tmp:
            writer = TarWriter(str(tmp), encoder=False)
            for offset, pair in enumerate(chunk):
                writer.write(shard_member(pair, start + offset))
            writer.close()
        written.append(path)
        sizes[path.name] = len(chunk)
    write_json(out / SIZES_JSON, sizes)
    return written


def extract_sample(shardset: ShardSet, folder: Path, limit: int) -> list[Pair]:
    """Copy the first `limit` pairs of the first shards into `folder` as a sidecar pairs folder:
    a small, fixed, inspectable set to measure a streamed run before and after training on."""
    pairs: list[Pair] = []
    for sample in raw_samples(list(shardset.shards)):
        member = image_member(sample)
        if len(pairs) >= limit:
            break
        if member is None or "txt" not in sample:
            continue
        image = folder / f"{sample['__key__']}.{member}"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(sample[member])
        captions = tuple(captions_of(sample["txt"]))
        image.with_suffix(".txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        if captions:
            pairs.append(Pair(image, captions, image.name))
    return pairs


# --- streaming ----------------------------------------------------------------------------

def buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def raw_samples(shards: list[Path]) -> Iterator[dict]:
    from webdataset.handlers import warn_and_continue
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": str(s)} for s in shards], handler=warn_and_continue)


class ShardStream(IterableDataset):
    """Whole batches of (image, tokens) from tar shards, for a DataLoader with batch_size=None.

    Per epoch, rank r with w workers yields exactly batches_per_epoch(count, batch, world)
    batches, as PairDataset's sampler does, so every rank takes the same number of steps.
    """

    def __init__(self, shardset: ShardSet, transform: Callable, tokenizer: Callable, seed: int, batch_size: int,
                 max_pixels: int, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000):
        self.shardset, self.transform, self.tokenizer = shardset, transform, tokenizer
        self.seed, self.batch_size, self.max_pixels = seed, batch_size, max_pixels
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.shardset.count

    def move_to(self, epoch: int, start: int = 0) -> None:
        """Set before a DataLoader is made: its workers copy the stream when they start."""
        self.epoch, self.start = epoch, start

    def slot_samples(self, slot: int, slots: int) -> Iterator[dict]:
        """This slot's raw samples, pass after pass, each pass in a new seeded order."""
        for repeat in count():
            shards = list(self.shardset.shards)
            random.Random(f"{self.seed}:{self.epoch}:{repeat}").shuffle(shards)
            mine = shards[slot::slots] if len(shards) >= slots else shards
            samples = raw_samples(mine)
            if len(shards) < slots:  # fewer shards than readers: share them sample by sample
                samples = (s for i, s in enumerate(samples) if i % slots == slot)
            rng = random.Random(f"{self.seed}:{self.epoch}:{repeat}:{slot}")
            found = False
            for sample in buffer_shuffle(samples, self.shuffle_buffer, rng):
                if image_member(sample) and "txt" in sample:
                    found = True
                    yield sample
            if not found:
                raise DataError(f"{self.shardset.root}: no image-caption pair reached reader {slot} of {slots}")

    def decode(self, sample: dict) -> tuple[torch.Tensor, str, int] | None:
        try:
            image = open_rgb(sample[image_member(sample)], self.max_pixels)
        except BadImage as e:
            log.warning(f"{sample.get('__url__')} {sample['__key__']}: {e}; skipped")
            return None
        captions = captions_of(sample["txt"]) or [""]
        which = random.Random(f"{self.seed}:{self.epoch}:{sample['__key__']}").randrange(len(captions))
        with torch.random.fork_rng(devices=[]):  # augmentation seeded per item, as in PairDataset
            torch.manual_seed(random.Random(f"augment:{self.seed}:{self.epoch}:{sample['__key__']}").getrandbits(63))
            return self.transform(image), captions[which], which

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        total = batches_per_epoch(self.shardset.count, self.batch_size, self.world_size)
        samples = self.slot_samples(self.rank * workers + worker, self.world_size * workers)
        # A DataLoader takes batches from its workers in turn: worker k makes batches k, k+w, ...
        for b in range(worker, total, workers):
            if b < self.start:  # resuming: skip without decoding
                for _ in range(self.batch_size):
                    next(samples)
                continue
            yield self.collate(list(self.decoded(samples)))

    def decoded(self, samples: Iterator[dict]) -> Iterator[tuple]:
        made = 0
        while made < self.batch_size:
            item = self.decode(next(samples))
            if item is not None:
                made += 1
                yield item

    def collate(self, items: list[tuple]) -> dict:
        return {
            "image": torch.stack([image for image, _, _ in items]),
            "text": self.tokenizer([caption for _, caption, _ in items]),
            "index": torch.full((len(items),), -1),  # streamed pairs have no stable index
            "caption": torch.tensor([which for _, _, which in items]),
            "group": torch.tensor([caption_group(caption) for _, caption, _ in items]),
        }


def image_member(sample: dict) -> str | None:
    return next((k for k in sample if k.lower() in IMAGE_MEMBERS), None)
