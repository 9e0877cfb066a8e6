"""The dataset builders' pure parts, and the shipped examples/pairs folder."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("PIL")

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "examples" / "pairs"
CLASSES = ROOT / "examples" / "classes"
sys.path.insert(0, str(ROOT / "examples" / "datasets"))

import common  # noqa: E402
import emoji  # noqa: E402
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


def fake_emoji_package(root: Path, entries: list[tuple[str, str, str]]) -> Path:
    """emoji-datasource-google's layout: emoji.json and img/google/64/*.png; one entry per (name, category,
    subcategory)."""
    from PIL import Image

    images = root / "img" / "google" / "64"
    images.mkdir(parents=True)
    catalogue = []
    for i, (name, category, subcategory) in enumerate(entries):
        Image.new("RGBA", (8, 8), (10 * i, 0, 0, 255)).save(images / f"{i:04x}.png")
        catalogue.append({"name": name.upper(), "unified": f"{i:04X}", "short_name": name.replace(" ", "_"),
                          "image": f"{i:04x}.png", "category": category, "subcategory": subcategory,
                          "has_img_google": True})
    (root / "emoji.json").write_text(json.dumps(catalogue), encoding="utf-8")
    return root


def test_emoji_by_category_is_the_pairs_split_as_zero_shot_class_folders(tmp_path):
    from clipfit.eval.sets import load_labelled

    entries = ([(f"face {i}", "Smileys & Emotion", "face-smiling") for i in range(8)]
               + [(f"flag {i}", "Flags", "country-flag") for i in range(8)]
               + [("light skin tone", "Component", "skin-tone")])
    source = fake_emoji_package(tmp_path / "package", entries)
    emoji.build(tmp_path / "pairs", source, seed=0, heldout=0.5, force=False)
    emoji.build(tmp_path / "classes", source, seed=0, heldout=0.5, force=False, by="category")

    assert [p.read_text() for p in (tmp_path / "pairs").glob("*/face_0.txt")] == ["an emoji of face 0\n"]
    built = 0
    for split in (common.ALIGN, common.HELDOUT):
        folders = {d.name: sorted(p.stem for p in d.glob("*.png")) for d in (tmp_path / "classes" / split).iterdir()
                   if d.is_dir()}
        assert set(folders) == {"smileys_and_emotion", "flags"}  # no skin-tone swatches; "&" read as "and"
        # the same emoji on each side as the pairs build, each in its category's folder
        assert sorted(sum(folders.values(), [])) == sorted(p.stem for p in (tmp_path / "pairs" / split).glob("*.png"))
        assert all(name.startswith("face") for name in folders["smileys_and_emotion"])
        assert emoji.class_sizes(source, "category", 0, 0.5, split) == Counter({k: len(v) for k, v in folders.items()})
        assert (tmp_path / "classes" / split / "templates.txt").read_text() == "an emoji of {c}\n"
        built += sum(len(v) for v in folders.values())
    assert built == 16

    heldout = load_labelled("folder", tmp_path / "classes" / common.HELDOUT)
    assert heldout.classes == ["flags", "smileys and emotion"] and heldout.templates == ["an emoji of {c}"]
    assert emoji.class_sizes(source, "subcategory", 0, 0.5) == Counter(
        {"face-smiling": len(list((tmp_path / "classes" / "heldout" / "smileys_and_emotion").glob("*.png"))),
         "country-flag": len(list((tmp_path / "classes" / "heldout" / "flags").glob("*.png")))})
