"""Helpers shared by the dataset builders: the hold-out split and writing pairs folders.

The split hashes each item's stable key with the seed instead of shuffling a list, so an item
stays on its side when the source package gains or loses files, and reruns agree exactly.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from PIL import Image

ALIGN, HELDOUT = "align", "heldout"
DEFAULT_SEED = 0
DEFAULT_HELDOUT_FRACTION = 0.2
MAX_SIDE = 256  # the towers see 224 px; larger files would only cost disk and decode time


def split_of(key: str, seed: int = DEFAULT_SEED, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return HELDOUT if position < heldout_fraction else ALIGN


def flatten_to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Clip art and emoji are drawn on transparency; paste them on white as a viewer shows them."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def shrink(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def write_pair(folder: Path, name: str, image: Image.Image, captions: list[str]) -> None:
    """Sidecar layout: NAME.png with NAME.txt beside it, one caption per line."""
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{name}.png", optimize=True)
    (folder / f"{name}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")


def fresh_output(out: Path, force: bool) -> Path:
    """Refuse to mix a new build into an old one unless asked to replace it."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SystemExit(f"{out} is not empty; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def report(out: Path, counts: dict[str, int]) -> None:
    summary = ", ".join(f"{count} {split}" for split, count in counts.items())
    print(f"wrote {out}: {summary}")
