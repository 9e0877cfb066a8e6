"""The classes layout (a folder per class): reading, auto-detection, class names and templates,
`clipfit data check`'s account of the classes, and the stratified validation split."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from clipfit.data.classes import default_templates
from clipfit.data.dataset import PairDataset
from clipfit.data.layouts import load_pairs
from clipfit.data.training import split_val
from clipfit.errors import DataError, UsageError
from clipfit.eval.sets import load_labelled
from conftest import run_cli


def image(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def class_folder(root, counts: dict[str, int]):
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image(root / name / f"{i}.png", (i * 20 % 255, len(name) * 30 % 255, 99))
    return root


def test_a_folder_per_class_is_detected_and_each_image_labelled_with_its_folder(tmp_path):
    class_folder(tmp_path, {"red_apple": 2, "banana": 1})
    image(tmp_path / "banana" / "ripe" / "deep" / "x.jpg")  # any depth below the class folder
    image(tmp_path / ".hidden" / "y.png")  # not a class
    image(tmp_path / "loose.png")  # in no class
    pairs = load_pairs(tmp_path)
    assert pairs.layout == "classes"
    assert pairs.classes.names == ("banana", "red apple") and pairs.classes.folders == ("banana", "red_apple")
    assert [(p.key, p.label) for p in pairs.pairs] == [
        ("banana/0.png", 0), ("banana/ripe/deep/x.jpg", 0), ("red_apple/0.png", 1), ("red_apple/1.png", 1)]
    templates = default_templates()
    assert pairs.pairs[2].captions == tuple(t.replace("{c}", "red apple") for t in templates)
    assert pairs.pairs[2].captions is pairs.pairs[3].captions  # one tuple per class, not per image
    assert [w.path for w in pairs.warnings] == ["loose.png"] and "no class" in pairs.warnings[0].reason


def test_auto_detection_needs_two_class_folders_with_images_and_no_captions(tmp_path):
    class_folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match="3 image"):  # one class folder: still an uncaptioned sidecar folder
        load_pairs(tmp_path / "one")
    assert load_pairs(tmp_path / "one", "classes").classes.names == ("only",)  # forced
    captioned = class_folder(tmp_path / "captioned", {"a": 1, "b": 1})
    (captioned / "a" / "0.txt").write_text("a caption of its own\n")
    assert load_pairs(captioned).layout == "sidecar"
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="none of its 1 class sub-folder"):
        load_pairs(tmp_path / "empty", "classes")


def test_classnames_and_templates_files_and_the_folders_own_templates(tmp_path):
    root = class_folder(tmp_path / "set", {"b_dir": 1, "a_dir": 1})
    (tmp_path / "names.txt").write_text("first\nsecond\n")
    (tmp_path / "t.txt").write_text("a {c}\nthe {c}, drawn\n")
    pairs = load_pairs(root, classnames=str(tmp_path / "names.txt"), templates=str(tmp_path / "t.txt"))
    assert pairs.classes.names == ("first", "second")  # sorted folder order: a_dir, b_dir
    assert [p.captions for p in pairs.pairs] == [("a first", "the first, drawn"), ("a second", "the second, drawn")]
    (root / "templates.txt").write_text("art of {c}\n")  # the folder's own, as `eval zeroshot folder` reads it
    assert load_pairs(root).pairs[0].captions == ("art of a dir",)
    assert load_labelled("folder", root).templates == ["art of {c}"]
    assert load_labelled("folder", root).classes == ["a dir", "b dir"]  # the same names as training reads
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    with pytest.raises(UsageError, match="3 names but .* 2 class folders"):
        load_pairs(root, classnames=str(tmp_path / "three.txt"))
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(UsageError, match="no {c}"):
        load_pairs(root, templates=str(tmp_path / "bad.txt"))


def test_class_files_for_a_captioned_folder_are_refused_not_ignored(tmp_path):
    image(tmp_path / "pairs" / "x.png")
    (tmp_path / "pairs" / "x.txt").write_text("a caption\n")
    (tmp_path / "t.txt").write_text("a {c}\n")
    result = run_cli("data", "check", tmp_path / "pairs", "--templates", tmp_path / "t.txt")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"clipfit: error: --classnames and --templates name and prompt the classes of a labelled folder; "
        f"{tmp_path / 'pairs'} was read as the sidecar layout, whose captions are its own"]


def test_each_epoch_draws_one_template_per_image_by_seed_alone(tmp_path):
    pairs = load_pairs(class_folder(tmp_path, {"a": 3, "b": 3})).pairs
    def captions(seed: int, epoch: int) -> list[int]:
        dataset = PairDataset(pairs, lambda x: x, lambda texts: texts, seed, 10**8)
        dataset.with_images = False
        return [dataset[epoch, i]["caption"] for i in range(len(pairs))]

    assert captions(0, 0) == captions(0, 0)  # a resumed run draws the same
    assert captions(0, 0) != captions(0, 1) and captions(0, 0) != captions(1, 0)
    assert len({c for epoch in range(5) for c in captions(0, epoch)}) > 5  # many of the 80 templates are used


def test_data_check_lists_classes_empty_ones_and_an_imbalance(tmp_path):
    root = class_folder(tmp_path / "set", {"cat": 8, "dog": 2, "emu": 0})
    report = json.loads(run_cli("data", "check", root, "--json", check=True).stdout)
    assert report["layout"] == "classes"
    assert report["classes"] == [{"name": "cat", "folder": "cat", "images": 8},
                                 {"name": "dog", "folder": "dog", "images": 2},
                                 {"name": "emu", "folder": "emu", "images": 0}]
    assert report["summary"]["classes"] == 3 and report["summary"]["empty_classes"] == 1
    reasons = [w["reason"] for w in report["warnings"]]
    assert any(r.startswith("empty class") for r in reasons)
    assert any("largest/smallest 4.0 > 3" in r for r in reasons)
    class_folder(tmp_path / "even", {"cat": 3, "dog": 1})  # 3.0 is not above 3
    assert json.loads(run_cli("data", "check", tmp_path / "even", "--json", check=True).stdout)["warnings"] == []
    shown = run_cli("data", "check", root, check=True).stdout
    assert re.search(r"│ emu\s+│ emu\s+│\s+0 │", shown) and "imbalance" in shown


def test_the_validation_split_of_a_labelled_folder_is_stratified(tmp_path):
    pairs = load_pairs(class_folder(tmp_path, {"a": 10, "b": 5, "c": 1})).pairs
    train, val = split_val(pairs, 0.2, seed=0)
    assert sorted(p.label for p in val) == [0, 0, 1]  # 20% of each class; a lone image stays in training
    assert {p.key for p in train} | {p.key for p in val} == {p.key for p in pairs}
    assert split_val(pairs, 0.2, seed=0) == (train, val) and split_val(pairs, 0.2, seed=1)[1] != val
