"""Pairs kept in tables: Parquet files (`--layout parquet`), folders written by Hugging Face
`datasets`' save_to_disk and hub datasets `hf://datasets/ORG/NAME` (`--layout datasets`).

Listing reads one row group (Parquet) or one memory-mapped Arrow file (datasets) at a time and
keeps, per row, only its captions and a `TableImage` reference (file, row group, row), never the
image bytes. An image's bytes are read when it is decoded, and the row group it sits in stays in
a small per-process cache (ROW_GROUP_CACHE_BYTES), so reading in order (data check, precompute,
evaluation) reads each row group once. Training in random order on Parquet larger than that
cache reads a row group per item: write small row groups, let `--lock-image` precompute the
frozen image tower once in order, or convert to streamed shards with `clipfit data shard`.
Arrow files are memory-mapped, so there the operating system's page cache does this job.

An image cell may be Hugging Face's {"bytes", "path"} struct, raw bytes, or a path relative to
the table file; a path becomes an ordinary image file of the pair.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from clipfit.data.pairs import Pair, PairSet, Problem, resolve_inside
from clipfit.errors import DataError, NetworkError, UsageError
from clipfit.hub import check_hub_dataset, first_line

ROW_GROUP_CACHE_BYTES = 128 * 2**20
HUB_DATASET_PREFIX = "hf://datasets/"
SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")
DEFAULT_IMAGE_COLUMN, DEFAULT_CAPTION_COLUMN = "image", "text"
MAGIC_SUFFIXES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"))


def require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"this layout needs the {module.split('.')[0]} package: pip install 'clipfit[{extra}]'") from None


# --- one image inside a table ----------------------------------------------------------------

@dataclass(frozen=True)
class TableImage:
    """An image stored in row `row` of row group `group` of a Parquet or Arrow file."""

    file: Path
    group: int
    row: int
    index: int  # row number in the whole file, for people
    column: str

    def read_bytes(self) -> bytes:
        try:
            cell = CACHE.column(self.file, self.group, self.column)[self.row].as_py()
        except (OSError, DataError):
            raise
        except Exception as e:  # pyarrow's ArrowInvalid (a ValueError) for a damaged file
            raise OSError(f"cannot read row group {self.group} of {self.file.name}: {e}") from None
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, (bytes, bytearray)):
            raise OSError(f"no image bytes in column {self.column!r}")
        return bytes(data)

    def stat(self):
        return self.file.stat()

    @property
    def suffix(self) -> str:
        """The image format's usual extension, from its first bytes (for `clipfit data shard`)."""
        head = self.read_bytes()[:12]
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return ".webp"
        return next((suffix for magic, suffix in MAGIC_SUFFIXES if head.startswith(magic)), ".jpg")

    def __str__(self) -> str:
        return f"{self.file} row {self.index}"


class RowGroupCache:
    """The image columns of recently read row groups, least recently used dropped first; one per
    process, shared by the threads that decode (DataLoader workers each hold their own)."""

    def __init__(self, limit_bytes: int):
        self.limit, self.entries, self.lock = limit_bytes, OrderedDict(), threading.Lock()

    def column(self, file: Path, group: int, column: str):
        key = (str(file), group, column)
        with self.lock:  # one reader at a time: threads asking for the same group read it once
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key][0]
            values = read_group(file, group, column)
            # a memory-mapped Arrow file costs address space, not memory: only Parquet groups count
            self.entries[key] = (values, values.nbytes if file.suffix == ".parquet" else 0)
            while len(self.entries) > 1 and sum(cost for _, cost in self.entries.values()) > self.limit:
                self.entries.popitem(last=False)
            return values


CACHE = RowGroupCache(ROW_GROUP_CACHE_BYTES)


def read_group(file: Path, group: int, column: str):
    """One column of one row group: a Parquet row group, or a whole memory-mapped Arrow file."""
    if file.suffix == ".parquet":
        return parquet_file(file).read_row_group(group, columns=[column]).column(column)
    return arrow_table(file).column(column)


def parquet_file(file: Path):
    pq = require("pyarrow.parquet", "parquet")
    try:
        return pq.ParquetFile(file)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise DataError(f"{file}: not a readable Parquet file ({e})") from None


def arrow_table(file: Path):
    """A datasets Arrow file (IPC stream format), memory-mapped: no bytes are read until used."""
    pa = require("pyarrow", "datasets")
    source = pa.memory_map(str(file))
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).read_all()


# --- which columns -----------------------------------------------------------------------------

def is_image_type(kind) -> bool:
    pa = require("pyarrow", "parquet")
    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def is_caption_type(kind) -> bool:
    pa = require("pyarrow", "parquet")
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def pick_column(schema, wanted: str | None, default: str, fits, what: str, flag: str, where: str,
                exclude: str | None = None) -> str:
    """`wanted` if given, else `default` if present, else the only column of the right type."""
    names = schema.names
    if wanted:
        if wanted not in names:
            raise DataError(f"{where}: no column {wanted!r} ({flag}); columns are {', '.join(names)}")
        return wanted
    if default in names:
        return default
    candidates = [f.name for f in schema if f.name != exclude and fits(f.type)]
    if len(candidates) == 1:
        return candidates[0]
    found = f"several could be ({', '.join(candidates)})" if candidates else "none looks like one"
    raise DataError(f"{where}: which column holds the {what}? no {default!r} column and {found}; "
                    f"set {flag} (columns are {', '.join(names)})")


