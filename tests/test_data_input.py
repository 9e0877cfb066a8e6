"""Data input as people really make it: spreadsheets' CSVs, UTF-16 exports, odd file system entries.

Everything is provoked on disk and read through the real loader or the real CLI; each bad item
must be named (file, line where there is one, reason) while the good pairs stay usable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import cli_env, run_main, tiny_refine_args, write_pairs
from clipfit.data.layouts import load_pairs


def image(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def problems_of(pairset) -> list[tuple[str, str]]:
    return [(p.path, p.reason) for p in pairset.problems]


def check_json(capsys, folder, *args) -> dict:
    capsys.readouterr()
    assert run_main(["data", "check", folder, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clipfit: error: ") and "Traceback" not in err, err
    return err


# --- CSV: the csv module reads records, not lines ---------------------------------------------

ODD_CAPTIONS = {
    "quoted.png": "first line\nsecond line of one caption",
    "ls.png": "left\u2028right",
    "nel.png": "before\x85after",
    "ff.png": "page\x0cbreak",
}


def test_csv_record_separators_inside_captions_stay_in_their_caption(tmp_path):
    rows = ["filepath,title"]
    for name, text in ODD_CAPTIONS.items():
        image(tmp_path / name)
        rows.append(f'{name},"{text}"' if "\n" in text else f"{name},{text}")  # form feed unquoted
    rows.append("broken.png,")
    (tmp_path / "pairs.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    pairs = load_pairs(tmp_path)
    assert {p.key: p.captions for p in pairs.pairs} == {name: (text,) for name, text in ODD_CAPTIONS.items()}
    # the quoted caption spans lines 2-3, so the last record starts on line 7
    assert problems_of(pairs) == [("pairs.csv:7 (broken.png)", "empty caption")]


def test_csv_row_with_an_unquoted_separator_is_named_not_cut(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    (tmp_path / "pairs.csv").write_text('filepath,title\na.png,"a red, round ball"\nb.png,a red, round ball\n')
    pairs = load_pairs(tmp_path)
    assert [p.captions for p in pairs.pairs] == [("a red, round ball",)]
    assert problems_of(pairs) == [("pairs.csv:3", "3 fields but the header has 2 (quote fields that contain the separator)")]


def test_hf_csv_with_wrong_columns_advises_flags_that_work(tmp_path, capsys):
    folder = tmp_path / "pairs"
    image(folder / "a.png")
    image(folder / "b.png", "blue")
    (folder / "metadata.csv").write_text("image,caption\na.png,a red square\nb.png,a blue square\n")
    assert run_main(["data", "check", folder]) == 3
    err = one_error_line(capsys)
    assert "metadata.csv: missing column(s) file_name, text" in err and "--layout csv" in err
    # the advice, followed literally, works
    report = check_json(capsys, folder, "--layout", "csv", "--csv-img-key", "image", "--csv-caption-key", "caption")
    assert report["summary"]["usable_pairs"] == 2


# --- caption files: \n and \r\n end a caption, nothing else ----------------------------------

def test_caption_file_splits_on_newlines_only(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("one\u2028still one\r\ntwo\x85still two\x0cand more\nthree\n".encode())
    captions = load_pairs(tmp_path).pairs[0].captions
    assert captions == ("one\u2028still one", "two\x85still two\x0cand more", "three")


# --- byte-order marks: one decoding rule for every text file ----------------------------------

BOMS = {"utf-8-sig": "utf-8-sig", "utf-16-le": "utf-16", "utf-16-be": "utf-16-be"}


def with_bom(text: str, encoding: str) -> bytes:
    if encoding == "utf-16-be":
        return b"\xfe\xff" + text.encode("utf-16-be")
    if encoding == "utf-16-le":
        return b"\xff\xfe" + text.encode("utf-16-le")
    return text.encode(encoding)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16-le", "utf-16-be"])
def test_byte_order_marks_in_captions_manifests_and_tables(encoding, tmp_path, capsys):
    caption = "un café ☕ et deux\r\nsecond caption"
    sidecar = tmp_path / "sidecar"
    image(sidecar / "a.png")
    (sidecar / "a.txt").write_bytes(with_bom(caption, encoding))
    hf = tmp_path / "hf"
    image(hf / "a.png")
    (hf / "metadata.jsonl").write_bytes(with_bom(json.dumps({"file_name": "a.png", "text": caption}) + "\n", encoding))
    table = tmp_path / "table"
    image(table / "a.png")
    (table / "pairs.tsv").write_bytes(with_bom("filepath\ttitle\na.png\tun café ☕ et deux\n", encoding))
    assert load_pairs(sidecar).pairs[0].captions == ("un café ☕ et deux", "second caption")
    assert load_pairs(hf).pairs[0].captions == ("un café ☕ et deux\r\nsecond caption",)
    assert load_pairs(table).pairs[0].captions == ("un café ☕ et deux",)
    for folder in (sidecar, hf, table):  # no repair warning: nothing needed repairing
        report = check_json(capsys, folder)
        assert report["summary"]["usable_pairs"] == 1 and not report["warnings"] and not report["problems"]


# --- metadata.jsonl: a bad line is a bad item, not a bad folder ------------------------------

def jsonl_with_bad_lines(folder: Path) -> Path:
    write_pairs(folder, n=8)
    rows = [json.dumps({"file_name": f"img{i:03d}.png", "text": f"caption {i}"}).encode() for i in range(8)]
    rows.insert(2, b'{"file_name": "img000.png", "text": "caf\xe9"}')  # Latin-1, line 3
    rows.insert(5, b'{"file_name": "img001.png", "text": ')  # cut off, line 6
    rows.insert(7, b'["a list, not an object"]')  # line 8
    for txt in folder.glob("*.txt"):
        txt.unlink()
    (folder / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    return folder


def test_bad_jsonl_lines_are_named_with_their_line_and_skipped(tmp_path, capsys, tiny_config):
    folder = jsonl_with_bad_lines(tmp_path / "pairs")
    report = check_json(capsys, folder)
    assert report["summary"]["usable_pairs"] == 8
    problems = {p["path"]: p["reason"] for p in report["problems"]}
    assert problems["metadata.jsonl:3"] == "not valid UTF-8 (byte 0xe9)"
    assert problems["metadata.jsonl:6"].startswith("not valid JSON (Expecting value")
    assert problems["metadata.jsonl:8"] == "each line must be a JSON object ({...})"

    out = tmp_path / "run"
    assert run_main(tiny_refine_args(folder, out, tiny_config, "--max-steps", "1")) == 0
    assert "metadata.jsonl:3\tnot valid UTF-8" in (out / "skipped.txt").read_text()
    capsys.readouterr()
    assert run_main(tiny_refine_args(folder, tmp_path / "strict", tiny_config, "--strict")) == 3
    assert "metadata.jsonl:3: not valid UTF-8 (byte 0xe9) (3 bad item(s)" in one_error_line(capsys)


def test_manifest_rows_name_their_line_and_what_is_wrong_with_the_caption(tmp_path, capsys):
    folder = write_pairs(tmp_path / "pairs", n=4)
    for txt in folder.glob("*.txt"):
        txt.unlink()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")
    rows = [{"file_name": "img000.png", "text": "a fine caption"}, {"file_name": "img001.png", "text": 12345},
            {"file_name": "img002.png", "text": True}, {"file_name": "img003.png", "text": {"en": "red"}},
            {"file_name": "img001.png", "text": ["red", 7]}, {"file_name": "ghost.png", "text": "no such file"},
            {"file_name": "../outside.png", "text": "outside the folder"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = {p["path"]: p["reason"] for p in check_json(capsys, folder)["problems"]}
    assert problems == {
        "metadata.jsonl:2": "text is a number, not a string", "metadata.jsonl:3": "text is true/false, not a string",
        "metadata.jsonl:4": "text is an object, not a string",
        "metadata.jsonl:5": "text is a list that holds a number, not only strings",
        "metadata.jsonl:6 (ghost.png)": "missing file: ghost.png",
        "metadata.jsonl:7 (../outside.png)": "path escapes the data folder: ../outside.png"}

    (folder / "metadata.jsonl").unlink()
    (folder / "pairs.csv").write_text("filepath,title\nimg000.png,fine\nghost.png,missing\n../outside.png,outside\n")
    problems = {p["path"]: p["reason"] for p in check_json(capsys, folder)["problems"]}
    assert problems == {"pairs.csv:3 (ghost.png)": "missing file: ghost.png",
                        "pairs.csv:4 (../outside.png)": "path escapes the data folder: ../outside.png"}


# --- file system entries that are not plain files ---------------------------------------------

def test_file_symlink_loop_is_a_named_bad_item(tmp_path, capsys, tiny_config):
    folder = write_pairs(tmp_path / "pairs", n=8)
    (folder / "loop.png").symlink_to(folder / "loop2.png")
    (folder / "loop2.png").symlink_to(folder / "loop.png")
    (folder / "loop.txt").write_text("a caption for a looping image")
    report = check_json(capsys, folder)
    assert report["summary"]["usable_pairs"] == 8
    reasons = {Path(p["path"]).name: p["reason"] for p in report["problems"]}
    assert reasons["loop.png"].startswith("symlink loop") and reasons["loop2.png"].startswith("symlink loop")
    assert run_main(tiny_refine_args(folder, tmp_path / "run", tiny_config, "--strict")) == 3
    assert "loop.png: symlink loop" in one_error_line(capsys)


def test_pairs_argument_that_is_a_symlink_loop_or_a_pipe(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    os.mkfifo(tmp_path / "pipe")
    assert run_main(["data", "check", tmp_path / "a"]) == 3
    assert f"{tmp_path / 'a'}: symlink loop" in one_error_line(capsys)
    assert run_main(["data", "check", tmp_path / "pipe"]) == 3
    assert "pipe: not a folder or a regular file" in one_error_line(capsys)


def test_manifest_row_naming_a_symlink_loop(tmp_path):
    image(tmp_path / "ok.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    rows = [{"file_name": "ok.png", "text": "fine"}, {"file_name": "loop.png", "text": "loops"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(tmp_path)
    assert [p.key for p in pairs.pairs] == ["ok.png"]
    assert problems_of(pairs) == [("metadata.jsonl:2 (loop.png)", "symlink loop: loop.png")]


def test_caption_that_is_a_named_pipe_is_reported_never_read(tmp_path, capsys):
    folder = write_pairs(tmp_path / "pairs", n=8)
    image(folder / "piped.png")
    os.mkfifo(folder / "piped.txt")  # reading it would block until someone writes
    report = check_json(capsys, folder)
    assert report["summary"]["usable_pairs"] == 8
    assert [(Path(p["path"]).name, p["reason"]) for p in report["problems"]] == [
        ("piped.txt", "not a regular file (a named pipe), skipped")]


# --- unreadable files and folders -------------------------------------------------------------

def as_unprivileged(argv: list[str]) -> list[str]:
    """The command without root's right to read any file (tests often run as root), so that a
    chmod 000 file really is unreadable to it."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", *argv]


