"""The on-disk feature cache (`FeatureCache`) and what its keys are made of.

Keys name content, not only file names: a file's identity is its size and a hash of its bytes
(all of them up to SMALL_FILE, SAMPLES evenly spaced blocks plus the modification time above),
so a file rewritten with the same size and modification time is a different key, and a
`touch` or a copy to another path that keeps the bytes is not.

Every entry records a SHA-256 checksum, dtype and shape of each tensor and the key it was
written for, and is checked before use (see `FeatureCache` for when and what it costs); a
damaged entry is rebuilt with a warning, never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from clipfit.errors import OutputError
from clipfit.distributed import Distributed, build_in_shares, gather_rows

# --- file content identity ---------------------------------------------------------------------

SMALL_FILE = 8 * 2**20  # files up to this size are hashed whole (an image, a config, a small weights file)
SAMPLES = 16  # larger ones: this many blocks, evenly spaced from the first byte to the last
SAMPLE_BYTES = 256 * 2**10
_DIGESTS: dict[tuple, str] = {}  # per process; keyed by os.stat fields a rewrite always changes (ctime)


def content_digest(path: str | Path) -> str:
    """A hash of a file's bytes: all of them up to SMALL_FILE, else SAMPLES blocks of SAMPLE_BYTES
    with the size and modification time (a sample cannot see every byte; a write elsewhere in
    the file that also restores the modification time would go unnoticed).

    Computed once per process per file version: the memo is keyed by inode, size, mtime and
    ctime, and no write leaves ctime unchanged."""
    stat = Path(path).stat()
    memo = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = hash_file(Path(path), stat.st_size, stat.st_mtime_ns)
    return _DIGESTS[memo]


def hash_file(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SMALL_FILE:
            while block := f.read(2**20):
                digest.update(block)
        else:
            digest.update(f"sampled {size} {mtime_ns}".encode())
            for i in range(SAMPLES):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def file_identity(path: Path) -> list:
    """[path, size, content digest] of one file."""
    return [str(path), path.stat().st_size, content_digest(path)]


def image_identity(image) -> list:
    """[image, size, content digest] of the file holding it (file_identity for an image file)."""
    from clipfit.data.images import stored_in

    return [str(image), *file_identity(stored_in(image))[1:]]


# --- what cached features depend on (parts of FeatureCache keys) -------------------------------

def images_hash(pairs) -> str:
    """Identity of the images of a pair list, in order: paths (table rows) and contents (image_identity)."""
    return image_list_hash([pair.image for pair in pairs])


def image_list_hash(images: list) -> str:
    """Identity of images in order: a file or table row by image_identity, an image decoded
    already (a PIL image, e.g. of CIFAR's test set) by its pixels."""
    digest = hashlib.sha256()
    for image in images:
        if hasattr(image, "tobytes"):
            digest.update(f"{image.mode} {image.size}".encode())
            digest.update(image.tobytes())
        else:
            digest.update(json.dumps(image_identity(image)).encode())
    return digest.hexdigest()[:16]


def texts_hash(texts: list[str]) -> str:
    """Identity of a list of texts, in order."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


def captions_hash(pairs) -> str:
    """Identity of the captions of a pair list, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(list(pair.captions)).encode())
    return digest.hexdigest()[:16]


def files_fingerprint(path: Path) -> list:
    """file_identity of a local file or of every file under a folder; [] if it is not local."""
    if path.is_file():
        return [file_identity(path.resolve())]
    if path.is_dir():
        return [entry for child in sorted(path.rglob("*")) if child.is_file() for entry in files_fingerprint(child)]
    return []


def encoder_identity(spec: str, pretrained: str | None = None, seed: int | None = None) -> dict:
    """What makes an encoder's outputs what they are, without loading it.

    The spec and weights names, the identity (size and content) of any local file or folder
    they name (for the starter, of its packaged aligned weights), the versions of open_clip
    (built-in configs and random init live there), torch (its random number generator draws
    random init) and clipfit and, for random weights (pretrained 'none'), the seed they were
    drawn with.
    """
    from clipfit import installed_version
    from clipfit.starter import ALIGNED_WEIGHTS, STARTER_NAME

    identity = {"spec": spec, "pretrained": pretrained, "files": files_fingerprint(Path(spec))}
    if pretrained:
        identity["files"] += files_fingerprint(Path(pretrained))
    if spec == STARTER_NAME:  # its aligned weights ship inside clipfit and change within a version in development
        identity["files"] += files_fingerprint(ALIGNED_WEIGHTS)
    for package in ("open_clip_torch", "torch", "clipfit"):
        identity[package.removesuffix("_torch")] = installed_version(package)
    if pretrained in (None, "none"):
        identity["seed"] = seed
    return identity


