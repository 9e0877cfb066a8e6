"""Find image-caption pairs in a folder, in any of the supported layouts.

Layouts:
  sidecar  `cat.jpg` + `cat.txt` side by side (recursive); one caption per line.
  hf       `metadata.jsonl` / `metadata.csv` with `file_name` and `text` (Hugging Face imagefolder).
  csv      an open_clip-style CSV/TSV with image-path and caption columns; separator sniffed.
  parquet  Parquet files with an image and a caption column (clipfit.data.tables).
  datasets a Hugging Face `datasets` save_to_disk folder, or hf://datasets/ORG/NAME (clipfit.data.tables).
Problems (missing files, empty captions, escaping paths...) are collected, never raised,
so `clipfit data check` can list them all; the caller decides whether they are fatal.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from clipfit.data.images import is_image_path
from clipfit.errors import DataError, UsageError

LAYOUTS = ("sidecar", "hf", "csv", "parquet", "datasets")
HF_MANIFESTS = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class Pair:
    image: Path  # or a clipfit.data.tables.TableImage: an image inside a table row, read when decoded
    captions: tuple[str, ...]
    key: str  # path relative to the data folder: a stable identity for caches and reports


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str


@dataclass
class PairSet:
    root: Path
    layout: str
    pairs: list[Pair]
    problems: list[Problem] = field(default_factory=list)  # items that cannot be used
    warnings: list[Problem] = field(default_factory=list)  # items used, but worth knowing
    images_without_captions: list[str] = field(default_factory=list)
    captions_without_images: list[str] = field(default_factory=list)


def read_caption_file(path: Path, warnings: list[Problem]) -> list[str]:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        warnings.append(Problem(str(path), "caption is not valid UTF-8; undecodable bytes replaced"))
    return [line.strip() for line in text.splitlines() if line.strip()]


def walk_files(root: Path, problems: list[Problem]) -> list[Path]:
    """All non-hidden files below root, following directory symlinks but not their loops."""
    files: list[Path] = []
    seen: set[str] = set()

    def visit(folder: Path) -> None:
        real = os.path.realpath(folder)
        if real in seen:
            problems.append(Problem(str(folder), "symlink loop: folder already visited, skipped"))
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append(Problem(str(folder), f"cannot list folder: {e.strerror or e}"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir():  # follows symlinks, hence the loop guard above
                visit(path)
            elif entry.is_file():
                files.append(path)
            elif entry.is_symlink():
                problems.append(Problem(str(path), "broken symlink"))

    visit(root)
    return files


def relative_key(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def read_sidecars(root: Path) -> PairSet:
    problems: list[Problem] = []
    warnings: list[Problem] = []
    files = walk_files(root, problems)
    by_stem: dict[Path, list[Path]] = defaultdict(list)
    for path in files:
        by_stem[path.with_suffix("")].append(path)
    pairs, lonely_images, lonely_captions = [], [], []
    for stem, group in sorted(by_stem.items()):
        images = [p for p in group if is_image_path(p)]
        texts = [p for p in group if p.suffix.lower() == ".txt"]
        if not images:
            lonely_captions.extend(relative_key(root, t) for t in texts)
            continue
        if not texts:
            lonely_images.extend(relative_key(root, i) for i in images)
            continue
        captions = read_caption_file(texts[0], warnings)
        for image in images:
            if captions:
                pairs.append(Pair(image, tuple(captions), relative_key(root, image)))
            else:
                problems.append(Problem(str(texts[0]), "empty caption file (no non-blank line)"))
    warnings.extend(duplicate_name_warnings(root, [p.image for p in pairs]))
    return PairSet(root, "sidecar", pairs, problems, warnings, lonely_images, lonely_captions)


def duplicate_name_warnings(root: Path, images: list[Path]) -> list[Problem]:
    folders_by_name: dict[str, list[str]] = defaultdict(list)
    for image in images:
        folders_by_name[image.name].append(relative_key(root, image.parent) or ".")
    return [
        Problem(name, f"same file name in {len(folders)} folders ({', '.join(folders[:3])}); "
                      "pairs are keyed by relative path, so both are kept")
        for name, folders in sorted(folders_by_name.items()) if len(folders) > 1
    ]


def resolve_inside(root: Path, name: str) -> tuple[Path | None, str | None]:
    """Resolve a manifest path against root; refuse anything that escapes it."""
    candidate = (root / name).resolve()
    if not candidate.is_relative_to(root.resolve()):
        return None, f"path escapes the data folder: {name}"
    if not candidate.is_file():
        return None, f"missing file: {name}"
    return candidate, None


def collect_rows(root: Path, rows: list[tuple[str, object]], manifest: str) -> PairSet:
    """Turn (file name, caption or list of captions) rows into pairs; rows for one image merge."""
    problems: list[Problem] = []
    captions_by_file: dict[str, list[str]] = defaultdict(list)
    for line_no, (name, text) in enumerate(rows, start=2 if manifest.endswith("csv") else 1):
        where = f"{manifest}:{line_no}"
        texts = [text] if isinstance(text, str) else list(text or [])
        texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
        if not name:
            problems.append(Problem(where, "row has no file name"))
        elif not texts:
            problems.append(Problem(f"{where} ({name})", "empty caption"))
        else:
            captions_by_file[name].extend(texts)
    pairs = []
    for name, captions in captions_by_file.items():
        path, reason = resolve_inside(root, name)
        if reason:
            problems.append(Problem(f"{manifest} ({name})", reason))
        else:
            pairs.append(Pair(path, tuple(captions), relative_key(root.resolve(), path)))
    pairs.sort(key=lambda p: p.key)
    warnings = duplicate_name_warnings(root.resolve(), [p.image for p in pairs])
    return PairSet(root, "", pairs, problems, warnings)


def jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a DataError naming file:line."""
    objects = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: each line must be a JSON object")
        objects.append((line_no, record))
    return objects