def clipfit_unprivileged(*args) -> subprocess.CompletedProcess:
    argv = as_unprivileged([sys.executable, "-m", "clipfit", *map(str, args)])
    return subprocess.run(argv, capture_output=True, text=True, env=cli_env(), timeout=120)


def test_unreadable_caption_file_and_folder(tmp_path):
    folder = write_pairs(tmp_path / "pairs", n=8)
    (folder / "img003.txt").chmod(0)
    (folder / "img004.png").chmod(0)
    (folder / "sub").mkdir()
    write_pairs(folder / "sub", n=2)
    (folder / "sub").chmod(0)
    try:
        result = clipfit_unprivileged("data", "check", folder, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["summary"]["usable_pairs"] == 6
        reasons = {Path(p["path"]).name: p["reason"] for p in report["problems"] + report["bad_images"]}
        assert reasons == {"img003.txt": "cannot read caption file: Permission denied",
                           "img004.png": "cannot read: Permission denied",
                           "sub": "cannot list folder: Permission denied"}

        folder.chmod(0)  # the pairs folder itself
        result = clipfit_unprivileged("data", "check", folder)
        assert result.returncode == 3
        assert result.stderr.strip() == f"clipfit: error: {folder}: cannot read (Permission denied)"
    finally:
        for path in (folder, folder / "sub", folder / "img003.txt", folder / "img004.png"):
            path.chmod(0o755)
    assert (folder / "img003.txt").read_text().startswith("a ")  # nothing was changed or removed


def test_unreadable_manifest(tmp_path):
    folder = jsonl_with_bad_lines(tmp_path / "pairs")
    (folder / "metadata.jsonl").chmod(0)
    try:
        result = clipfit_unprivileged("data", "check", folder)
    finally:
        (folder / "metadata.jsonl").chmod(0o644)
    assert result.returncode == 3
    assert result.stderr.strip() == f"clipfit: error: {folder / 'metadata.jsonl'}: cannot read (Permission denied)"


# --- file names are printed as they are, on one line -------------------------------------------

def odd_names(folder: Path) -> dict[str, str]:
    """Bad images whose names are rich markup or hold a newline / escape sequence; name -> as shown."""
    (folder / "x[").mkdir()
    names = {"x[/]y.png": "x[/]y.png", "[bold]z.png": "[bold]z.png", "new\nline.png": "new\\nline.png",
             "esc\x1b[31m.png": "esc\\x1b[31m.png"}
    for name in names:
        (folder / name).write_bytes(b"not a picture")
        (folder / name).with_suffix(".txt").write_text("a caption")
    return names


def test_odd_file_names_are_shown_literally_everywhere(tmp_path, capsys, monkeypatch, tiny_config):
    folder = write_pairs(tmp_path / "pairs", n=8)
    names = odd_names(folder)
    monkeypatch.setenv("COLUMNS", "100")
    capsys.readouterr()
    assert run_main(["data", "check", folder]) == 0
    table = capsys.readouterr().out
    for shown in names.values():
        assert shown in table
    assert "\x1b" not in table  # not a colour-changing escape sequence (the console is no terminal)

    out = tmp_path / "run"
    assert run_main(tiny_refine_args(folder, out, tiny_config, "--max-steps", "1")) == 0
    skipped = [line.split("\t") for line in (out / "skipped.txt").read_text().splitlines()]
    assert sorted(Path(path).relative_to(folder).as_posix() for path, _ in skipped) == sorted(names.values())
    assert all(reason == "not an image Pillow can read" for _, reason in skipped)

    capsys.readouterr()
    assert run_main(tiny_refine_args(folder, tmp_path / "strict", tiny_config, "--strict")) == 3
    err = one_error_line(capsys)
    assert any(shown in err for shown in names.values())


def test_rich_progress_prints_markup_in_messages_literally():
    import io

    from clipfit.progress import RichProgress

    stream = io.StringIO()
    progress = RichProgress(stream)
    progress.warn("pairs/x[/]y.png: not an image")
    progress.info("cached [bold]z.png\nand more")
    assert stream.getvalue() == "warning: pairs/x[/]y.png: not an image\ncached [bold]z.png\\nand more\n"


# --- data check names every item worth a look --------------------------------------------------

def test_data_check_table_names_every_kind_first_20_and_counts_the_rest(tmp_path, capsys, monkeypatch):
    folder = write_pairs(tmp_path / "pairs", n=8)
    for i in range(23):
        image(folder / f"lonely{i:02d}.png")
    (folder / "orphan.txt").write_text("a caption without its image")
    (folder / "img001.png").write_bytes(b"")
    (folder / "img002.txt").write_text("word " * 100)
    (folder / "img003.txt").write_bytes(b"caf\xe9")
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert run_main(["data", "check", folder]) == 0
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.count("│") == 4]  # the rows of the items table (kind, file, reason)
    by_file = {file: reason for _, file, reason in rows}
    assert by_file["img001.png"] == "empty file (0 bytes)"
    assert by_file["orphan.txt"] == "no image of the same name: ignored"
    assert by_file["img002.png (caption 1 of 1)"].startswith("102 tokens, over the context length of 77")
    assert by_file["img003.txt"] == "caption is not valid UTF-8 (byte 0xe9); undecodable bytes replaced"
    lonely = [file for file in by_file if file.startswith("lonely")]
    assert lonely == [f"lonely{i:02d}.png" for i in range(20)]
    assert by_file["... and 3 more"] == "`--json` lists them all"
    assert ["image without caption (23)", "lonely00.png", "no caption: skipped"] in rows