def starting_model_identity(model: str, pretrained: str, seed: int) -> dict:
    """encoder_identity of a run's starting model (its --model, --pretrained and --seed)."""
    return encoder_identity(model, pretrained, seed)


def start_identity(model: str, pretrained: str, seed: int) -> dict:
    """run.json's `start`: what a run started from, comparable between runs made in other folders.

    `fingerprint` hashes starting_model_identity without where its files lie (a local config or
    weights file counts by its size and content, not its path) and without clipfit's version
    (which does not draw weights), so two runs share it exactly when they start from the same
    weights: the same named architecture and tag, the same file contents, or, for random
    weights, the same seed and torch and open_clip versions."""
    identity = starting_model_identity(model, pretrained, seed)
    identity.pop("clipfit", None)
    identity["files"] = [entry[1:] for entry in identity["files"]]
    for key in ("spec", "pretrained"):
        if identity[key] and (Path(identity[key]).is_file() or Path(identity[key]).is_dir()):
            identity[key] = "local"  # its files are in identity["files"]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return {"model": model, "pretrained": pretrained, "seed": identity.get("seed"), "fingerprint": digest}


# --- the on-disk feature cache ---------------------------------------------------------------

def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/clipfit, or ~/.cache/clipfit."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipfit"


def resolve_cache_dir(given: str | Path | None) -> Path:
    """The cache folder: --cache-dir when given, else the user cache folder (default_cache_dir)."""
    return Path(given) if given else default_cache_dir()


CACHE_FORMAT = "2"  # 2: per-tensor checksums, dtypes and shapes, and the key, in the metadata
CACHE_SUBDIR = "features"
ENTRY_NAME = re.compile(r"^(?P<kind>[A-Za-z0-9_-]+)-(?P<key>[0-9a-f]{20})\.safetensors$")
# safetensors dtype names numpy can memory-map; anything else is read with safetensors itself
_MEMMAP_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
                  "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ITEM_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_VERIFIED: set[tuple] = set()  # entry files whose checksums this process has checked (see FeatureCache)


