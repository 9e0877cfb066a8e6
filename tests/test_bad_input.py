"""Bad input gets one clear line, and nothing is lost.

Every bad item is provoked on disk; `clipfit data check` must name it (path and reason, in
text and in --json), `clipfit refine` must skip it with a count (skipped.txt) or, with
--strict, stop before training with one line and exit 3. Odd-but-valid images must be
decoded correctly instead. Usage mistakes get one line and exit 2.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import error_line, run_main, tiny_refine_args, write_pairs
from clipfit.data.images import open_rgb
from clipfit.data.layouts import load_pairs
from clipfit.errors import UsageError


def caption(root: Path, stem: str, text: str = "a caption") -> None:
    (root / f"{stem}.txt").write_text(text)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds almost no pixel data: decoding it
    would fail, so a 'decompression bomb' reason proves the size was checked before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def noise_jpeg(path: Path) -> bytes:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


# --- the bad items: (make it in a sidecar folder, path fragment, reason fragment) ---------------

def zero_byte(root):
    (root / "zero.jpg").write_bytes(b"")
    caption(root, "zero")


def truncated_jpeg(root):
    data = noise_jpeg(root / "cut.jpg")
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    caption(root, "cut")


def not_an_image(root):
    (root / "notes.png").write_text("plain text pretending to be a picture")
    caption(root, "notes")


def decompression_bomb(root):
    png_header_only(root / "bomb.png", 30_000, 30_000)  # 900 M pixels > Pillow's 89 M default
    caption(root, "bomb")


def empty_caption(root):
    Image.new("RGB", (16, 16), "red").save(root / "blank.png")
    caption(root, "blank", "")


def whitespace_caption(root):
    Image.new("RGB", (16, 16), "red").save(root / "spaces.png")
    caption(root, "spaces", "  \n\t\n   ")


def symlink_loop(root):
    (root / "sub").mkdir()
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)


BAD_SIDECAR_ITEMS = {
    "zero-byte image": (zero_byte, "zero.jpg", "empty file (0 bytes)"),
    "truncated JPEG": (truncated_jpeg, "cut.jpg", "truncated"),
    "not an image": (not_an_image, "notes.png", "not an image"),
    "decompression bomb": (decompression_bomb, "bomb.png", "exceeds the decompression-bomb limit of 89478485"),
    "empty caption file": (empty_caption, "blank.txt", "empty caption"),
    "whitespace-only caption file": (whitespace_caption, "spaces.txt", "empty caption"),
    "symlink loop": (symlink_loop, "loop", "symlink loop"),
}


def hf_folder(root: Path, extra_rows: list[dict]) -> Path:
    """A Hugging Face imagefolder: good pairs listed in metadata.jsonl, plus extra rows."""
    write_pairs(root, n=8)
    rows = [{"file_name": f"img{i:03d}.png", "text": (root / f"img{i:03d}.txt").read_text().strip()} for i in range(8)]
    for txt in root.glob("*.txt"):
        txt.unlink()
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + extra_rows))
    return root


def outside_row(root):
    Image.new("RGB", (16, 16), "blue").save(root.parent / "outside.png")  # exists, but not ours to read
    return hf_folder(root, [{"file_name": "../outside.png", "text": "escapes the folder"}])


def missing_row(root):
    return hf_folder(root, [{"file_name": "ghost.png", "text": "no such file"}])


BAD_MANIFEST_ITEMS = {
    "manifest row outside the folder": (outside_row, "outside.png", "escapes the data folder"),
    "manifest row to a missing file": (missing_row, "ghost.png", "missing file"),
}


def sidecar_with(root: Path, *makers) -> Path:
    write_pairs(root, n=8)
    for make in makers:
        make(root)
    return root


def make_bad_folder(name: str, root: Path) -> Path:
    if name in BAD_SIDECAR_ITEMS:
        return sidecar_with(root, BAD_SIDECAR_ITEMS[name][0])
    return BAD_MANIFEST_ITEMS[name][0](root)


ALL_BAD = {**BAD_SIDECAR_ITEMS, **BAD_MANIFEST_ITEMS}


def data_check_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert run_main(["data", "check", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def reported(report: dict, section: str) -> list[tuple[str, str]]:
    return [(item["path"], item["reason"]) for item in report[section]]


def find(items: list[tuple[str, str]], path_part: str, reason_part: str) -> bool:
    return any(path_part in path and reason_part in reason for path, reason in items)


# --- data check names each bad item ------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_BAD)
def test_data_check_reports_bad_item(name, tmp_path, capsys, monkeypatch):
    folder = make_bad_folder(name, tmp_path / "pairs")
    _, path_part, reason_part = ALL_BAD[name]
    report = data_check_json(capsys, folder)
    skipped = reported(report, "bad_images") + reported(report, "problems")
    assert find(skipped, path_part, reason_part), skipped
    assert report["summary"]["usable_pairs"] == 8  # the good pairs are all still there

    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "250")  # wide enough that rich keeps each table cell on one line
    assert run_main(["data", "check", folder]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert path_part in text and " ".join(reason_part.split()) in text


@pytest.mark.parametrize("name", ALL_BAD)
def test_refine_strict_stops_before_training(name, tmp_path, tiny_config, capsys):
    folder = make_bad_folder(name, tmp_path / "pairs")
    out = tmp_path / "run"
    capsys.readouterr()
    code = run_main(tiny_refine_args(folder, out, tiny_config, "--strict"))
    err = capsys.readouterr().err
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipfit: error: ") and ALL_BAD[name][1] in lines[0]
    assert "--strict" in lines[0]  # says how to skip instead
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_refine_skips_every_bad_item_with_a_count(tmp_path, tiny_config, capsys):
    folder = sidecar_with(tmp_path / "pairs", *(make for make, _, _ in BAD_SIDECAR_ITEMS.values()))
    out = tmp_path / "run"
    capsys.readouterr()
    assert run_main(tiny_refine_args(folder, out, tiny_config)) == 0
    err = capsys.readouterr().err
    assert f"skipping {len(BAD_SIDECAR_ITEMS)} bad item(s)" in err
    lines = [line.split("\t") for line in (out / "skipped.txt").read_text().splitlines()]
    for _, path_part, reason_part in BAD_SIDECAR_ITEMS.values():
        assert find([tuple(line) for line in lines], path_part, reason_part), (path_part, lines)
    run = json.loads((out / "run.json").read_text())
    assert run["skipped"] == len(BAD_SIDECAR_ITEMS) and run["resolved"]["train_pairs"] == 8
    assert (out / "model.safetensors").is_file()


def test_refine_skips_bad_manifest_rows(tmp_path, tiny_config):
    folder = outside_row(tmp_path / "pairs")
    with (folder / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "ghost.png", "text": "no such file"}) + "\n")
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(folder, out, tiny_config, "--max-steps", "1")) == 0
    skipped = (out / "skipped.txt").read_text()
    assert "escapes the data folder" in skipped and "missing file: ghost.png" in skipped


# --- decompression-bomb limit -------------------------------------------------------------------

def test_bomb_is_never_decoded_and_the_flag_raises_the_limit(tmp_path, capsys):
    folder = sidecar_with(tmp_path / "pairs", decompression_bomb)
    default = reported(data_check_json(capsys, folder), "bad_images")
    assert find(default, "bomb.png", "30000x30000 pixels exceeds the decompression-bomb limit")
    raised = reported(data_check_json(capsys, folder, "--max-image-pixels", str(10**9)), "bad_images")
    # past the raised limit Pillow tries to decode it, and finds the pixel data missing
    assert find(raised, "bomb.png", "") and not find(raised, "bomb.png", "decompression-bomb")


def test_lowered_limit_reports_and_default_accepts_a_real_image(tmp_path, capsys):
    folder = write_pairs(tmp_path / "pairs", n=8)
    Image.new("RGB", (300, 300), "green").save(folder / "big.png")
    caption(folder, "big")
    assert find(reported(data_check_json(capsys, folder, "--max-image-pixels", "50000"), "bad_images"),
                "big.png", "300x300 pixels exceeds the decompression-bomb limit of 50000")
    assert data_check_json(capsys, folder)["summary"]["usable_pairs"] == 9


def test_refine_trains_on_an_image_above_the_default_limit_when_raised(tmp_path, tiny_config):
    folder = write_pairs(tmp_path / "pairs", n=8)
    Image.new("L", (9500, 9500), 128).save(folder / "huge.png")  # 90 M pixels, 100 kB on disk
    caption(folder, "huge", "a very large grey image")
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(folder, out, tiny_config, "--max-image-pixels", "100000000",
                                     "--max-steps", "1", "--strict")) == 0
    assert json.loads((out / "run.json").read_text())["resolved"]["train_pairs"] == 9


# --- odd but valid images are decoded correctly -------------------------------------------------

def colour_of(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return image.convert("RGB").getpixel(xy)


def test_cmyk_is_converted(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")  # full magenta ink
    r, g, b = colour_of(open_rgb(tmp_path / "cmyk.jpg"), (4, 4))
    assert r > 200 and g < 60 and b > 200


def test_16_bit_grey_keeps_its_brightness(tmp_path):
    Image.fromarray(np.full((8, 8), 40_000, dtype=np.uint16)).save(tmp_path / "grey16.png")
    image = open_rgb(tmp_path / "grey16.png")
    assert image.mode == "RGB" and abs(colour_of(image, (4, 4))[0] - round(40_000 / 65535 * 255)) <= 1


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red (transparent), 1 blue
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "palette.png", transparency=0)
    decoded = open_rgb(tmp_path / "palette.png")
    assert colour_of(decoded, (4, 4)) == (255, 255, 255) and colour_of(decoded, (0, 0)) == (0, 0, 255)


def test_exif_rotation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), "blue")
    stored.paste(Image.new("RGB", (20, 20), "red"), (0, 0))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = open_rgb(tmp_path / "rotated.jpg")
    assert image.size == (20, 40)  # portrait, as a viewer shows it
    top, bottom = colour_of(image, (10, 5)), colour_of(image, (10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left edge is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_odd_valid_images_pass_strict_refine(tmp_path, tiny_config, capsys):
    folder = write_pairs(tmp_path / "pairs", n=8)
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40_000, dtype=np.uint16)).save(folder / "grey16.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0] + [0] * 765)
    palette.save(folder / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (20, 10), "red").save(folder / "rotated.jpg", exif=exif)
    for stem in ("cmyk", "grey16", "palette", "rotated"):
        caption(folder, stem)
    report = data_check_json(capsys, folder)
    assert report["summary"]["usable_pairs"] == 12 and not report["bad_images"] and not report["problems"]
    assert run_main(tiny_refine_args(folder, tmp_path / "run", tiny_config, "--strict", "--max-steps", "1")) == 0


# --- caption files: used, with a warning where something was repaired ---------------------------

def test_caption_encodings(tmp_path, capsys):
    folder = write_pairs(tmp_path / "pairs", n=8)
    for stem in ("latin1", "bom"):
        Image.new("RGB", (16, 16), "red").save(folder / f"{stem}.png")
    (folder / "latin1.txt").write_bytes("a caf\xe9 au lait".encode("latin-1"))
    (folder / "bom.txt").write_bytes("\ufeffa caption with a byte-order mark".encode("utf-8"))
    captions = {p.key: p.captions for p in load_pairs(folder).pairs}
    assert captions["latin1.png"] == ("a caf\ufffd au lait",)  # replacement character, not a crash
    assert captions["bom.png"] == ("a caption with a byte-order mark",)  # BOM stripped
    report = data_check_json(capsys, folder)
    assert report["summary"]["usable_pairs"] == 10
    assert find(reported(report, "warnings"), "latin1.txt", "not valid UTF-8")
    assert not find(reported(report, "warnings"), "bom.txt", "")


def test_refine_prints_the_caption_warning(tmp_path, tiny_config, capsys):
    folder = write_pairs(tmp_path / "pairs", n=8)
    (folder / "img000.txt").write_bytes(b"caf\xe9")
    capsys.readouterr()
    assert run_main(tiny_refine_args(folder, tmp_path / "run", tiny_config, "--strict", "--max-steps", "1")) == 0
    assert "img000.txt: caption is not valid UTF-8" in capsys.readouterr().err


def test_duplicate_file_names_across_folders_are_both_kept(tmp_path, capsys):
    folder = write_pairs(tmp_path / "pairs", n=8)
    write_pairs(folder / "more", n=2, seed=1)  # more/img000.png, more/img001.png
    report = data_check_json(capsys, folder)
    assert report["summary"]["usable_pairs"] == 10
    warnings = reported(report, "warnings")
    assert find(warnings, "img000.png", "same file name in 2 folders") and find(warnings, "img001.png", "more")


# --- nothing usable: an error naming the layouts that were tried --------------------------------

@pytest.mark.parametrize("setup, detail", [
    (lambda root: None, "folder holds no images"),
    (lambda root: [Image.new("RGB", (8, 8)).save(root / f"{i}.png") for i in range(3)], "found 3 image(s) but no captions"),
    (lambda root: (root / "a.txt").write_text("a caption without an image"), "no image-caption pairs"),
])
@pytest.mark.parametrize("command", ["check", "refine"])
def test_no_pairs_names_the_layouts_tried(setup, detail, command, tmp_path, tiny_config, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    setup(folder)
    argv = ["data", "check", folder] if command == "check" else tiny_refine_args(folder, tmp_path / "run", tiny_config)
    capsys.readouterr()
    assert run_main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and detail in err
    assert "tried layout sidecar" in err and all(name in err for name in ("sidecar", "hf", "csv"))


# --- usage mistakes: one line, exit 2, traceback only with --debug ------------------------------

def usage_mistakes(tiny_config: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "broken.toml").write_text("epochs = = 3")
    (tmp_path / "unknown.toml").write_text("epoch = 3")
    model = ["--model", str(tiny_config), "--pretrained", "none"]
    return {
        "unknown model": (["--model", "ViT-B-99"], "unknown model 'ViT-B-99'"),
        "unknown pretrained tag": (["--model", "ViT-B-32", "--pretrained", "nosuchtag"], "unknown pretrained tag 'nosuchtag'"),
        "model config not JSON": (["--model", str(tmp_path / "broken.json")], "not valid JSON"),
        "config file not TOML": (model + ["--config", str(tmp_path / "broken.toml")], "not valid TOML"),
        "unknown config setting": (model + ["--config", str(tmp_path / "unknown.toml")], "unknown setting(s) epoch"),
        "batch size 0": (model + ["--batch-size", "0"], "--batch-size must be at least 1"),
        "negative lr": (model + ["--lr", "-1e-3"], "--lr must be positive"),
        "lora and lock": (model + ["--lora", "--lock-image"], "contradict"),
        "resume and overwrite": (model + ["--resume", "--overwrite"], "contradict"),
        "unknown method": (model + ["--method", "nosuch"], "unknown method nosuch"),
        "unknown choice": (model + ["--precision", "fp8"], "--precision 'fp8'"),
    }


MISTAKES = ["unknown model", "unknown pretrained tag", "model config not JSON", "config file not TOML",
            "unknown config setting", "batch size 0", "negative lr", "lora and lock", "resume and overwrite",
            "unknown method", "unknown choice"]


@pytest.mark.parametrize("name", MISTAKES)
def test_usage_mistake_is_one_line_exit_2(name, pairs_dir, tiny_config, tmp_path, capsys):
    extra, message = usage_mistakes(tiny_config, tmp_path)[name]
    out = tmp_path / "run"
    capsys.readouterr()
    code = run_main(["refine", pairs_dir, "--out", out, "--workers", "0", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("clipfit: error: ") and message in err
    assert "Traceback" not in err
    assert not out.exists() or [p.name for p in out.iterdir()] == [".clipfit-run"]  # a corrected command reuses --out


def test_debug_adds_the_traceback_and_keeps_the_exit_status(pairs_dir, tmp_path, capsys):
    code = run_main(["refine", pairs_dir, "--model", "ViT-B-99", "--out", tmp_path / "run", "--debug"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback (most recent call last)" in err and UsageError.__name__ in err
    assert err.strip().splitlines()[-1].startswith("clipfit: error: unknown model")


def test_typer_parse_errors_exit_2(pairs_dir, capsys):
    assert run_main(["refine", pairs_dir, "--batch-size", "many"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("change, field", [
    ({"vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8}},
     "vision_cfg.width 32 with head_width 64 (open_clip's default) gives no attention heads"),
    ({"vision_cfg": {"image_size": 32, "layers": 2, "width": 129, "patch_size": 8, "head_width": 64}},
     "vision_cfg.width 129 with head_width 64 gives 2 attention heads, which do not divide 129"),
    ({"text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 0, "layers": 2}},
     "text_cfg.heads 0 with width 64 gives no attention heads"),
])
def test_a_model_config_without_attention_heads_is_exit_4_naming_the_field(change, field, pairs_dir, tmp_path,
                                                                           capsys):
    from conftest import TINY_CONFIG

    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**TINY_CONFIG, **change}))
    for command in (["refine", pairs_dir, "--out", tmp_path / "run", "--workers", "0"],
                    ["eval", "retrieval", pairs_dir, "--workers", "0"]):
        capsys.readouterr()
        assert run_main([*command, "--model", config, "--pretrained", "none"]) == 4
        assert f"clipfit: error: {config}: {field}" in error_line(capsys, alone=False)


def float_settings() -> list[str]:
    """Every refine setting that takes a float: the core settings' and every method's options."""
    import typing

    from clipfit.config import CONFIG_HINTS

    return [name for name, hint in CONFIG_HINTS.items() if float in (hint, *typing.get_args(hint))]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_refuses_nan_and_infinity(value, pairs_dir, tiny_config, tmp_path, capsys):
    names = float_settings()
    assert {"lr", "max_zeroshot_drop", "val_split", "hycd_alpha", "fail_on_zeroshot_drop"} <= set(names)
    for name in names:
        flag = "--" + name.replace("_", "-")
        code = run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config, flag, value))
        assert (code, error_line(capsys)) == (2, f"clipfit: error: {flag} must be a finite number (got {float(value)})")
    (tmp_path / "nan.toml").write_text("max-zeroshot-drop = nan\n")  # TOML has nan and inf too
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config, "--config", tmp_path / "nan.toml")) == 2
    assert "--max-zeroshot-drop must be a finite number (got nan)" in error_line(capsys)
    sweep = ["sweep", pairs_dir, "--model", tiny_config, "--out", tmp_path / "sweep", "--val-split", "0.25"]
    assert run_main([*sweep, "--hycd-alpha", f"0.5,{value}"]) == 2
    assert f"--hycd-alpha must be a finite number (got {float(value)})" in error_line(capsys)
    assert run_main(["interpolate", tmp_path / "any-run", "--max-zeroshot-drop", value]) == 2
    assert f"--max-zeroshot-drop must be a finite number (got {float(value)})" in error_line(capsys)
    assert run_main(tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config, "--method", "refine",
                                     "--weight", f"rafa={value}")) == 2  # a loss weight is a float too
    assert error_line(capsys) == f"clipfit: error: --weight 'rafa={value}': the weight must be a finite number"
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
