"""The on-disk feature cache: hits, misses, invalidation, damaged entries, listing and clearing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from clipfit.features import FeatureCache, captions_hash, encoder_identity, images_hash
from clipfit.data.layouts import load_pairs
from conftest import write_pairs


def counting_build(calls: list):
    def build():
        calls.append(1)
        generator = torch.Generator().manual_seed(len(calls))
        return {"bank": torch.randn(10, 4, generator=generator), "owner": torch.arange(10)}
    return build


def test_second_call_is_a_hit_and_returns_what_the_first_stored(tmp_path):
    messages, calls = [], []
    cache = FeatureCache(tmp_path, log=messages.append)
    first = cache.get_or_build({"kind": "bank", "data": "abc"}, counting_build(calls))
    second = FeatureCache(tmp_path).get_or_build({"kind": "bank", "data": "abc"}, counting_build(calls))
    assert len(calls) == 1
    assert first["bank"].dtype == torch.float16 and first["owner"].dtype == torch.int64
    assert torch.equal(first["bank"], second["bank"]) and torch.equal(second["owner"], torch.arange(10))
    assert any(m.startswith("encoded 10 items for bank") for m in messages)


def test_a_changed_key_part_misses(tmp_path):
    calls = []
    cache = FeatureCache(tmp_path)
    cache.get_or_build({"kind": "bank", "data": "abc"}, counting_build(calls))
    cache.get_or_build({"kind": "bank", "data": "abd"}, counting_build(calls))
    cache.get_or_build({"kind": "bank", "data": "abc"}, counting_build(calls))
    assert (cache.builds, cache.hits, len(calls)) == (2, 1, 2)


def test_a_damaged_entry_is_rebuilt(tmp_path):
    calls = []
    cache = FeatureCache(tmp_path)
    cache.get_or_build({"kind": "bank"}, counting_build(calls))
    path = cache.path_for({"kind": "bank"})
    path.write_bytes(path.read_bytes()[:-20])
    rebuilt = cache.get_or_build({"kind": "bank"}, counting_build(calls))
    assert len(calls) == 2 and rebuilt["bank"].shape == (10, 4)


def test_entries_and_clear_by_kind(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.get_or_build({"kind": "ping-image", "n": 1}, counting_build([]))
    cache.get_or_build({"kind": "dclip-regions", "n": 1}, counting_build([]))
    entries = {e.kind: e for e in cache.entries()}
    assert set(entries) == {"ping-image", "dclip-regions"}
    assert entries["ping-image"].shapes == {"bank": [10, 4], "owner": [10]}
    assert entries["ping-image"].key_parts == {"kind": "ping-image", "n": 1}
    assert cache.clear("ping-image")[0] == 1
    assert [e.kind for e in cache.entries()] == ["dclip-regions"]


def test_data_hashes_follow_images_and_captions_separately(tmp_path):
    folder = write_pairs(tmp_path / "pairs", n=4)
    before = load_pairs(str(folder), "auto").pairs
    (folder / "img002.txt").write_text("a different caption\n")
    after = load_pairs(str(folder), "auto").pairs
    assert captions_hash(before) != captions_hash(after)
    assert images_hash(before) == images_hash(after)


def test_encoder_identity_notices_a_changed_weights_file(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"12345")
    first = encoder_identity("ViT-B-32", str(weights))
    weights.write_bytes(b"123456")
    assert encoder_identity("ViT-B-32", str(weights)) != first
    assert encoder_identity("ViT-B-32", "none", seed=1) != encoder_identity("ViT-B-32", "none", seed=2)


# --- integrity: checksums, shapes, keys -------------------------------------------------------------

def flip_a_byte(path, from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_warned_and_rebuilt_with_the_right_numbers(tmp_path):
    calls, warnings = [], []
    cache = FeatureCache(tmp_path, warn=warnings.append)
    first = {k: v.clone() for k, v in cache.get_or_build({"kind": "bank"}, counting_build(calls)).items()}
    flip_a_byte(cache.path_for({"kind": "bank"}))
    rebuilt = cache.get_or_build({"kind": "bank"}, lambda: {"bank": first["bank"].float(), "owner": first["owner"]})
    assert len(warnings) == 1 and "checksum mismatch" in warnings[0] and "rebuilding" in warnings[0]
    assert torch.equal(rebuilt["bank"], first["bank"]) and torch.equal(rebuilt["owner"], first["owner"])
    assert cache.builds == 2 and cache.hits == 0
    assert FeatureCache(tmp_path).get({"kind": "bank"}) is not None  # the rebuilt entry is sound


def test_an_entry_with_the_wrong_number_of_rows_is_rebuilt_not_an_index_error(tmp_path):
    warnings = []
    cache = FeatureCache(tmp_path, warn=warnings.append)
    key = {"kind": "bank", "items": 10}
    cache.put(key, {"bank": torch.randn(3, 4), "owner": torch.arange(3)})  # self-consistent, but for 3 items
    tensors = cache.get_or_build(key, counting_build([]), rows={"bank": 10, "owner": 10})
    assert tensors["bank"].shape == (10, 4) and tensors["owner"][9] == 9
    assert "tensor bank has 3 rows, 10 are needed" in warnings[0]


def test_a_header_that_disagrees_with_the_recorded_shapes_is_damaged(tmp_path):
    from safetensors.torch import save_file

    from clipfit.cache import read_header

    cache = FeatureCache(tmp_path)
    cache.get_or_build({"kind": "bank"}, counting_build([]))
    path = cache.path_for({"kind": "bank"})
    metadata = read_header(path)["__metadata__"]
    save_file({"bank": torch.zeros(5, 4, dtype=torch.float16), "owner": torch.arange(5)}, str(path), metadata=metadata)
    warnings = []
    rebuilt = FeatureCache(tmp_path, warn=warnings.append).get_or_build({"kind": "bank"}, counting_build([]))
    assert rebuilt["bank"].shape == (10, 4) and "shape [5] in the header, [10] when written" in warnings[0]


def test_an_entry_copied_over_another_key_is_rebuilt(tmp_path):
    cache, warnings = FeatureCache(tmp_path), []
    cache.get_or_build({"kind": "bank", "n": 1}, counting_build([]))
    cache.get_or_build({"kind": "bank", "n": 2}, counting_build([]))
    cache.path_for({"kind": "bank", "n": 2}).write_bytes(cache.path_for({"kind": "bank", "n": 1}).read_bytes())
    calls = []
    FeatureCache(tmp_path, warn=warnings.append).get_or_build({"kind": "bank", "n": 2}, counting_build(calls))
    assert len(calls) == 1 and "written for key" in warnings[0]


def test_entries_without_checksums_from_the_old_format_are_rebuilt(tmp_path):
    from clipfit.models import save_state_dict

    cache, calls, warnings = FeatureCache(tmp_path), [], []
    save_state_dict({"bank": torch.zeros(10, 4)}, cache.path_for({"kind": "bank"}), {"clipfit_cache": "1", "kind": "bank"})
    FeatureCache(tmp_path, warn=warnings.append).get_or_build({"kind": "bank"}, counting_build(calls))
    assert len(calls) == 1 and "older entries have no checksums" in warnings[0]


def test_ls_and_clear_see_damaged_entries_and_leave_other_files_alone(tmp_path):
    from conftest import run_cli

    cache = FeatureCache(tmp_path)
    for n in range(4):
        cache.get_or_build({"kind": "bank", "n": n}, counting_build([]))
    paths = [cache.path_for({"kind": "bank", "n": n}) for n in range(4)]
    paths[0].write_bytes(paths[0].read_bytes()[:-20])  # truncated
    paths[1].write_bytes(b"\x00" * 3)  # not even a header
    flip_a_byte(paths[2])  # only the checksum can tell
    foreign = cache.folder / "someone-elses.safetensors"
    foreign.write_bytes(b"not ours")

    listed = json.loads(run_cli("cache", "ls", "--cache-dir", tmp_path, "--json", check=True).stdout)
    damaged = {Path(e["path"]).name: e["damaged"] for e in listed["entries"]}
    assert set(damaged) == {p.name for p in paths}
    assert "truncated" in damaged[paths[0].name] and "too short" in damaged[paths[1].name]
    assert damaged[paths[2].name] is None and damaged[paths[3].name] is None
    verified = run_cli("cache", "ls", "--cache-dir", tmp_path, "--verify", check=True).stdout
    assert "DAMAGED: tensor" in verified and "checksum mismatch" in verified and "3 damaged" in verified

    assert "removed 3 entries" in run_cli("cache", "clear", "--cache-dir", tmp_path, "--damaged", check=True).stdout
    assert [p.exists() for p in paths] == [False, False, False, True]
    run_cli("cache", "clear", "--cache-dir", tmp_path, check=True)
    assert not paths[3].exists() and foreign.read_bytes() == b"not ours"


# --- keys follow content ------------------------------------------------------------------------------

def rewrite_keeping_size_and_mtime(path, content: bytes) -> None:
    stat = path.stat()
    assert len(content) == stat.st_size
    path.write_bytes(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns


def test_same_path_size_and_mtime_with_different_content_is_a_different_key(tmp_path):
    from clipfit.data.training import data_hash

    folder = write_pairs(tmp_path / "pairs", n=3)
    pairs = load_pairs(str(folder), "auto").pairs
    before = images_hash(pairs), data_hash(pairs), encoder_identity(str(folder / "img000.txt"))
    image = folder / "img001.png"
    rewrite_keeping_size_and_mtime(image, bytes(reversed(image.read_bytes())))
    rewrite_keeping_size_and_mtime(folder / "img000.txt", (folder / "img000.txt").read_bytes().upper())
    after = images_hash(pairs), data_hash(pairs), encoder_identity(str(folder / "img000.txt"))
    assert [b != a for b, a in zip(before, after)] == [True, True, True]


def test_a_touched_or_copied_file_keeps_its_key(tmp_path):
    from clipfit.cache import content_digest

    from clipfit.data.training import data_hash

    folder = write_pairs(tmp_path / "pairs", n=2)
    pairs = load_pairs(str(folder), "auto").pairs
    before = images_hash(pairs), data_hash(pairs)
    os.utime(folder / "img000.png", ns=(1, 1))
    assert (images_hash(pairs), data_hash(pairs)) == before  # so --resume accepts a touched folder
    copy = tmp_path / "copy.png"
    copy.write_bytes((folder / "img000.png").read_bytes())
    assert content_digest(copy) == content_digest(folder / "img000.png")


def test_large_files_are_keyed_by_samples_of_their_content_and_mtime(tmp_path):
    from clipfit import cache as cache_module

    path = tmp_path / "big.bin"
    size = cache_module.SMALL_FILE + 1000
    path.write_bytes(bytes(size))
    digests = [cache_module.content_digest(path)]
    seventh_block = 7 * (size - cache_module.SAMPLE_BYTES) // (cache_module.SAMPLES - 1)
    for offset in (size - 1, seventh_block + 10):  # sampled bytes, same size and mtime
        data = bytearray(path.read_bytes())
        data[offset] = 1
        rewrite_keeping_size_and_mtime(path, bytes(data))
        digests.append(cache_module.content_digest(path))
    data = bytearray(path.read_bytes())
    data[seventh_block - 10] = 1  # between samples: seen through the modification time
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 1))
    digests.append(cache_module.content_digest(path))
    assert len(set(digests)) == 4


def test_resume_checks_the_pairs_by_content(tiny_config, tmp_path, capsys):
    from conftest import run_main, tiny_refine_args

    pairs, out = write_pairs(tmp_path / "pairs", n=16), tmp_path / "run"
    assert run_main(tiny_refine_args(pairs, out, tiny_config, "--max-steps", "1")) == 0
    image, original = pairs / "img003.png", (pairs / "img003.png").read_bytes()
    rewrite_keeping_size_and_mtime(image, bytes(reversed(original)))
    capsys.readouterr()
    assert run_main(tiny_refine_args(pairs, out, tiny_config, "--resume")) == 2
    assert "--resume refused: the pairs in" in capsys.readouterr().err


def test_runs_started_by_0_1_0_are_resumable_by_their_stat_hash(tmp_path):
    from clipfit.data.check import CheckReport
    from clipfit.data.training import RunData, data_hash, same_data, stat_data_hash

    pairs = load_pairs(str(write_pairs(tmp_path / "pairs", n=3)), "auto").pairs
    data = RunData(pairs, [], CheckReport(root=str(tmp_path), layout="sidecar", usable=pairs), data_hash(pairs))
    assert same_data(data_hash(pairs), data) and same_data(stat_data_hash(pairs), data)
    assert not same_data("0" * 16, data)


# --- a real run on a damaged cache ------------------------------------------------------------------

def test_refine_rebuilds_damaged_entries_and_trains_as_on_a_sound_cache(tiny_config, tmp_path):
    from safetensors.torch import load_file

    from clipfit.cache import read_header
    from conftest import run_cli, tiny_refine_args

    cache = tmp_path / "cache"
    write_pairs(tmp_path / "pairs", n=8)

    def refine(name: str):
        result = run_cli(*tiny_refine_args(tmp_path / "pairs", tmp_path / name, tiny_config, "--method", "refine",
                                           "--lock-text", "--max-steps", "2", "--cache-dir", cache))
        assert result.returncode == 0, result.stderr
        return result.stderr, load_file(str(tmp_path / name / "model.safetensors"))

    _, sound = refine("first")
    entries = sorted((cache / "features").glob("*.safetensors"))
    # the training rows, and the measurements' rows of the locked text tower
    assert {p.name.rsplit("-", 1)[0] for p in entries} == {"locked-rows", "teacher-rows", "eval-rows"}
    for entry in entries:
        flip_a_byte(entry, from_end=7)
    warnings, flipped = refine("flipped")
    assert warnings.count("is damaged (tensor") == 3 and "checksum mismatch" in warnings
    assert all(torch.equal(flipped[k], sound[k]) for k in sound)

    for entry in entries:  # each replaced by a sound entry for the same key, but with half the rows
        stored = FeatureCache(cache)
        key_parts = json.loads(read_header(entry)["__metadata__"]["key_parts"])
        stored.put(key_parts, {name: t[:4] for name, t in load_file(str(entry)).items()}, torch.float32)
    warnings, replaced = refine("replaced")
    assert warnings.count("rows, ") == 3 and "are needed" in warnings and "IndexError" not in warnings
    assert all(torch.equal(replaced[k], sound[k]) for k in sound)


def test_cache_commands_default_to_the_folder_refine_writes_into(tiny_config, tmp_path, monkeypatch):
    """Without --cache-dir, `clipfit cache ls/clear` find the entries refine wrote (both resolve the
    folder through clipfit.cache.resolve_cache_dir: $XDG_CACHE_HOME/clipfit here)."""
    from conftest import run_cli, tiny_refine_args

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_pairs(tmp_path / "pairs", n=8)
    run_cli(*tiny_refine_args(tmp_path / "pairs", tmp_path / "run", tiny_config, "--method", "refine",
                              "--lock-text", "--max-steps", "1"), check=True)
    listed = json.loads(run_cli("cache", "ls", "--json", check=True).stdout)
    assert listed["cache_dir"] == str(tmp_path / "xdg" / "clipfit")
    assert sorted(e["kind"] for e in listed["entries"]) == ["eval-rows", "locked-rows", "teacher-rows"]
    assert json.loads(run_cli("cache", "ls", "--cache-dir", tmp_path / "other", "--json", check=True).stdout)["entries"] == []
    assert "removed 3 entries" in run_cli("cache", "clear", check=True).stdout
    assert list((tmp_path / "xdg" / "clipfit" / "features").glob("*.safetensors")) == []
    assert (tmp_path / "run" / "model.safetensors").is_file()
