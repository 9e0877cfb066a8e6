"""WebDataset shards: `clipfit data shard` writes them, `--layout webdataset` streams them."""

import json
import tarfile

import pytest
from torch.utils.data import DataLoader

from clipfit.data.shards import ShardStream, find_shards
from clipfit.errors import UsageError
from clipfit.config import RefineConfig, validate
from clipfit.models import load_model
from conftest import COLOURS, run_cli, run_main, tiny_refine_args, write_pairs



@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    pairs = write_pairs(root / "pairs", n=20)  # one caption each: captions identify pairs
    (pairs / "broken.png").write_bytes(b"not a png")
    (pairs / "broken.txt").write_text("a broken image\n")
    result = run_cli("data", "shard", pairs, root / "shards", "--pairs-per-shard", "6")
    assert result.returncode == 0, result.stderr
    assert "wrote 20 pairs in 4 shard(s)" in result.stdout and "1 unusable" in result.stdout
    return root / "shards"


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(str(tiny_config), "none")


def stream(shards, tiny, **kwargs) -> ShardStream:
    settings = {"seed": 0, "batch_size": 4, "max_pixels": 10**8, "shuffle_buffer": 8} | kwargs
    return ShardStream(find_shards(shards), tiny.preprocess_val, tiny.tokenizer, **settings)


def keys(batches) -> list:
    return [tuple(row.tolist()) for batch in batches for row in batch["text"]]


def test_shards_hold_img2dataset_members(shards):
    assert json.loads((shards / "sizes.json").read_text()) == {"000000.tar": 6, "000001.tar": 6, "000002.tar": 6,
                                                               "000003.tar": 2}
    with tarfile.open(shards / "000000.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["000000000.json", "000000000.png", "000000000.txt"]
    assert find_shards(shards).count == 20


def test_an_epoch_is_whole_batches_shuffled_by_epoch_and_repeatable(shards, tiny):
    data = stream(shards, tiny)
    epoch0 = list(data)
    assert len(epoch0) == 5 and all(len(b["image"]) == 4 for b in epoch0)
    assert keys(list(data)) == keys(epoch0)
    data.move_to(1)
    assert keys(list(data)) != keys(epoch0)
    assert sorted(keys(epoch0)) == sorted(set(keys(epoch0)))  # one pass: no pair twice


def test_streamed_batches_carry_each_captions_positives_group(shards, tiny):
    from clipfit.data.dataset import caption_group

    captions = [f"a {COLOURS[i % len(COLOURS)]} picture number {i}" for i in range(20)]
    groups = [g for batch in stream(shards, tiny) for g in batch["group"].tolist()]
    assert sorted(groups) == sorted(caption_group(c) for c in captions)  # each of the 20 captions once


def test_ranks_and_workers_read_different_pairs(shards, tiny):
    rank0 = keys(stream(shards, tiny, rank=0, world_size=2))
    rank1 = keys(stream(shards, tiny, rank=1, world_size=2))
    assert len(rank0) == len(rank1) == 8  # 20 pairs // (4 x 2) = 2 batches per rank
    assert not set(rank0) & set(rank1)
    batches = list(DataLoader(stream(shards, tiny), batch_size=None, num_workers=2))
    # each worker reads its own shards (8 or 12 pairs here) and repeats them if it runs short
    assert len(batches) == 5 and len(set(keys(batches[:4]))) == 16


def test_resume_skips_the_batches_already_trained(shards, tiny):
    data = stream(shards, tiny)
    full = list(data)
    data.move_to(0, start=2)
    assert keys(list(data)) == keys(full[2:])


def test_streaming_refuses_val_split_and_image_cache():
    with pytest.raises(UsageError, match="webdataset"):
        validate(RefineConfig(layout="webdataset", val_split=0.1))


def test_refine_trains_on_streamed_shards(shards, tmp_path, tiny_config):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(shards, out, tiny_config, "--layout", "webdataset", "--method", "refine",
                                     "--epochs", "2")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["train_pairs"] == 20 and run["steps"] == 4
    assert run["teacher_forward_passes"] == 4  # no precompute for a stream: one teacher pass per step
    assert len(list((out / "eval-sample").glob("*.txt"))) == 20
