"""Encoding pair lists with a frozen model: batched, eval mode, no gradients.

Feature banks for methods (PING, DCLIP) are built with `image_bank` and `text_bank`; `FeatureCache`
keeps such features on disk between runs and, under torchrun, builds each entry once for all
ranks (each rank encoding its share of the items).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clipfit.data.images import open_rgb
from clipfit.errors import OutputError
from clipfit.parallel import Distributed, build_in_shares, gather_rows


def ordered_loader(dataset, batch_size: int, workers: int = 0, **kwargs) -> DataLoader:
    """A DataLoader in item order that leaves the global random stream alone: iterating a plain
    DataLoader draws a worker seed from it, and whether a feature-cache hit skips a loop must
    not change what the rest of the run draws."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                      generator=torch.Generator(), **kwargs)


# --- feature banks: every item of a pair list, encoded once ----------------------------------

class _Images(Dataset):
    def __init__(self, pairs, preprocess, max_pixels: int):
        self.pairs, self.preprocess, self.max_pixels = pairs, preprocess, max_pixels

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.preprocess(open_rgb(self.pairs[i].image, self.max_pixels))


class CountLog:
    """'LABEL: done/total' through `log` at every tenth of the way (and at the end)."""

    def __init__(self, log: Callable[[str], None] | None, label: str, total: int):
        self.log, self.label, self.total, self.done, self.next_tenth = log, label, total, 0, 1

    def advance(self, count: int) -> None:
        self.done += count
        if self.log and (self.done * 10 >= self.next_tenth * self.total or self.done >= self.total):
            self.log(f"{self.label}: {self.done}/{self.total}")
            self.next_tenth = self.done * 10 // max(self.total, 1) + 1


@torch.no_grad()
def image_bank(pairs, encode: Callable[[Tensor], Tensor], preprocess: Callable, batch_size: int = 64,
               workers: int = 0, max_pixels: int = 89_478_485, log: Callable[[str], None] | None = None) -> Tensor:
    """L2-normalised embeddings of every pair's image, in pair order (N×d float32, CPU).

    `encode` maps a batch of preprocessed pixels to embeddings; `preprocess` is the encoder's
    evaluation transform (no augmentation), so the bank does not depend on the epoch.
    """
    loader = ordered_loader(_Images(pairs, preprocess, max_pixels), batch_size, workers)
    counter, rows = CountLog(log, "encoding images", len(pairs)), []
    for pixels in loader:
        rows.append(F.normalize(encode(pixels).float(), dim=-1))
        counter.advance(len(pixels))
    return torch.cat(rows)


@torch.no_grad()
def text_bank(pairs, encode: Callable[[list[str]], Tensor], batch_size: int = 64,
              log: Callable[[str], None] | None = None) -> Tensor:
    """One L2-normalised text embedding per pair, in pair order (N×d float32, CPU): the normalised
    mean of its captions' normalised embeddings, so every caption of a pair counts."""
    captions = [(owner, text) for owner, pair in enumerate(pairs) for text in pair.captions]
    counter, sums = CountLog(log, "encoding captions", len(captions)), None
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        embeddings = F.normalize(encode([text for _, text in chunk]).float(), dim=-1)
        if sums is None:
            sums = torch.zeros(len(pairs), embeddings.shape[1])
        sums.index_add_(0, torch.tensor([owner for owner, _ in chunk]), embeddings)
        counter.advance(len(chunk))
    return F.normalize(sums, dim=-1)


# --- what cached features depend on (parts of FeatureCache keys) -------------------------------