class DamagedEntry(ValueError):
    """A cache entry that must not be used; the message says why."""


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
    damaged: str | None = None  # why it will be rebuilt instead of used; None when it is sound

    def to_json(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "key": self.key, "bytes": self.bytes,
                "created": self.created, "shapes": self.shapes, "key_parts": self.key_parts, "damaged": self.damaged}


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

    Integrity: the metadata holds the key, and each tensor's dtype, shape and SHA-256. Every
    load checks the structure (metadata against the safetensors header, byte ranges against the
    file size, the key against the one asked for, and `rows` when given): cheap, the header only.
    The checksums are compared the first time a process maps an entry file (a version of it:
    same inode, size, mtime, ctime), reading it once (1.6 s for 256 MiB on the loaded 2-core
    development machine, docs/performance.md), and the pages it reads are those training reads
    next. Checking on every map would read a large bank once per use; never checking would
    train on flipped bits. A failed check warns why and rebuilds the entry.

    How PING and DCLIP use it (clipfit.methods.ping, clipfit.dclip.embed; reuse this class, do not
    write a second cache):

        cache = FeatureCache(ctx.cache_dir, log=ctx.log)
        tensors = cache.get_or_build(
            {"kind": "dclip-regions", "encoder": encoder_identity(...), "images": images_hash(ctx.pairs),
             "regions": "grid 2 + full + centre", "format": 1},
            build=lambda part: encode_regions([ctx.pairs[i] for i in part]),  # called on a miss only
            shards=ctx.dist, items=len(ctx.pairs), rows={"region_counts": len(ctx.pairs)})
        tensors["regions"]            # memory-mapped float16; .float() before use in a loss
        cache.hits, cache.builds      # counters; each call also logs "feature cache hit ..." or
                                      # "encoded N items for KIND ..." through `log`

    `key_parts["kind"]` (required) names the entry in `clipfit cache ls`. `build` must return a
    dict of CPU tensors; the first dimension of the first tensor is reported as the item count.
    Without `items`, `build()` takes no argument (and without `shards` it runs in this process).
    `rows` (name → first dimension) is what the caller will index: an entry that disagrees is
    rebuilt rather than failing later with an IndexError.

    Under torchrun every rank calls `get_or_build` with `shards=ctx.dist` and the entry is built
    once for all of them. With `items=N` the work is split by item: `build(part)` gets this
    rank's `range` of the N items (`clipfit.distributed.shard_range`; the whole range in a single
    process) and returns the rows of those items only, in order; every tensor is concatenated
    over the ranks' parts, so per-item tensors of variable length (regions per image, tokens
    per caption, with per-item counts) keep their layout. Without `items` rank 0 alone calls
    `build()` (e.g. a faiss search over finished banks). Either way rank 0 decides hit or miss
    for everyone, writes the entry, and every rank maps the same file; `built_items[kind]` says
    how many items this process built (`items_built_by_rank` collects them from all ranks).
    The cache folder must be one every rank sees (a shared file system across nodes).
    """

    def __init__(self, root: str | Path, log: Callable[[str], None] | None = None,
                 warn: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.log = log or (lambda message: None)
        self.warn = warn or (lambda message: self.log(f"warning: {message}"))
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

    def get(self, key_parts: dict, rows: dict[str, int] | None = None) -> dict[str, Tensor] | None:
        """The cached tensors for `key_parts`, memory-mapped, or None on a miss or a damaged entry."""
        path = self.path_for(key_parts)
        if not path.is_file():
            return None
        try:
            tensors = open_entry(path, cache_key(key_parts), rows)
        except (OSError, DamagedEntry) as e:  # a damaged entry is rebuilt, never trusted
            self.warn(f"feature cache entry {path} is damaged ({e}); rebuilding it")
            return None
        self.hits += 1
        self.log(f"feature cache hit: {key_parts['kind']} from {path}")
        return tensors

    def put(self, key_parts: dict, tensors: dict[str, Tensor], float_dtype: torch.dtype = torch.float16) -> Path:
        from clipfit.io import dumps_json
        from clipfit.models import save_state_dict

        path = self.path_for(key_parts)
        stored = {name: (t.to(float_dtype) if t.is_floating_point() else t).contiguous() for name, t in tensors.items()}
        table = {name: {"shape": list(t.shape), "sha256": tensor_checksum(t)} for name, t in stored.items()}
        save_state_dict(stored, path, {"clipfit_cache": CACHE_FORMAT, "kind": key_parts["kind"],
                                       "key": cache_key(key_parts), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "key_parts": dumps_json(key_parts, indent=None), "tensors": json.dumps(table)})
        return path

    def get_or_build(self, key_parts: dict, build: Callable[..., dict[str, Tensor]],
                     float_dtype: torch.dtype = torch.float16, shards: Distributed | None = None,
                     items: int | None = None, rows: dict[str, int] | None = None) -> dict[str, Tensor]:
        """Cached tensors for `key_parts`, calling `build` and storing its result on a miss.

        `build()`, or `build(part)` for this process's share of `items` (see the class docstring);
        with `shards`, every rank of the run must make the same call.
        The result is always read back from disk, so a first run and a cache hit see the same numbers.
        """
        shards, path = shards or Distributed(), self.path_for(key_parts)
        cached = self.get(key_parts, rows) if shards.is_main else None
        if shards.from_main(lambda: cached is not None):  # one verdict, or ranks would wait on different calls
            if shards.is_main:
                return cached
            self.hits += 1
            return self.shared(path, key_parts, rows)
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
        return self.shared(path, key_parts, rows)

    @staticmethod
    def build_share(build: Callable, shards: Distributed, items: int | None) -> tuple[dict[str, Tensor], int]:
        """Every rank's part gathered (with `items`), or rank 0's whole build; and this process's item count."""
        if items is None:
            tensors = build() if shards.is_main else {}
            return tensors, first_rows(tensors)
        return build_in_shares(build, items, shards)

    @staticmethod
    def shared(path: Path, key_parts: dict, rows: dict[str, int] | None = None) -> dict[str, Tensor]:
        """An entry rank 0 found or wrote, mapped by this rank."""
        if not path.is_file():
            raise OutputError(f"{path}: rank 0 has this feature cache entry but this process cannot see it; "
                              "under torchrun --cache-dir must be a folder every node shares")
        try:
            return open_entry(path, cache_key(key_parts), rows)
        except DamagedEntry as e:  # just written (or checked by rank 0): the file system lost or changed it
            raise OutputError(f"{path}: feature cache entry is damaged right after it was written ({e}); "
                              "check the disk, or use another --cache-dir") from None

    def entries(self, verify: bool = False) -> list[CacheEntry]:
        """Every entry, sound or damaged, newest first; only headers are read unless `verify`
        (then every checksum, reading every file)."""
        found = []
        for path in sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []:
            entry = describe_entry(path, verify)
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: e.created, reverse=True)

    def clear(self, kind: str | None = None, damaged_only: bool = False) -> tuple[int, int]:
        """Delete entries (all, those of one kind, and/or the damaged ones); returns (files, bytes) removed."""
        removed = [e for e in self.entries(verify=damaged_only)
                   if (kind is None or e.kind == kind) and (not damaged_only or e.damaged)]
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


