"""Work done once per run under torchrun: shard_range, gather_rows and FeatureCache's shared build.

The two-process test starts its own gloo group (no torchrun, no model) so that unequal and
empty shares are covered in a few seconds; tests/test_distributed.py runs whole methods.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipfit.features import FeatureCache, items_built_by_rank
from clipfit.distributed import Distributed, gather_rows, shard_range


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shard_range_covers_every_item_once_in_rank_order(world_size):
    for n in range(0, 12):
        shares = [shard_range(n, Distributed(rank, world_size)) for rank in range(world_size)]
        assert [i for share in shares for i in share] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_gather_rows_in_one_process_is_the_identity():
    tensors = {"rows": torch.randn(3, 2), "counts": torch.tensor([1, 2, 0])}
    assert gather_rows(tensors, Distributed()) is tensors


def test_one_process_builds_the_whole_range_and_the_entry_is_shared_by_later_calls(tmp_path):
    parts = []

    def build(part):
        parts.append(part)
        return {"rows": torch.arange(len(part) * 2.0).reshape(-1, 2)}

    cache = FeatureCache(tmp_path)
    first = cache.get_or_build({"kind": "bank"}, build, shards=Distributed(), items=4)
    assert parts == [range(0, 4)] and first["rows"].shape == (4, 2)
    assert items_built_by_rank(cache, ["bank"], Distributed()) == {"bank": [4]}
    later = FeatureCache(tmp_path)
    assert torch.equal(later.get_or_build({"kind": "bank"}, build, items=4)["rows"], first["rows"])
    assert len(parts) == 1 and items_built_by_rank(later, ["bank"], Distributed()) == {"bank": [0]}


def rank_main(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    state = Distributed(rank, world_size)
    try:
        # unequal rows, and a name only rank 0 has
        gathered = gather_rows({"x": torch.full((rank + 1, 2), float(rank)),
                                **({"only_rank_0": torch.ones(1)} if rank == 0 else {})}, state)
        cache, calls = FeatureCache(f"{folder}/cache"), []

        def build(part):  # items own 1 + i rows, like regions per image
            calls.append([part.start, part.stop])
            return {"rows": torch.cat([torch.full((1 + i, 1), float(i)) for i in part]),
                    "counts": torch.tensor([1 + i for i in part])}

        three = cache.get_or_build({"kind": "three"}, build, shards=state, items=3)
        one = cache.get_or_build({"kind": "one"}, build, shards=state, items=1)  # rank 0's share is empty
        again = FeatureCache(f"{folder}/cache").get_or_build({"kind": "three"}, build, shards=state, items=3)
        searched = cache.get_or_build({"kind": "once"}, lambda: calls.append("once") or {"v": torch.ones(2)},
                                      shards=state)
        report = {"x": gathered["x"][:, 0].tolist(), "names": sorted(gathered), "calls": calls,
                  "three": three["rows"].flatten().tolist(), "counts": three["counts"].tolist(),
                  "one": one["rows"].flatten().tolist(), "again": torch.equal(again["rows"], three["rows"]),
                  "once": searched["v"].tolist(), "by_rank": items_built_by_rank(cache, ["three", "one"], state)}
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_build_one_entry_from_their_shares(tmp_path):
    mp.spawn(rank_main, args=(2, str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["x"] == [0.0, 1.0, 1.0] and report["names"] == ["only_rank_0", "x"]
        assert report["three"] == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0] and report["counts"] == [1, 2, 3]
        assert report["one"] == [0.0] and report["again"] and report["once"] == [1.0, 1.0]
        assert report["by_rank"] == {"three": [1, 2], "one": [0, 1]}
    assert reports[0]["calls"] == [[0, 1], "once"]  # rank 0 alone searches; nobody builds on a hit
    assert reports[1]["calls"] == [[1, 3], [0, 1]]
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 3
