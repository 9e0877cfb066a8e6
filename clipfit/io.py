"""Atomic file writes (a reader sees the old file or the new one, never half of either) and strict JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from clipfit.errors import OutputError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`.

    A failed write (disk full, permissions) leaves the old `path` untouched and raises
    OutputError, so it reaches the user as one line with exit status 7.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results should read like any new file
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        raise write_failed(path, e) from e
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_failed(path: Path, error: OSError) -> OutputError:
    return OutputError(f"{path}: could not write ({error.strerror or error}); the previous version, if any, is unchanged")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# --- JSON: strict, whatever the numbers ----------------------------------------------------------
# JSON has no NaN or Infinity (Python writes them, strict parsers reject the file). Every JSON
# clipfit writes goes through `dumps_json`: a non-finite number becomes null, and the document's
# top-level "notes" object maps the null's JSON Pointer (RFC 6901, e.g. "/metrics/uniformity_text")
# to why it has no value: the `reason` of a value that carries one (clipfit.eval.metrics.undefined),
# else "not a finite number (nan)".

NOTES = "notes"


def json_pointer(path: tuple) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def finite_json(obj: Any, notes: dict[str, str], path: tuple = ()) -> Any:
    """`obj` with every non-finite float replaced by None, its reason recorded in `notes`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        notes[json_pointer(path)] = getattr(obj, "reason", None) or f"not a finite number ({obj})"
        return None
    if isinstance(obj, dict):
        return {key: finite_json(value, notes, (*path, key)) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(value, notes, (*path, i)) for i, value in enumerate(obj)]
    return obj


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON (sorted keys) of `obj`; see above for what happens to NaN and infinity."""
    notes: dict[str, str] = {}
    clean = finite_json(obj, notes)
    if notes and isinstance(clean, dict):
        clean[NOTES] = {**(clean.get(NOTES) or {}), **notes}
    return json.dumps(clean, indent=indent, sort_keys=True, default=str, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, dumps_json(obj) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one line and flush it to disk, so a crash loses at most the line being written."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(dumps_json(record, indent=None) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_failed(Path(path), e) from e


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a crash: everything before it is good
    return rows


def truncate_jsonl(path: str | os.PathLike, rows: int) -> None:
    """Rewrite a JSONL file atomically keeping only its first `rows` rows."""
    kept = read_jsonl(path)[:rows]
    write_text(path, "".join(dumps_json(r, indent=None) + "\n" for r in kept))