# --- an image that vanishes or changes after the check ---------------------------------------------

@pytest.mark.parametrize("what, workers", [("vanished", "0"), ("changed", "2")])
def test_image_that_vanishes_or_changes_during_the_run_stops_it_naming_the_file(what, workers, tmp_path, capsys,
                                                                                 monkeypatch, tiny_config):
    """The file is really deleted or rewritten on disk, right after `check_pairset` found it good
    (the hook only picks the moment); with workers the error crosses a DataLoader process."""
    import clipfit.data.training

    folder = write_pairs(tmp_path / "pairs", n=16)
    victim = folder / "img005.png"
    real_check = clipfit.data.training.check_pairset

    def check_then_touch(*args, **kwargs):
        report = real_check(*args, **kwargs)
        if what == "vanished":
            victim.unlink()
        else:
            Image.new("RGB", (40, 40), "black").save(victim)  # still a good image, but another one
        return report

    monkeypatch.setattr(clipfit.data.training, "check_pairset", check_then_touch)
    capsys.readouterr()
    code = run_main(tiny_refine_args(folder, tmp_path / "run", tiny_config, "--workers", workers,
                                     "--batch-size", "16", "--epochs", "1"))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the --pretrained none warning
    assert code == 3 and "Traceback" not in err
    if what == "vanished":  # found by the before-training evaluation, or by training if that came first
        assert f"clipfit: error: {victim}: " in err and ("vanished" in err or "No such file or directory" in err)
    else:  # still an image: only the check against the size and time it was checked with finds it
        assert f"clipfit: error: {victim}: changed (size or modification time differ) after the run checked it" in err
    assert len(list(folder.glob("*.png"))) == (15 if what == "vanished" else 16)  # nothing else touched


