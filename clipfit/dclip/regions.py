"""Image regions for DCLIP's teacher: fixed crops, or boxes a user's detector produced.

The paper crops YOLO detections; clipfit bundles no detector. `grid` regions are the full
image, a g×g grid of cells and a centre crop (half the width and height). `boxes` regions are
the full image plus the boxes of a JSONL file, in pixel coordinates of the decoded,
EXIF-rotated image; an image the file does not mention gets the full image only.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from clipfit.data.layouts import jsonl_objects
from clipfit.errors import DataError, UsageError

Box = tuple[int, int, int, int]  # x0, y0, x1, y1: left/top inclusive, right/bottom exclusive


def grid_boxes(width: int, height: int, grid: int) -> list[Box]:
    """Full image, the g×g cells (row by row) and the centre crop; cells too small to hold a pixel are dropped."""
    xs = [round(k * width / grid) for k in range(grid + 1)]
    ys = [round(k * height / grid) for k in range(grid + 1)]
    cells = [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(grid) for c in range(grid)]
    centre = (round(width / 4), round(height / 4), round(3 * width / 4), round(3 * height / 4))
    return [b for b in [(0, 0, width, height), *cells, centre] if b[2] > b[0] and b[3] > b[1]]


@dataclass(frozen=True)
class UserBoxes:
    line: int  # where in the boxes file, for error messages
    boxes: tuple[tuple[float, float, float, float], ...]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_box(box, where: str) -> tuple[float, float, float, float]:
    if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)):
        raise DataError(f"{where}: expected [x0, y0, x1, y1] as four numbers, got {json.dumps(box)[:60]}")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where}: empty box {box} (needs x0 < x1 and y0 < y1)")
    return float(x0), float(y0), float(x1), float(y1)


def read_boxes_file(path: str | Path) -> dict[str, UserBoxes]:
    """file_name -> its boxes; any malformed line is a DataError naming file:line and the reason."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--dclip-boxes {path}: file not found")
    entries: dict[str, UserBoxes] = {}
    for line_no, record in jsonl_objects(path):
        where = f"{path}:{line_no}"
        name, boxes = record.get("file_name"), record.get("boxes")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: needs \"file_name\": the image path relative to the pairs folder")
        if not isinstance(boxes, list):
            raise DataError(f"{where}: needs \"boxes\": a list of [x0, y0, x1, y1]")
        if name in entries:
            raise DataError(f"{where}: {name} already has boxes on line {entries[name].line}")
        checked = tuple(check_box(box, f"{where}: box {k + 1}") for k, box in enumerate(boxes))
        entries[name] = UserBoxes(line_no, checked)
    return entries


def fit_boxes(entry: UserBoxes, width: int, height: int, where: str) -> list[Box]:
    """The user's boxes as whole pixels, after checking each lies inside the width × height image."""
    fitted = []
    for k, (x0, y0, x1, y1) in enumerate(entry.boxes):
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise DataError(f"{where}:{entry.line}: box {k + 1} {[x0, y0, x1, y1]} lies outside the "
                            f"{width}x{height} image")
        fitted.append((math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)))
    return fitted


class Regions:
    """Which boxes to crop from each image, as `--dclip-regions` and its options say."""

    def __init__(self, mode: str, grid: int = 2, boxes_file: str | None = None):
        self.mode, self.grid = mode, grid
        self.boxes_file = Path(boxes_file) if boxes_file else None
        self.entries = read_boxes_file(self.boxes_file) if mode == "boxes" else {}

    @classmethod
    def from_options(cls, options) -> "Regions":
        """From DCLIP's options (clipfit.methods.dclip_options.DCLIPOptions)."""
        return cls(options.dclip_regions, options.dclip_grid, options.dclip_boxes)

    def boxes(self, key: str, width: int, height: int) -> list[Box]:
        if self.mode == "grid":
            return grid_boxes(width, height, self.grid)
        entry = self.entries.get(key)
        user = fit_boxes(entry, width, height, str(self.boxes_file)) if entry else []
        return [(0, 0, width, height), *user]

    def unused_names(self, keys: list[str]) -> list[str]:
        """Boxes-file names that match no training pair (a typo or a different folder root)."""
        return sorted(set(self.entries) - set(keys))

    def identity(self) -> str:
        """What the crops depend on, for cache keys."""
        if self.mode == "grid":
            return f"grid:{self.grid}"
        return "boxes:" + hashlib.sha256(self.boxes_file.read_bytes()).hexdigest()[:16]