# --- entry files: structure, checksums, memory maps ------------------------------------------------

def tensor_checksum(tensor: Tensor) -> str:
    """SHA-256 of a contiguous CPU tensor's bytes as safetensors stores them (little-endian)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}, __metadata__};
    tensor data starts right after it, at byte 8 + header_size(path)."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise DamagedEntry("file too short for a safetensors header")
        size = int.from_bytes(size_bytes, "little")
        if size > 100_000_000:
            raise DamagedEntry("implausible safetensors header size")
        raw = f.read(size)
    if len(raw) != size:
        raise DamagedEntry("truncated safetensors header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedEntry(f"bad safetensors header ({getattr(e, 'msg', e)})") from None
    if not isinstance(header, dict):
        raise DamagedEntry("bad safetensors header (not an object)")
    return header


def header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def checked_layout(path: Path, expected_key: str | None = None) -> tuple[dict, dict, int]:
    """(metadata, tensor table, data start) of an entry whose structure is sound, else DamagedEntry.

    Sound: written by this cache format for `expected_key`, the metadata's dtypes and shapes are
    the header's, every tensor's byte range is as long as its shape needs, and the ranges fill
    the file exactly (a truncated or extended file fails)."""
    header = read_header(path)
    meta = header.pop("__metadata__", None) or {}
    if meta.get("clipfit_cache") != CACHE_FORMAT:
        raise DamagedEntry(f"cache format {meta.get('clipfit_cache')!r}, this clipfit writes {CACHE_FORMAT!r} "
                           "(older entries have no checksums)")
    if expected_key is not None and meta.get("key") != expected_key:
        raise DamagedEntry(f"it was written for key {meta.get('key')!r}, not {expected_key!r} (renamed or copied?)")
    try:
        table = json.loads(meta.get("tensors", ""))
    except json.JSONDecodeError:
        raise DamagedEntry("no readable tensor table in its metadata") from None
    if not isinstance(table, dict) or set(table) != set(header):
        raise DamagedEntry(f"tensors {sorted(header)} do not match its metadata's {sorted(table) if isinstance(table, dict) else '?'}")
    data_start, end_of_data = 8 + header_size(path), 0
    for name, info in header.items():
        problem = tensor_problem(name, info, table[name])
        if problem:
            raise DamagedEntry(problem)
        end_of_data = max(end_of_data, info["data_offsets"][1])
    if path.stat().st_size != data_start + end_of_data:
        raise DamagedEntry(f"{path.stat().st_size} bytes, its header describes {data_start + end_of_data} (truncated?)")
    return meta, header, data_start


def tensor_problem(name: str, info, recorded) -> str | None:
    """Why one header row is unusable (None when it is sound)."""
    try:
        dtype, shape, (begin, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        return f"tensor {name}: malformed header entry"
    if dtype not in _ITEM_BYTES:
        return f"tensor {name}: unknown dtype {dtype!r}"
    if not isinstance(recorded, dict) or recorded.get("shape") != shape:
        return f"tensor {name}: shape {shape} in the header, {recorded.get('shape') if isinstance(recorded, dict) else '?'} when written"
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or \
            end - begin != math.prod(shape) * _ITEM_BYTES[dtype]:
        return f"tensor {name}: byte range {begin}-{end} does not hold a {dtype} tensor of shape {shape}"
    return None


def verify_checksums(path: Path, header: dict, table: dict, data_start: int) -> None:
    """DamagedEntry unless every tensor's bytes hash to the checksum written with it."""
    with open(path, "rb") as f:
        for name, info in header.items():
            begin, end = info["data_offsets"]
            digest, remaining = hashlib.sha256(), end - begin
            f.seek(data_start + begin)
            while remaining > 0:
                block = f.read(min(remaining, 8 * 2**20))
                if not block:
                    raise DamagedEntry(f"tensor {name}: file ends early")
                digest.update(block)
                remaining -= len(block)
            if digest.hexdigest() != table[name].get("sha256"):
                raise DamagedEntry(f"tensor {name}: checksum mismatch (its bytes changed after it was written)")


