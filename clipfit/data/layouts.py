"""Find image-caption pairs in a folder, in any of the supported layouts.

Layouts:
  sidecar  `cat.jpg` + `cat.txt` side by side (recursive); one caption per line.
  hf       `metadata.jsonl` / `metadata.csv` with `file_name` and `text` (Hugging Face imagefolder).
  csv      an open_clip-style CSV/TSV with image-path and caption columns; separator sniffed.
  parquet  Parquet files with an image and a caption column (clipfit.data.tables).
  datasets a Hugging Face `datasets` save_to_disk folder, or hf://datasets/ORG/NAME (clipfit.data.tables).
  classes  an ImageFolder, one sub-folder per class, images at any depth below it; captions are
           prompt templates filled with the class name (clipfit.data.classes). Auto-detected when
           no image has a caption and at least two sub-folders hold images.
Problems (missing files, empty captions, escaping paths...) are collected, never raised,
so `clipfit data check` can list them all; the caller decides whether they are fatal.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from clipfit.data.classes import class_folders, class_names, fill, folder_templates
from clipfit.data.images import is_image_path
from clipfit.data.text import caption_lines, has_undecodable, lines, read_text, repaired, undecodable_reason
from clipfit.data.pairs import ClassSet, Pair, PairSet, Problem, resolve_inside
from clipfit.data.tables import HUB_DATASET_PREFIX, is_save_to_disk, parquet_files, read_datasets, read_parquet
from clipfit.errors import DataError, UsageError

LAYOUTS = ("sidecar", "hf", "csv", "parquet", "datasets", "classes")
HF_MANIFESTS = ("metadata.jsonl", "metadata.csv")


def read_caption_file(path: Path, warnings: list[Problem]) -> list[str]:
    """One caption per line (split on \\n and \\r\\n only); OSError when the file cannot be read."""
    text, encoding = read_text(path)
    if has_undecodable(text):
        warnings.append(Problem(str(path), f"caption is {undecodable_reason(text, encoding)}; "
                                           "undecodable bytes replaced"))
        text = repaired(text)
    return caption_lines(text)


SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                 (stat.S_ISBLK, "a device"))


def entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file', or why the entry cannot be used (reading a pipe or device could block forever)."""
    try:
        if entry.is_dir():  # follows symlinks, hence the loop guard in walk_files
            return "dir"
        if entry.is_file():
            return "file"
        mode = os.stat(entry.path).st_mode
    except OSError as e:
        return os_reason(e)
    kind = next((name for test, name in SPECIAL_FILES if test(mode)), "not a regular file")
    return f"not a regular file ({kind}), skipped"


def os_reason(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links), skipped"
    if error.errno == errno.ENOENT:
        return "broken symlink"
    return f"cannot read: {error.strerror or error}"


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
            kind = entry_kind(entry)
            if kind == "dir":
                visit(Path(entry.path))
            elif kind == "file":
                files.append(Path(entry.path))
            else:
                problems.append(Problem(entry.path, kind))

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
        try:
            captions = read_caption_file(texts[0], warnings)
        except OSError as e:
            problems.append(Problem(str(texts[0]), f"cannot read caption file: {e.strerror or e}"))
            continue
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


# A manifest row: (where, e.g. "metadata.jsonl:7", file name, caption or list of captions)
Row = tuple[str, str, object]


def collect_rows(root: Path, rows: list[Row], problems: list[Problem]) -> PairSet:
    """Turn manifest rows into pairs; rows for one image merge (a file that cannot be used is
    named at its first row). `problems` holds the rows the reader could not parse; they are bad
    items like the rest."""
    problems = list(problems)
    captions_by_file: dict[str, list[str]] = defaultdict(list)
    first_row: dict[str, str] = {}
    for where, name, text in rows:
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, list) else []
        texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
        if not name:
            problems.append(Problem(where, "row has no file name"))
        elif not texts:
            problems.append(Problem(f"{where} ({name})", "empty caption"))
        else:
            captions_by_file[name].extend(texts)
            first_row.setdefault(name, where)
    pairs = []
    for name, captions in captions_by_file.items():
        path, reason = resolve_inside(root, name)
        if reason:
            problems.append(Problem(f"{first_row[name]} ({name})", reason))
        else:
            pairs.append(Pair(path, tuple(captions), relative_key(root.resolve(), path)))
    pairs.sort(key=lambda p: p.key)
    warnings = duplicate_name_warnings(root.resolve(), [p.image for p in pairs])
    return PairSet(root, "", pairs, problems, warnings)


def read_manifest(path: Path) -> tuple[str, str]:
    try:
        return read_text(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object, None) for each good non-blank line, (line number, None, reason) for a bad one."""
    text, encoding = read_manifest(path)
    for line_no, line in enumerate(lines(text), start=1):
        if not line.strip():
            continue
        if has_undecodable(line):
            yield line_no, None, undecodable_reason(line, encoding)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, None, f"not valid JSON ({e.msg}, column {e.colno})"
            continue
        if isinstance(record, dict):
            yield line_no, record, None
        else:
            yield line_no, None, "each line must be a JSON object ({...})"


def jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a DataError naming file:line."""
    objects = []
    for line_no, record, reason in jsonl_records(path):
        if reason:
            raise DataError(f"{path}:{line_no}: {reason}")
        objects.append((line_no, record))
    return objects