def pick_columns(schema, image_column: str | None, caption_column: str | None, where: str) -> tuple[str, str]:
    image = pick_column(schema, image_column, DEFAULT_IMAGE_COLUMN, is_image_type, "images", "--image-column", where)
    caption = pick_column(schema, caption_column, DEFAULT_CAPTION_COLUMN, is_caption_type, "captions",
                          "--caption-column", where, exclude=image)
    return image, caption


# --- rows to pairs -----------------------------------------------------------------------------

@dataclass
class Rows:
    """Collects pairs and problems while tables are read, one row group at a time."""

    root: Path
    pairs: list[Pair]
    problems: list[Problem]

    def add_group(self, file: Path, group: int, first_index: int, images, captions, image_column: str) -> None:
        paths, has_bytes = image_cells(images)
        for row, caption in enumerate(captions.to_pylist()):
            index = first_index + row
            where = f"{file} row {index}"
            texts = [caption] if isinstance(caption, str) else list(caption or [])
            texts = tuple(t.strip() for t in texts if isinstance(t, str) and t.strip())
            if not texts:
                self.problems.append(Problem(where, "empty caption"))
                continue
            if has_bytes[row]:
                image = TableImage(file, group, row, index, image_column)
            elif paths[row]:
                image, reason = resolve_inside(file.parent, paths[row])
                if reason:
                    self.problems.append(Problem(where, reason))
                    continue
            else:
                self.problems.append(Problem(where, "no image (empty cell)"))
                continue
            self.pairs.append(Pair(image, texts, f"{file.relative_to(self.root).as_posix()}:{index}"))


def image_cells(images) -> tuple[list[str | None], list[bool]]:
    """Per row of a (chunked) column: the path it names (if any) and whether it holds bytes,
    without copying the bytes."""
    pa, pc = require("pyarrow", "parquet"), require("pyarrow.compute", "parquet")
    if pa.types.is_struct(images.type):
        data = pc.struct_field(images, "bytes")
        paths = (pc.struct_field(images, "path").to_pylist() if images.type.get_field_index("path") >= 0
                 else [None] * len(images))
    elif pa.types.is_string(images.type) or pa.types.is_large_string(images.type):
        return images.to_pylist(), [False] * len(images)
    else:
        data, paths = images, [None] * len(images)
    return paths, [bool(v) for v in pc.fill_null(pc.greater(pc.binary_length(data), 0), False).to_pylist()]


# --- Parquet ---------------------------------------------------------------------------------

def parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.parquet") if not any(part.startswith(".") for part in p.parts))


def read_parquet(root: Path, image_column: str | None, caption_column: str | None) -> PairSet:
    files = parquet_files(root)
    if not files:
        raise DataError(f"{root}: no .parquet files found")
    base = root.parent if root.is_file() else root
    rows = Rows(base, [], [])
    for file in files:
        table = parquet_file(file)
        image, caption = pick_columns(table.schema_arrow, image_column, caption_column, str(file))
        first = 0
        for group in range(table.num_row_groups):
            data = table.read_row_group(group, columns=[image, caption])
            rows.add_group(file, group, first, data.column(image), data.column(caption), image)
            first += data.num_rows
            del data  # one row group in memory at a time
    return PairSet(base, "parquet", rows.pairs, rows.problems)


# --- Hugging Face datasets -------------------------------------------------------------------

def is_save_to_disk(root: Path) -> bool:
    return root.is_dir() and any((root / marker).is_file() for marker in SAVE_TO_DISK_MARKERS)


def read_datasets(location: str, image_column: str | None, caption_column: str | None) -> PairSet:
    """A save_to_disk folder or hf://datasets/ORG/NAME, read through its Arrow files."""
    dataset = open_hub_dataset(location) if location.startswith(HUB_DATASET_PREFIX) else open_saved(Path(location))
    files = [Path(entry["filename"]) for entry in dataset.cache_files]
    if not files:
        raise DataError(f"{location}: the dataset lives in memory only, with no Arrow files to read lazily")
    root = Path(location) if not location.startswith(HUB_DATASET_PREFIX) else files[0].parent
    rows = Rows(files[0].parent, [], [])
    for file in files:
        table = arrow_table(file)
        image, caption = pick_columns(table.schema, image_column, caption_column, location)
        rows.add_group(file, 0, 0, table.column(image), table.column(caption), image)  # chunked: no copy
    return PairSet(root, "datasets", rows.pairs, rows.problems)


def one_split(dataset, where: str):
    """A DatasetDict's train split, or its only one."""
    if not hasattr(dataset, "keys"):
        return dataset
    splits = list(dataset.keys())
    if "train" in splits or len(splits) == 1:
        return dataset["train" if "train" in splits else splits[0]]
    raise DataError(f"{where}: several splits and none is 'train' ({', '.join(splits)}); point at one split's folder")


def open_saved(root: Path):
    datasets = require("datasets", "datasets")
    try:
        return one_split(datasets.load_from_disk(str(root)), str(root))
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        raise DataError(f"{root}: not a readable save_to_disk folder ({e})") from None


def open_hub_dataset(location: str):
    """hf://datasets/ORG/NAME through datasets' cache; one quick request first says whether the
    hub answers (datasets itself retries for half a minute), and HF_HUB_OFFLINE=1 uses the cache."""
    datasets = require("datasets", "datasets")
    from huggingface_hub import constants

    repo = location.removeprefix(HUB_DATASET_PREFIX).strip("/")
    if repo.count("/") != 1:
        raise UsageError(f"{location}: write a hub dataset as hf://datasets/ORG/NAME")
    if not constants.is_offline_mode():
        check_hub_dataset(repo, location)
    try:
        return one_split(datasets.load_dataset(repo), location)
    except ConnectionError as e:
        raise NetworkError(f"{location}: cannot load it from the hub or the local cache ({first_line(e)})") from None
