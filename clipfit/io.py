"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one line and flush it to disk, so a crash loses at most the line being written."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
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


def truncate_jsonl(path: str | os.PathLike, keep: "callable") -> None:
    """Rewrite a JSONL file atomically keeping only rows for which keep(row) is true."""
    rows = [r for r in read_jsonl(path) if keep(r)]
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
