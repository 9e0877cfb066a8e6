"""Sets in CLIP_benchmark's WebDataset layout, made from the 40 pictures of examples/pairs, for
benchmarks/wds_crosscheck.py and benchmarks/wds_eval_speed.py. Written with
clipfit.eval.wds.write_wds (webdataset's ShardWriter, CLIP_benchmark's convert_dataset layout).

Each picture gives several images: the picture itself and seeded variants (a mirror image, a
random crop, a colour change, a rescale), encoded as PNG, JPEG or lossless WebP in turn, so the
decoders of all three formats are exercised.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs"
FORMATS = ("png", "jpg", "webp")
# the classification set's own templates (not ImageNet's 80): its zeroshot_classification_templates.txt
OWN_TEMPLATES = ["a photo of a {c}.", "a close-up photo of the {c}.", "a cartoon {c}.", "art of the {c}.",
                 "a low resolution photo of a {c}."]
COARSE = ["animal", "food", "vehicle", "building", "tool", "plant"]  # the multi-label set's classes


def pictures() -> list[tuple[str, Image.Image, list[str]]]:
    """(name, picture, captions) of examples/pairs, in name order."""
    found = []
    for path in sorted(PAIRS.glob("*.png")):
        with Image.open(path) as image:
            found.append((path.stem, image.convert("RGB"), path.with_suffix(".txt").read_text().split("\n")[0:1]))
    return found


def variant(image: Image.Image, k: int, rng: random.Random, size: int | None) -> Image.Image:
    """The k-th seeded variant of a picture (k = 0: the picture), `size` pixels on its longer side."""
    if k % 4 == 1:
        image = ImageOps.mirror(image)
    elif k % 4 == 2:
        w, h = image.size
        left, top = rng.randrange(w // 4), rng.randrange(h // 4)
        image = image.crop((left, top, left + 3 * w // 4, top + 3 * h // 4))
    elif k % 4 == 3:
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.3, 1.7))
    if size:
        scale = size / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return image


def encoded(image: Image.Image, extension: str) -> bytes:
    buffer = io.BytesIO()
    options = {"png": {"format": "png"}, "jpg": {"format": "jpeg", "quality": 90},
               "webp": {"format": "webp", "lossless": True}}[extension]
    image.save(buffer, **options)
    return buffer.getvalue()


def classification_samples(count: int, size: int | None, formats: tuple[str, ...] = FORMATS, seed: int = 0):
    """`count` images, cycling through the pictures and their variants; label = the picture."""
    rng, items = random.Random(seed), pictures()
    for i in range(count):
        name, image, _ = items[i % len(items)]
        extension = formats[i % len(formats)]
        yield encoded(variant(image, i // len(items), rng, size), extension), extension, i % len(items)


def class_names() -> list[str]:
    return [name.replace("_", " ") for name, _, _ in pictures()]


def write_classification(root: Path, count: int, per_shard: int, size: int | None = None,
                         formats: tuple[str, ...] = FORMATS) -> Path:
    from clipfit.eval.wds import write_wds

    write_wds(root, classification_samples(count, size, formats), "classification", class_names(), OWN_TEMPLATES,
              per_shard=per_shard)
    return root


def write_multilabel(root: Path, per_shard: int) -> Path:
    """Every picture with 1-3 of the coarse classes (seeded; the labels need not be true, only the
    same for both evaluators)."""
    from clipfit.eval.wds import write_wds

    rng = random.Random(1)
    samples = []
    for i, (_, image, _) in enumerate(pictures()):
        labels = np.zeros(len(COARSE), dtype=np.int64)
        labels[rng.sample(range(len(COARSE)), 1 + i % 3)] = 1
        samples.append((encoded(image, FORMATS[i % 3]), FORMATS[i % 3], labels))
    write_wds(root, samples, "multilabel", COARSE, OWN_TEMPLATES[:2], per_shard=per_shard)
    return root


def write_retrieval(root: Path, per_shard: int) -> Path:
    """Every picture with one, two or three captions: its own, then descriptions of its name."""
    from clipfit.eval.wds import write_wds

    samples = []
    for i, (name, image, captions) in enumerate(pictures()):
        words = name.replace("_", " ")
        more = [f"a photo of a {words}", f"a picture showing the {words} up close"][: i % 3]
        samples.append((encoded(image, FORMATS[i % 3]), FORMATS[i % 3], captions + more))
    write_wds(root, samples, "retrieval", per_shard=per_shard)
    return root