def read_jsonl_rows(path: Path, file_key: str, text_key: str) -> tuple[list[Row], list[Problem]]:
    rows, problems = [], []
    for line_no, record, reason in jsonl_records(path):
        where = f"{path.name}:{line_no}"
        reason = reason or caption_type_problem(record.get(text_key), text_key)
        if reason:
            problems.append(Problem(where, reason))
        else:
            rows.append((where, str(record.get(file_key) or ""), record.get(text_key)))
    return rows, problems


JSON_KINDS = ((bool, "true/false"), ((int, float), "a number"), (dict, "an object"), (list, "a list"))


def caption_type_problem(value: object, key: str) -> str | None:
    """Why a JSON caption is not text (a string, or a list of strings); None when it is (or is
    missing: an empty caption)."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, list):
        odd = next((v for v in value if not isinstance(v, str)), None)
        return None if odd is None else f"{key} is a list that holds {json_kind(odd)}, not only strings"
    return f"{key} is {json_kind(value)}, not a string"


def json_kind(value: object) -> str:
    return "null" if value is None else next(name for kinds, name in JSON_KINDS if isinstance(value, kinds))


CSV_DELIMITERS = ",\t;|"


def csv_format(text: str, path: Path, wanted: tuple[str, ...]) -> dict:
    """csv.reader arguments: the separator under which the header names the wanted columns,
    else whatever the sniffer finds."""
    header = lines(text)[0]
    for delimiter in CSV_DELIMITERS:
        if all(key in next(csv.reader([header], delimiter=delimiter), []) for key in wanted):
            return {"delimiter": delimiter}
    try:
        return {"dialect": csv.Sniffer().sniff(text[:8192], delimiters=CSV_DELIMITERS)}
    except csv.Error:
        return {"dialect": csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel}


def read_csv_rows(path: Path, file_key: str, text_key: str,
                  advice: str = "set --csv-img-key / --csv-caption-key") -> tuple[list[Row], list[Problem]]:
    """Rows as the csv module reads records: a quoted field may span lines, and U+2028, NEL or a
    form feed are characters of a caption. Line numbers are where each record starts."""
    text, encoding = read_manifest(path)
    reader = csv.reader(io.StringIO(text, newline=""), **csv_format(text, path, (file_key, text_key)))
    header = next(reader, [])
    missing = [k for k in (file_key, text_key) if k not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; columns are {header} ({advice})")
    rows, problems, end = [], [], reader.line_num
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            reason = record_problem(record, len(header), encoding)
            if reason:
                problems.append(Problem(f"{path.name}:{start}", reason))
            elif record:  # not a blank line
                values = dict(zip(header, record))
                rows.append((f"{path.name}:{start}", values.get(file_key) or "", values.get(text_key) or ""))
    except csv.Error as e:  # the reader cannot find the next record after this
        problems.append(Problem(f"{path.name}:{end + 1}", f"not a CSV record ({e}); the rest of the file is not read"))
    return rows, problems


def record_problem(record: list[str], columns: int, encoding: str) -> str | None:
    joined = "".join(record)
    if has_undecodable(joined):
        return undecodable_reason(joined, encoding)
    if len(record) > columns:  # an unquoted separator inside a caption would cut it silently
        return f"{len(record)} fields but the header has {columns} (quote fields that contain the separator)"
    return None


HF_CSV_ADVICE = ("a Hugging Face metadata.csv names them file_name and text: rename the columns, or read it "
                 "as a plain table with --layout csv --csv-img-key COLUMN --csv-caption-key COLUMN")


def read_hf(root: Path) -> PairSet:
    for manifest in HF_MANIFESTS:
        path = root / manifest
        if path.is_file():
            if manifest.endswith(".jsonl"):
                rows, problems = read_jsonl_rows(path, "file_name", "text")
            else:
                rows, problems = read_csv_rows(path, "file_name", "text", HF_CSV_ADVICE)
            pairset = collect_rows(root, rows, problems)
            pairset.layout = "hf"
            return pairset
    raise DataError(f"{root}: no {' or '.join(HF_MANIFESTS)} found")


def find_csv(root: Path) -> Path | None:
    tables = sorted(p for p in root.iterdir() if p.suffix.lower() in (".csv", ".tsv") and p.is_file())
    if len(tables) > 1:
        tables = [p for p in tables if p.name not in HF_MANIFESTS]
    if len(tables) > 1:
        raise UsageError(f"{root}: several CSV/TSV files ({', '.join(p.name for p in tables)}); pass one file as PAIRS")
    return tables[0] if tables else None


def read_csv_layout(root: Path, img_key: str, caption_key: str) -> PairSet:
    table = root if root.is_file() else find_csv(root)
    if table is None:
        raise DataError(f"{root}: no CSV/TSV file found")
    rows, problems = read_csv_rows(table, img_key, caption_key)
    pairset = collect_rows(table.parent, rows, problems)
    pairset.layout = "csv"
    return pairset


def detect_layout(root: Path) -> str:
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


def read_classes(root: Path, classnames_file: str | None = None, templates_file: str | None = None) -> PairSet:
    """ROOT/<class>/.../<image>: each image labelled with its class folder's index, its captions
    the templates filled with the class name (one shared tuple per class). Images directly in
    ROOT belong to no class: they are listed as warnings, not trained on."""
    folders = class_folders(root)
    classes = ClassSet(tuple(class_names(root, folders, classnames_file)), tuple(folders),
                       tuple(folder_templates(root, templates_file)))
    problems: list[Problem] = []
    pairs = []
    for label, (folder, name) in enumerate(zip(classes.folders, classes.names)):
        captions = tuple(fill(template, name) for template in classes.templates)
        pairs += [Pair(path, captions, relative_key(root, path), label=label)
                  for path in walk_files(root / folder, problems) if is_image_path(path)]
    outside = [Problem(entry.name, "image outside the class folders: it has no class, not trained on")
               for entry in sorted(os.scandir(root), key=lambda e: e.name)
               if not entry.name.startswith(".") and entry.is_file() and is_image_path(Path(entry.name))]
    return PairSet(root, "classes", pairs, problems, outside, classes=classes)


def labelled_folder(pairset: PairSet) -> bool:
    """Whether at least two class folders hold images (what auto-detection asks of a classes layout)."""
    return len({pair.label for pair in pairset.pairs}) >= 2


def readable_root(root: Path) -> None:
    """PAIRS must be a folder that can be listed or a regular file; say which it is not."""
    try:
        mode = os.stat(root).st_mode
        if stat.S_ISDIR(mode):
            os.scandir(root).close()
        elif not stat.S_ISREG(mode):
            raise DataError(f"{root}: not a folder or a regular file")
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise DataError(f"{root}: no such file or folder") from None
        reason = os_reason(e).removesuffix(", skipped") if e.errno == errno.ELOOP else f"cannot read ({e.strerror or e})"
        raise DataError(f"{root}: {reason}") from None


def load_pairs(
    path: str | Path,
    layout: str = "auto",
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    image_column: str | None = None,
    caption_column: str | None = None,
    classnames: str | None = None,
    templates: str | None = None,
) -> PairSet:
    """Read PAIRS in `layout` (auto-detected by default). Raises DataError when nothing usable is found.
    `classnames` and `templates` (files) name and prompt the classes of a classes layout."""
    if str(path).startswith(HUB_DATASET_PREFIX) and layout in ("auto", "datasets"):
        return with_pairs(Path(str(path)), read_datasets(str(path), image_column, caption_column),
                          classnames or templates)
    root = Path(path)
    readable_root(root)
    if layout not in ("auto", *LAYOUTS):
        raise UsageError(f"--layout {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    detected = layout == "auto"
    if detected:
        layout = detect_layout(root)
    if root.is_file() and layout not in ("csv", "parquet"):
        raise DataError(f"{root}: is a file; only the csv and parquet layouts read a single file")
    if layout == "sidecar":
        pairset = read_sidecars(root)
        if detected and not pairset.pairs:  # no captions anywhere: a folder per class, perhaps
            labelled = read_classes(root, classnames, templates)
            pairset = labelled if labelled_folder(labelled) else pairset
    elif layout == "classes":
        pairset = read_classes(root, classnames, templates)
    elif layout == "hf":
        pairset = read_hf(root)
    elif layout == "parquet":
        pairset = read_parquet(root, image_column, caption_column)
    elif layout == "datasets":
        pairset = read_datasets(str(root), image_column, caption_column)
    else:
        pairset = read_csv_layout(root, csv_img_key, csv_caption_key)
    return with_pairs(root, pairset, classnames or templates)


def with_pairs(root: Path, pairset: PairSet, class_files: str | None = None) -> PairSet:
    """The pair set, unless it is empty or was given class-name or template files it has no use for."""
    if class_files and pairset.classes is None:
        raise UsageError(f"--classnames and --templates name and prompt the classes of a labelled folder; {root} "
                         f"was read as the {pairset.layout} layout, whose captions are its own")
    if not pairset.pairs:
        raise DataError(no_pairs_message(root, pairset))
    return pairset


def no_pairs_message(root: Path, pairset: PairSet) -> str:
    if pairset.classes is not None:
        detail = f"none of its {len(pairset.classes.folders)} class sub-folder(s) holds an image"
    elif pairset.images_without_captions and not pairset.captions_without_images:
        detail = f"found {len(pairset.images_without_captions)} image(s) but no captions"
    elif pairset.problems:
        detail = f"{len(pairset.problems)} unusable item(s), first: {pairset.problems[0].path}: {pairset.problems[0].reason}"
    else:
        detail = "folder holds no images"
    return (f"{root}: no image-caption pairs ({detail}); tried layout {pairset.layout} "
            f"(layouts: sidecar image+.txt, hf metadata.jsonl/csv, csv with --csv-img-key/--csv-caption-key, "
            f"parquet and datasets with --image-column/--caption-column, classes: one sub-folder of images per class)")
