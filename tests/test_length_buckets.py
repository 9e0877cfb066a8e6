"""--length-buckets: batches of similar-length captions, every item still once per epoch."""

from __future__ import annotations

import json
import random
import statistics

from clipfit.data.dataset import EpochBatches
from conftest import run_cli, tiny_refine_args, write_pairs

N, BATCH = 403, 8
LENGTHS = [random.Random(i).randint(5, 40) for i in range(N)]


def batches(lengths=None, epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    sampler = EpochBatches(N, BATCH, seed=3, epoch=epoch, start=start, rank=rank, world_size=world_size,
                           lengths=lengths)
    return [[index for _, index in batch] for batch in sampler]


def by_length(epoch: int, index: int) -> int:
    return LENGTHS[index]


def spread(groups: list[list[int]]) -> float:
    return statistics.mean(max(LENGTHS[i] for i in g) - min(LENGTHS[i] for i in g) for g in groups)


def test_buckets_keep_every_item_once_and_group_similar_lengths():
    plain, bucketed = batches(), batches(by_length)
    assert len(bucketed) == len(plain) == N // BATCH and all(len(b) == BATCH for b in bucketed)
    used = [i for b in bucketed for i in b]
    assert len(set(used)) == len(used) == len(plain) * BATCH
    assert spread(bucketed) < spread(plain) / 4  # the longest caption of a batch is what gets encoded
    assert sum(max(LENGTHS[i] for i in b) for b in bucketed) < 0.8 * sum(max(LENGTHS[i] for i in b) for b in plain)


def test_buckets_depend_on_seed_and_epoch_only_and_resume_mid_epoch():
    assert batches(by_length) == batches(by_length)
    assert batches(by_length, epoch=1) != batches(by_length, epoch=0)
    assert batches(by_length, start=7) == batches(by_length)[7:]
    # two ranks together see what one process sees with the global batch
    one = EpochBatches(N, 2 * BATCH, seed=3, epoch=0, lengths=by_length)
    ranks = [batches(by_length, rank=r, world_size=2) for r in (0, 1)]
    assert [[i for _, i in b] for b in one] == [a + b for a, b in zip(*ranks)]


def test_refine_with_length_buckets_trains_and_records_the_setting(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=16, captions_per_image=2)
    run_cli(*tiny_refine_args(pairs, tmp_path / "run", tiny_config, "--length-buckets", "--max-steps", "2"), check=True)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["config"]["length_buckets"] is True and info["steps"] == 2
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_length_buckets_refuse_a_stream(tmp_path, tiny_config):
    result = run_cli(*tiny_refine_args(tmp_path, tmp_path / "run", tiny_config, "--layout", "webdataset",
                                       "--length-buckets"))
    assert result.returncode == 2 and "--length-buckets" in result.stderr and len(result.stderr.strip().splitlines()) == 1