def test_compare_prints_run_folder_names_literally(tmp_path, capsys, monkeypatch):
    runs = []
    for name in ("[bold]first", "x[", "x[/]second"):
        run = tmp_path / name
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.json").write_text(json.dumps({
            "config": {"method": "[red]refine"}, "model": {"arch": "tiny", "pretrained": "none"}, "steps": 3,
            "before": {"image_to_text_R@1": 0.5}, "after": {"image_to_text_R@1": 0.75}}))
        runs.append(run)
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert run_main(["compare", runs[0], runs[2]]) == 0
    out = capsys.readouterr().out
    assert "[bold]first" in out and "]second" in out and out.count("[red]refine") == 2


def test_webdataset_captions_split_on_newlines_only(tmp_path, capsys):
    import tarfile
    from io import BytesIO

    from clipfit.data.shards import extract_sample, find_shards

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for key, data in (("a.png", image(tmp_path / "a.png").read_bytes()),
                          ("a.txt", b"\xef\xbb\xbfone\xe2\x80\xa8caption\r\ntwo\n")):
            member = tarfile.TarInfo(key)
            member.size = len(data)
            tar.addfile(member, BytesIO(data))
    sample = extract_sample(find_shards(shards), tmp_path / "sample", limit=4)
    assert [p.captions for p in sample] == [("one\u2028caption", "two")]