def read_jsonl_rows(path: Path, file_key: str, text_key: str) -> list[tuple[str, object]]:
    return [(str(record.get(file_key, "") or ""), record.get(text_key)) for _, record in jsonl_objects(path)]


def read_csv_rows(path: Path, file_key: str, text_key: str) -> list[tuple[str, object]]:
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=",\t;|")
    except csv.Error:
        dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    missing = [k for k in (file_key, text_key) if k not in (reader.fieldnames or [])]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; columns are {reader.fieldnames} "
            "(set --csv-img-key / --csv-caption-key)"
        )
    return [(row.get(file_key) or "", row.get(text_key) or "") for row in reader]


def read_hf(root: Path) -> PairSet:
    for manifest in HF_MANIFESTS:
        path = root / manifest
        if path.is_file():
            reader = read_jsonl_rows if manifest.endswith(".jsonl") else read_csv_rows
            pairset = collect_rows(root, reader(path, "file_name", "text"), manifest)
            pairset.layout = "hf"
            return pairset
    raise DataError(f"{root}: no {' or '.join(HF_MANIFESTS)} found")


def find_csv(root: Path) -> Path | None:
    tables = sorted(p for p in root.iterdir() if p.suffix.lower() in (".csv", ".tsv") and p.is_file())
    tables = [p for p in tables if p.name not in HF_MANIFESTS]
    if len(tables) > 1:
        raise UsageError(f"{root}: several CSV/TSV files ({', '.join(p.name for p in tables)}); pass one file as PAIRS")
    return tables[0] if tables else None


def read_csv_layout(root: Path, img_key: str, caption_key: str) -> PairSet:
    table = root if root.is_file() else find_csv(root)
    if table is None:
        raise DataError(f"{root}: no CSV/TSV file found")
    pairset = collect_rows(table.parent, read_csv_rows(table, img_key, caption_key), table.name)
    pairset.layout = "csv"
    return pairset


def detect_layout(root: Path) -> str:
    from clipfit.data.tables import is_save_to_disk, parquet_files

    if root.is_file():
        return "parquet" if root.suffix.lower() == ".parquet" else "csv"
    if any((root / m).is_file() for m in HF_MANIFESTS):
        return "hf"
    if is_save_to_disk(root):
        return "datasets"
    if find_csv(root) is not None:
        return "csv"
    if parquet_files(root):
        return "parquet"
    return "sidecar"


def load_pairs(
    path: str | Path,
    layout: str = "auto",
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    image_column: str | None = None,
    caption_column: str | None = None,
) -> PairSet:
    """Read PAIRS in `layout` (auto-detected by default). Raises DataError when nothing usable is found."""
    from clipfit.data.tables import HUB_DATASET_PREFIX, read_datasets, read_parquet

    if str(path).startswith(HUB_DATASET_PREFIX) and layout in ("auto", "datasets"):
        return with_pairs(Path(str(path)), read_datasets(str(path), image_column, caption_column))
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if layout not in ("auto", *LAYOUTS):
        raise UsageError(f"--layout {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    if root.is_file() and layout not in ("csv", "parquet"):
        raise DataError(f"{root}: is a file; only the csv and parquet layouts read a single file")
    if layout == "sidecar":
        pairset = read_sidecars(root)
    elif layout == "hf":
        pairset = read_hf(root)
    elif layout == "parquet":
        pairset = read_parquet(root, image_column, caption_column)
    elif layout == "datasets":
        pairset = read_datasets(str(root), image_column, caption_column)
    else:
        pairset = read_csv_layout(root, csv_img_key, csv_caption_key)
    return with_pairs(root, pairset)


def with_pairs(root: Path, pairset: PairSet) -> PairSet:
    if not pairset.pairs:
        raise DataError(no_pairs_message(root, pairset))
    return pairset


def no_pairs_message(root: Path, pairset: PairSet) -> str:
    if pairset.images_without_captions and not pairset.captions_without_images:
        detail = f"found {len(pairset.images_without_captions)} image(s) but no captions"
    elif pairset.problems:
        detail = f"{len(pairset.problems)} unusable item(s), first: {pairset.problems[0].path}: {pairset.problems[0].reason}"
    else:
        detail = "folder holds no images"
    return (f"{root}: no image-caption pairs ({detail}); tried layout {pairset.layout} "
            f"(layouts: sidecar image+.txt, hf metadata.jsonl/csv, csv with --csv-img-key/--csv-caption-key, "
            f"parquet and datasets with --image-column/--caption-column)")
