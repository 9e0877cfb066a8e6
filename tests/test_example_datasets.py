"""The dataset builders' pure parts, and the shipped examples/pairs folder."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("PIL")

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "examples" / "pairs"
CLASSES = ROOT / "examples" / "classes"
sys.path.insert(0, str(ROOT / "examples" / "datasets"))

import common  # noqa: E402
import fashion_mnist  # noqa: E402
import fashion_mnist_classes  # noqa: E402
import openclipart  # noqa: E402


def test_split_is_seeded_stable_and_near_the_asked_fraction():
    keys = [f"item-{i}" for i in range(4000)]
    first = [common.split_of(k, seed=0) for k in keys]
    assert first == [common.split_of(k, seed=0) for k in keys]
    assert first != [common.split_of(k, seed=1) for k in keys]
    held_out = first.count(common.HELDOUT) / len(keys)
    assert abs(held_out - common.DEFAULT_HELDOUT_FRACTION) < 0.03


def test_openclipart_captions_drop_copy_numbers_and_recurring_authors():
    # The author's name, cut to fit 24 characters, ends many titles.
    stems = ["ladybug_01", "farfalla_contorno_archit_01"] + [
        f"{title}_architetto_{cut}_01"
        for title, cut in [("cigno", "frances"), ("pollo", "frances"), ("gabbiano", "frances"),
                           ("cavallo", "franc"), ("canguro", "franc"), ("coniglio", "franc")]
    ]
    tails = openclipart.author_tails(stems)
    first_words = openclipart.author_first_words(tails)
    caption = openclipart.caption_of(Path("animals/bugs/ladybug_01.png"), tails, first_words)
    assert caption == "clip art of a ladybug, animals / bugs"
    assert openclipart.title_of("cavallo_architetto_franc_01", tails, first_words) == "cavallo"
    # A first name cut short by the 24-character limit is recognised too.
    assert openclipart.title_of("farfalla_contorno_archit_01", tails, first_words) == "farfalla contorno"


def test_example_pairs_are_a_small_captioned_sidecar_folder():
    images = sorted(PAIRS.glob("*.png"))
    assert 30 <= len(images) <= 40
    for image in images:
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert len(caption.split()) >= 4, image.name
    assert sum(p.stat().st_size for p in PAIRS.iterdir()) < 3_000_000


def test_every_example_image_is_attributed_and_excluded_from_aligning():
    listed = re.findall(r"^\s+(\S+\.png)\s+<- openclipart-png:(\S+\.png)$", (PAIRS / "ATTRIBUTION").read_text(), re.M)
    assert sorted(name for name, _ in listed) == sorted(p.name for p in PAIRS.glob("*.png"))
    assert openclipart.example_sources() == {source for _, source in listed}


def test_example_classes_are_fashion_mnist_training_images_one_folder_per_class_all_attributed():
    from clipfit.data.layouts import load_pairs

    pairs = load_pairs(CLASSES)
    assert pairs.layout == "classes" and pairs.classes.names == tuple(sorted(fashion_mnist.CLASS_NAMES))
    assert [sum(p.label == c for p in pairs.pairs) for c in range(10)] == [20] * 10
    assert fashion_mnist_classes.folder_name("t-shirt or top") == "t-shirt_or_top"
    listed = re.findall(r"^\s+(\S+\.png)\s+<- dataset-fashion-mnist:train-images-idx3-ubyte\.gz image (\d+)$",
                        (CLASSES / "ATTRIBUTION").read_text(), re.M)
    assert sorted(name for name, _ in listed) == sorted(p.key for p in pairs.pairs)
    assert all(name.endswith(f"/{int(index):05d}.png") for name, index in listed)
    assert sum(p.stat().st_size for p in CLASSES.rglob("*") if p.is_file()) < 300_000