def images_hash(pairs) -> str:
    """Identity of the images of a pair list, in order: paths, sizes, modification times."""
    digest = hashlib.sha256()
    for pair in pairs:
        stat = Path(pair.image).stat()
        digest.update(json.dumps([str(pair.image), stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()[:16]


def captions_hash(pairs) -> str:
    """Identity of the captions of a pair list, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(list(pair.captions)).encode())
    return digest.hexdigest()[:16]


def files_fingerprint(path: Path) -> list:
    """(name, size, mtime) of a local file or of every file under a folder; [] if it is not local."""
    if path.is_file():
        stat = path.stat()
        return [[str(path.resolve()), stat.st_size, stat.st_mtime_ns]]
    if path.is_dir():
        return [entry for child in sorted(path.rglob("*")) if child.is_file() for entry in files_fingerprint(child)]
    return []


def encoder_identity(spec: str, pretrained: str | None = None, seed: int | None = None) -> dict:
    """What makes an encoder's outputs what they are, without loading it.

    The spec and weights names, the size and modification time of any local file or folder they
    name, the versions of open_clip (built-in configs and random init live there), torch (its
    random number generator draws random init) and clipfit (the starter's packaged weights) and,
    for random weights (pretrained 'none'), the seed they were drawn with.
    """
    from clipfit import installed_version

    identity = {"spec": spec, "pretrained": pretrained, "files": files_fingerprint(Path(spec))}
    if pretrained:
        identity["files"] += files_fingerprint(Path(pretrained))
    for package in ("open_clip_torch", "torch", "clipfit"):
        identity[package.removesuffix("_torch")] = installed_version(package)
    if pretrained in (None, "none"):
        identity["seed"] = seed
    return identity


def starting_model_identity(config) -> dict:
    """encoder_identity of a run's starting model (--model, --pretrained, --seed)."""
    return encoder_identity(config.model, config.pretrained, config.seed)


# --- the on-disk feature cache ---------------------------------------------------------------

def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/clipfit, or ~/.cache/clipfit."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipfit"


CACHE_FORMAT = "1"
CACHE_SUBDIR = "features"
# safetensors dtype names numpy can memory-map; anything else is read with safetensors itself
_MEMMAP_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
                  "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def cache_key(key_parts: dict) -> str:
    """A short, stable name for `key_parts` (JSON with sorted keys, hashed)."""
    canonical = json.dumps(key_parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


@dataclass
class CacheEntry:
    path: Path
    kind: str
    key: str
    bytes: int
    created: str
    key_parts: dict
    shapes: dict[str, list[int]]

    def to_json(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "key": self.key, "bytes": self.bytes,
                "created": self.created, "shapes": self.shapes, "key_parts": self.key_parts}


class FeatureCache:
    """Tensors computed once from frozen encoders and reused by later runs.

    An entry is one safetensors file, `CACHE_DIR/features/KIND-KEY.safetensors`, where KEY hashes
    `key_parts`. Floating-point tensors are stored as float16 (half the disk and memory; ample for
    L2-normalised embeddings and neighbour search), other dtypes as they are. Entries are loaded
    memory-mapped: rows are read from disk when touched, so a 1 GB bank costs no 1 GB of RAM up front.

    Invalidation is by key: put in `key_parts` EVERYTHING the tensors depend on (encoder identity,
    the data list's hash, preprocessing, the recipe's own settings and a format version). A changed
    part is a different key, hence a miss and a rebuild; the stale entry stays until
    `clipfit cache clear`. Anything left out of `key_parts` will NOT invalidate the entry.

    How PING and DCLIP use it (clipfit.methods.ping, clipfit.dclip.embed; reuse this class, do not
    write a second cache):

        cache = FeatureCache(ctx.cache_dir, log=ctx.log)
        tensors = cache.get_or_build(
            {"kind": "dclip-regions", "encoder": encoder_identity(...), "images": images_hash(ctx.pairs),
             "regions": "grid 2 + full + centre", "format": 1},
            build=lambda part: encode_regions([ctx.pairs[i] for i in part]),  # called on a miss only
            shards=ctx.dist, items=len(ctx.pairs))
        tensors["regions"]            # memory-mapped float16; .float() before use in a loss
        cache.hits, cache.builds      # counters; each call also logs "feature cache hit ..." or
                                      # "encoded N items for KIND ..." through `log`

    `key_parts["kind"]` (required) names the entry in `clipfit cache ls`. `build` must return a
    dict of CPU tensors; the first dimension of the first tensor is reported as the item count.
    Without `items`, `build()` takes no argument (and without `shards` it runs in this process).

    Under torchrun every rank calls `get_or_build` with `shards=ctx.dist` and the entry is built
    once for all of them. With `items=N` the work is split by item: `build(part)` gets this
    rank's `range` of the N items (`clipfit.parallel.shard_range`; the whole range in a single
    process) and returns the rows of those items only, in order; every tensor is concatenated
    over the ranks' parts, so per-item tensors of variable length (regions per image, tokens
    per caption, with per-item counts) keep their layout. Without `items` rank 0 alone calls
    `build()` (e.g. a faiss search over finished banks). Either way rank 0 decides hit or miss
    for everyone, writes the entry, and every rank maps the same file; `built_items[kind]` says
    how many items this process built (`items_built_by_rank` collects them from all ranks).
    The cache folder must be one every rank sees (a shared file system across nodes).
    """

    def __init__(self, root: str | Path, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.log = log or (lambda message: None)
        self.hits = 0
        self.builds = 0
        self.built_items: dict[str, int] = {}

    @property
    def folder(self) -> Path:
        return self.root / CACHE_SUBDIR

    def path_for(self, key_parts: dict) -> Path:
        kind = key_parts.get("kind")
        if not kind or not str(kind).replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"FeatureCache key_parts needs a 'kind' made of letters, digits, - and _ (got {kind!r})")
        return self.folder / f"{kind}-{cache_key(key_parts)}.safetensors"

    def get(self, key_parts: dict) -> dict[str, Tensor] | None:
        """The cached tensors for `key_parts`, memory-mapped, or None on a miss."""
        path = self.path_for(key_parts)
        if not path.is_file():
            return None
        try:
            tensors = load_mapped(path)
        except (OSError, ValueError) as e:  # a damaged entry is rebuilt, never trusted
            self.log(f"feature cache entry {path.name} is unreadable ({e}); rebuilding it")
            return None
        self.hits += 1
        self.log(f"feature cache hit: {key_parts['kind']} from {path}")
        return tensors

    def put(self, key_parts: dict, tensors: dict[str, Tensor], float_dtype: torch.dtype = torch.float16) -> Path:
        from clipfit.models import save_state_dict

        path = self.path_for(key_parts)
        stored = {name: t.to(float_dtype) if t.is_floating_point() else t for name, t in tensors.items()}
        save_state_dict(stored, path, {"clipfit_cache": CACHE_FORMAT, "kind": key_parts["kind"],
                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "key_parts": json.dumps(key_parts, sort_keys=True, default=str)})
        return path

    def get_or_build(self, key_parts: dict, build: Callable[..., dict[str, Tensor]],
                     float_dtype: torch.dtype = torch.float16, shards: Distributed | None = None,
                     items: int | None = None) -> dict[str, Tensor]:
        """Cached tensors for `key_parts`, calling `build` and storing its result on a miss.

        `build()`, or `build(part)` for this process's share of `items` (see the class docstring);
        with `shards`, every rank of the run must make the same call.
        The result is always read back from disk, so a first run and a cache hit see the same numbers.
        """
        shards, path = shards or Distributed(), self.path_for(key_parts)
        cached = self.get(key_parts) if shards.is_main else None
        if shards.from_main(lambda: cached is not None):  # one verdict, or ranks would wait on different calls
            if shards.is_main:
                return cached
            self.hits += 1
            return self.shared(path)
        started = time.perf_counter()
        tensors, share = self.build_share(build, shards, items)
        if shards.is_main:
            self.put(key_parts, tensors, float_dtype)
        shards.barrier()  # the entry is complete before any rank maps it
        self.builds += 1
        self.built_items[key_parts["kind"]] = share
        if share or shards.is_main:  # a rank that only waited for rank 0's build has nothing to report
            what = f"{share} of {items} items (this process's share)" if items is not None and shards.active \
                else f"{first_rows(tensors)} items"
            self.log(f"encoded {what} for {key_parts['kind']} in {time.perf_counter() - started:.1f} s, "
                     f"cached at {path}")
        return self.shared(path)

    @staticmethod
    def build_share(build: Callable, shards: Distributed, items: int | None) -> tuple[dict[str, Tensor], int]:
        """Every rank's part gathered (with `items`), or rank 0's whole build; and this process's item count."""
        if items is None:
            tensors = build() if shards.is_main else {}
            return tensors, first_rows(tensors)
        return build_in_shares(build, items, shards)

    @staticmethod
    def shared(path: Path) -> dict[str, Tensor]:
        """An entry rank 0 found or wrote, mapped by this rank."""
        if not path.is_file():
            raise OutputError(f"{path}: rank 0 has this feature cache entry but this process cannot see it; "
                              "under torchrun --cache-dir must be a folder every node shares")
        return load_mapped(path)

    def entries(self) -> list[CacheEntry]:
        """Every readable entry, newest first (headers only: nothing is loaded)."""
        found = []
        for path in sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []:
            try:
                header = read_header(path)
            except (OSError, ValueError):
                continue
            meta = header.pop("__metadata__", {}) or {}
            if meta.get("clipfit_cache") is None:
                continue
            kind = meta.get("kind", "?")
            found.append(CacheEntry(path, kind, path.stem.removeprefix(f"{kind}-"), path.stat().st_size,
                                    meta.get("created", ""), json.loads(meta.get("key_parts", "{}")),
                                    {name: info["shape"] for name, info in header.items()}))
        return sorted(found, key=lambda e: e.created, reverse=True)

    def clear(self, kind: str | None = None) -> tuple[int, int]:
        """Delete entries (all, or those of one kind); returns (files, bytes) removed."""
        removed = [e for e in self.entries() if kind is None or e.kind == kind]
        for entry in removed:
            entry.path.unlink(missing_ok=True)
        return len(removed), sum(e.bytes for e in removed)


def first_rows(tensors: dict[str, Tensor]) -> int:
    """The item count a build reports: the first dimension of its first tensor."""
    return next(iter(tensors.values())).shape[0] if tensors else 0


def items_built_by_rank(cache: FeatureCache, kinds: list[str], shards: Distributed) -> dict[str, list[int]]:
    """How many items of each kind every rank built in `cache`, in rank order (0 for a hit).

    A collective: every rank calls it. With one process, one number per kind."""
    mine = {kind: torch.tensor([cache.built_items.get(kind, 0)]) for kind in kinds}
    return {kind: counts.tolist() for kind, counts in gather_rows(mine, shards).items()}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}, __metadata__};
    tensor data starts right after it, at byte 8 + header_size(path)."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise ValueError("file too short for a safetensors header")
        size = int.from_bytes(size_bytes, "little")
        if size > 100_000_000:
            raise ValueError("implausible safetensors header size")
        raw = f.read(size)
    if len(raw) != size:
        raise ValueError("truncated safetensors header")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad safetensors header ({e.msg})") from None


def header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def load_mapped(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file as copy-on-write memory maps (pages load when touched)."""
    header = read_header(path)
    header.pop("__metadata__", None)
    if any(info["dtype"] not in _MEMMAP_DTYPES for info in header.values()):
        from safetensors.torch import load_file

        return load_file(str(path))
    data_start = 8 + header_size(path)
    file_size = path.stat().st_size
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if data_start + end > file_size:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
        shape = tuple(info["shape"])
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=getattr(torch, _MEMMAP_DTYPES[info["dtype"]]))
            continue
        array = np.memmap(path, dtype=_MEMMAP_DTYPES[info["dtype"]], mode="c", offset=data_start + begin, shape=shape)
        tensors[name] = torch.from_numpy(array)
    return tensors
