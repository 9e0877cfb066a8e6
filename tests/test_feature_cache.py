"""The on-disk feature cache: hits, misses, invalidation, damaged entries, listing and clearing."""

from __future__ import annotations

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