def file_version(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def open_entry(path: Path, expected_key: str | None = None, rows: dict[str, int] | None = None) -> dict[str, Tensor]:
    """An entry's tensors, memory-mapped, after the checks the FeatureCache docstring describes."""
    meta, header, data_start = checked_layout(path, expected_key)
    for name, count in (rows or {}).items():
        shape = header.get(name, {}).get("shape")
        if not shape or shape[0] != count:
            raise DamagedEntry(f"tensor {name} has {shape[0] if shape else 'no'} rows, {count} are needed")
    version = file_version(path)
    if version not in _VERIFIED:
        verify_checksums(path, header, json.loads(meta["tensors"]), data_start)
        _VERIFIED.add(version)
    return map_tensors(path, header, data_start)


def map_tensors(path: Path, header: dict, data_start: int) -> dict[str, Tensor]:
    """Tensors of a checked safetensors file as copy-on-write memory maps (pages load when touched)."""
    if any(info["dtype"] not in _MEMMAP_DTYPES for info in header.values()):
        from safetensors.torch import load_file

        return load_file(str(path))
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=getattr(torch, _MEMMAP_DTYPES[info["dtype"]]))
            continue
        array = np.memmap(path, dtype=_MEMMAP_DTYPES[info["dtype"]], mode="c", offset=data_start + begin, shape=shape)
        tensors[name] = torch.from_numpy(array)
    return tensors


def load_mapped(path: Path) -> dict[str, Tensor]:
    """Tensors of any entry file, checked (without a key to compare) and memory-mapped."""
    return open_entry(path)


def describe_entry(path: Path, verify: bool) -> CacheEntry | None:
    """An entry as `clipfit cache ls` shows it, damaged or not; None for a file this cache did not write."""
    named = ENTRY_NAME.match(path.name)
    try:
        meta = read_header(path).get("__metadata__") or {}
    except (OSError, DamagedEntry):
        meta = {}
    if meta.get("clipfit_cache") is None and not named:
        return None  # not ours: left alone by ls and clear
    kind = meta.get("kind") or (named["kind"] if named else "?")
    try:
        key_parts = json.loads(meta.get("key_parts", "{}"))
    except json.JSONDecodeError:
        key_parts = {}
    entry = CacheEntry(path, kind, path.stem.removeprefix(f"{kind}-"), path.stat().st_size,
                       meta.get("created", ""), key_parts if isinstance(key_parts, dict) else {}, {})
    try:
        _, header, data_start = checked_layout(path, named["key"] if named else None)
        entry.shapes = {name: info["shape"] for name, info in header.items()}
        if verify:
            verify_checksums(path, header, json.loads(meta["tensors"]), data_start)
    except (OSError, DamagedEntry) as e:
        entry.damaged = str(e)
    return entry
