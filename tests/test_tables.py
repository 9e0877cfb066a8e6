"""Pairs in tables: --layout parquet (HF image structs, raw bytes, relative paths; read by row group)
and Hugging Face datasets (save_to_disk folders; hf://datasets/ORG/NAME without network)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfit.io import read_jsonl
from conftest import COLOURS, REPO, cli_env, run_cli, tiny_refine_args
from hub_cache import closed_port

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def png_bytes(i: int, size: int = 32, noise: float = 30.0) -> bytes:
    rng = np.random.default_rng(i)
    base = np.array(Image.new("RGB", (1, 1), COLOURS[i % len(COLOURS)]).getpixel((0, 0)), dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def caption(i: int) -> str:
    return f"a {COLOURS[i % len(COLOURS)]} picture number {i}"


def write_parquet(path: Path, n: int, row_group_size: int = 4, bad: dict[int, str] | None = None,
                  empty: set[int] = frozenset(), image_column: str = "image", caption_column: str = "text",
                  as_struct: bool = True, size: int = 32, noise: float = 30.0) -> Path:
    """Hugging Face's image struct (or raw bytes); row i of `bad` holds those bytes instead of a PNG."""
    bad = bad or {}
    images = [bad[i].encode() if i in bad else png_bytes(i, size, noise) for i in range(n)]
    column = (pa.array([{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
              if as_struct else pa.array(images, pa.binary()))
    captions = pa.array(["  " if i in empty else caption(i) for i in range(n)])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({image_column: column, caption_column: captions}), path, row_group_size=row_group_size)
    return path


def check_json(*args: str) -> dict:
    result = run_cli("data", "check", *map(str, args), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_parquet_check_names_each_bad_row_and_refine_skips_them(tmp_path, tiny_config):
    table = write_parquet(tmp_path / "data" / "train.parquet", n=14, bad={3: "not an image"}, empty={6})
    report = check_json(tmp_path / "data")
    assert report["layout"] == "parquet"
    assert report["summary"]["usable_pairs"] == 12
    assert report["bad_images"] == [{"path": f"{table} row 3", "reason": "not an image Pillow can read"}]
    assert report["problems"] == [{"path": f"{table} row 6", "reason": "empty caption"}]

    out = tmp_path / "run"
    run_cli(*tiny_refine_args(table, out, tiny_config, "--epochs", "2", "--log-every", "1"), check=True)
    info = json.loads((out / "run.json").read_text())
    assert info["resolved"]["layout"] == "parquet" and info["resolved"]["train_pairs"] == 12
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert sorted(skipped) == [f"{table} row 3\tnot an image Pillow can read", f"{table} row 6\tempty caption"]
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_parquet_images_decode_to_the_bytes_that_were_written(tmp_path):
    from clipfit.data.images import open_rgb
    from clipfit.data.layouts import load_pairs

    table = write_parquet(tmp_path / "t.parquet", n=9, row_group_size=2, as_struct=False,
                          image_column="jpg", caption_column="caption")
    pairset = load_pairs(table)  # raw bytes and other names: auto-detected, one column of each kind
    assert [p.captions for p in pairset.pairs] == [(caption(i),) for i in range(9)]
    for i in (8, 0, 5):  # out of order: each row from its own row group
        expected = np.asarray(Image.open(io.BytesIO(png_bytes(i))).convert("RGB"))
        assert np.array_equal(np.asarray(open_rgb(pairset.pairs[i].image)), expected)
    assert pairset.pairs[5].image.suffix == ".png" and pairset.pairs[5].key == "t.parquet:5"


def test_parquet_image_paths_are_relative_to_the_file_and_may_not_escape(tmp_path):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    for i in range(3):
        (folder / "images" / f"{i}.png").write_bytes(png_bytes(i))
    (tmp_path / "outside.png").write_bytes(png_bytes(7))
    names = ["images/0.png", "images/1.png", "images/2.png", "../outside.png"]
    pq.write_table(pa.table({"image": names, "text": [caption(i) for i in range(4)]}), folder / "pairs.parquet")
    report = check_json(folder / "pairs.parquet")
    assert report["summary"]["usable_pairs"] == 3
    assert report["problems"] == [{"path": f"{folder / 'pairs.parquet'} row 3",
                                   "reason": "path escapes the data folder: ../outside.png"}]


def test_ambiguous_columns_are_one_line_naming_the_flag(tmp_path):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"jpg": [png_bytes(0)], "title": ["a"], "alt": ["b"]}), table)
    result = run_cli("data", "check", str(table))
    assert result.returncode == 3
    assert result.stderr.strip() == (f"clipfit: error: {table}: which column holds the captions? no 'text' column "
                                     "and several could be (title, alt); set --caption-column (columns are jpg, title, alt)")
    assert check_json(table, "--caption-column", "alt")["summary"]["usable_pairs"] == 1


