import json

import pytest
from PIL import Image

from clipfit.data.layouts import load_pairs
from clipfit.errors import DataError


def image(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_sidecar_reads_one_caption_per_line_recursively(tmp_path):
    image(tmp_path / "a" / "cat.jpg")
    (tmp_path / "a" / "cat.txt").write_text("a cat\n\n  a small cat  \n")
    image(tmp_path / "dog.png")
    (tmp_path / "dog.txt").write_text("a dog")
    pairs = load_pairs(tmp_path)
    assert pairs.layout == "sidecar"
    assert {p.key: p.captions for p in pairs.pairs} == {"a/cat.jpg": ("a cat", "a small cat"), "dog.png": ("a dog",)}


def test_sidecar_lists_orphans_on_both_sides(tmp_path):
    image(tmp_path / "lonely.png")
    (tmp_path / "ghost.txt").write_text("no image")
    image(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    pairs = load_pairs(tmp_path)
    assert [p.key for p in pairs.pairs] == ["ok.png"]
    assert pairs.images_without_captions == ["lonely.png"]
    assert pairs.captions_without_images == ["ghost.txt"]


def test_hf_jsonl_merges_rows_of_one_image_and_accepts_caption_lists(tmp_path):
    image(tmp_path / "x.png")
    image(tmp_path / "y.png")
    rows = [{"file_name": "x.png", "text": "first"}, {"file_name": "x.png", "text": "second"},
            {"file_name": "y.png", "text": ["one", "two"]}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(tmp_path)
    assert pairs.layout == "hf"
    assert {p.key: p.captions for p in pairs.pairs} == {"x.png": ("first", "second"), "y.png": ("one", "two")}


def test_hf_csv_manifest(tmp_path):
    image(tmp_path / "x.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\nx.png,"a red, square thing"\n')
    pairs = load_pairs(tmp_path)
    assert pairs.pairs[0].captions == ("a red, square thing",)


@pytest.mark.parametrize("sep", [",", "\t", ";"])
def test_csv_separator_is_sniffed(tmp_path, sep):
    image(tmp_path / "img" / "x.png")
    (tmp_path / "train.csv").write_text(f"filepath{sep}title\nimg/x.png{sep}a picture\n")
    pairs = load_pairs(tmp_path)
    assert pairs.layout == "csv"
    assert pairs.pairs[0].key == "img/x.png" and pairs.pairs[0].captions == ("a picture",)


def test_csv_custom_keys_and_missing_column_message(tmp_path):
    image(tmp_path / "x.png")
    (tmp_path / "d.csv").write_text("path,caption\nx.png,hello\n")
    assert load_pairs(tmp_path, csv_img_key="path", csv_caption_key="caption").pairs[0].captions == ("hello",)
    with pytest.raises(DataError, match="missing column.*filepath.*--csv-img-key"):
        load_pairs(tmp_path)


def test_manifest_path_escaping_the_folder_is_refused(tmp_path):
    outside = image(tmp_path / "secret.png")
    data = tmp_path / "data"
    image(data / "ok.png")
    rows = [{"file_name": "ok.png", "text": "fine"}, {"file_name": "../secret.png", "text": "escape"},
            {"file_name": str(outside), "text": "absolute escape"}, {"file_name": "gone.png", "text": "missing"}]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(data)
    assert [p.key for p in pairs.pairs] == ["ok.png"]
    reasons = sorted(p.reason.split(":")[0] for p in pairs.problems)
    assert reasons == ["missing file", "path escapes the data folder", "path escapes the data folder"]


def test_forced_layout_wins_over_detection(tmp_path):
    image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("sidecar caption")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "manifest caption"}))
    assert load_pairs(tmp_path).pairs[0].captions == ("manifest caption",)
    assert load_pairs(tmp_path, layout="sidecar").pairs[0].captions == ("sidecar caption",)


def test_folder_without_pairs_names_the_layouts(tmp_path):
    image(tmp_path / "x.png")
    with pytest.raises(DataError, match="no image-caption pairs.*but no captions.*layouts"):
        load_pairs(tmp_path)
