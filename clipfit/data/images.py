"""Decode one image the same way everywhere: first frame, EXIF-rotated, 8-bit RGB."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default decompression-bomb limit

# clipfit applies its own, configurable limit before decoding (see check_size), so
# Pillow's global check must not fire first with a different number.
Image.MAX_IMAGE_PIXELS = None


class BadImage(Exception):
    """The file cannot be used as a training image; str(e) is the reason."""


def stored_in(image) -> Path:
    """The file holding an image's bytes: the image file itself, or the table file of an image in
    a table row (clipfit.data.tables.TableImage, whose str() names the row)."""
    return Path(getattr(image, "file", image))


def file_stamp(image) -> tuple[int, int]:
    """(size, modification time in ns) of the file holding `image`: what tells it changed, short of reading it."""
    stat = stored_in(image).stat()
    return stat.st_size, stat.st_mtime_ns


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise BadImage(
            f"{width}x{height} pixels exceeds the decompression-bomb limit of {max_pixels} "
            "(raise it with --max-image-pixels)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's convert('L') clips 16-bit values at 255, which turns most photos white.
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def open_rgb(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode `source` (a path, an image file's bytes, e.g. a tar shard member, or an image
    in a table row, clipfit.data.tables.TableImage) to RGB, or raise BadImage with a reason a
    person can act on."""
    if not isinstance(source, (str, Path, bytes)):
        source = source.read_bytes()  # an OSError here is the caller's "cannot read"
    in_memory = isinstance(source, bytes)
    try:
        if (len(source) if in_memory else Path(source).stat().st_size) == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(source) if in_memory else Path(source)) as image:
                check_size(image, max_pixels)
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except OSError as e:
        if e.errno is not None:  # the file system's error (gone, no permission), not the decoder's
            raise BadImage(f"cannot read: {e.strerror or e}") from None
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower():
            raise BadImage(f"truncated image ({reason})") from None
        raise BadImage(f"cannot decode: {reason}") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot decode: {e}") from None