def test_listing_parquet_reads_one_row_group_at_a_time(tmp_path):
    """Data larger than memory: arrow's peak allocation while listing stays near one row group, and
    while decoding every image near the row-group cache's limit, far below the bytes in the file
    (measured in a fresh process, with the cache limited to 400 kB for ~160 kB row groups)."""
    table = write_parquet(tmp_path / "big.parquet", n=480, row_group_size=8, size=96, noise=80.0)
    image_bytes = table.stat().st_size  # noise PNGs do not compress: the file is its images
    code = ("import sys, pyarrow as pa; from clipfit.data import tables; from clipfit.data.layouts import load_pairs; "
            "from clipfit.data.check import check_pairset; tables.CACHE.limit = 400_000; "
            "pairs = load_pairs(sys.argv[1]); listing = pa.default_memory_pool().max_memory(); "
            "r = check_pairset(pairs, workers=2, find_duplicates=False); "
            "print(len(r.usable), listing, pa.default_memory_pool().max_memory())")
    done = subprocess.run([sys.executable, "-c", code, str(table)], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=120)
    usable, listing, decoding = map(int, done.stdout.split())
    assert usable == 480
    assert listing < image_bytes / 8, f"listing peaked at {listing} bytes for {image_bytes} bytes of images"
    assert decoding < image_bytes / 6, f"decoding peaked at {decoding} bytes for {image_bytes} bytes of images"


@pytest.fixture
def saved_dataset(tmp_path) -> Path:
    datasets = pytest.importorskip("datasets")
    images = [Image.open(io.BytesIO(png_bytes(i))) for i in range(12)]
    texts = [caption(i) for i in range(12)]
    texts[4] = ""
    dataset = datasets.Dataset.from_dict({"image": images, "text": texts}).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_a_save_to_disk_folder_is_checked_and_trained_on(saved_dataset, tmp_path, tiny_config):
    report = check_json(saved_dataset)
    assert report["layout"] == "datasets" and report["summary"]["usable_pairs"] == 11
    assert report["problems"] == [{"path": f"{saved_dataset / 'data-00000-of-00001.arrow'} row 4",
                                   "reason": "empty caption"}]
    out = tmp_path / "run"
    run_cli(*tiny_refine_args(saved_dataset, out, tiny_config, "--val-split", "0.25", "--epochs", "1"), check=True)
    info = json.loads((out / "run.json").read_text())
    assert info["resolved"]["layout"] == "datasets"
    assert info["resolved"]["train_pairs"] + info["resolved"]["val_pairs"] == 11
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "closed"}, {"HF_HUB_OFFLINE": "1"}])
def test_a_hub_dataset_without_network_is_one_line_and_exit_4(tmp_path, monkeypatch, env):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name, value in env.items():
        monkeypatch.setenv(name, f"http://127.0.0.1:{closed_port()}" if value == "closed" else value)
    result = run_cli("data", "check", "hf://datasets/someorg/somepairs", subprocess_=True, timeout=60)
    assert result.returncode == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipfit: error: hf://datasets/someorg/somepairs: ")
    assert ("cannot reach" in lines[0]) if "HF_ENDPOINT" in env else ("local cache" in lines[0])


def test_without_pyarrow_a_table_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    table = write_parquet(tmp_path / "t.parquet", n=2)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now fails as if not installed
    result = run_cli("data", "check", str(table))
    assert result.returncode == 2
    assert result.stderr.strip() == ("clipfit: error: this layout needs the pyarrow package: "
                                     "pip install 'clipfit[parquet]'")
