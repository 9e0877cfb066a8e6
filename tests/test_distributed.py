"""Distributed data parallel on CPU (gloo): two processes with batch 4 each train what one
process with batch 8 does, because the losses gather features across ranks; PING's and DCLIP's
frozen banks are encoded once, half by each process, and DCLIP's teacher is trained once."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, repeat_captions, run_cli, tiny_refine_args, write_pairs
from clipfit.io import read_jsonl


def torchrun_two(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "clipfit", *args], capture_output=True, text=True, env=cli_env(), timeout=600)


def one_and_two_processes(pairs, tmp_path, tiny_config, common: list[str]) -> None:
    """Run `common` as 1 process with batch 8 (tmp_path/one) and 2 with batch 4 (tmp_path/two),
    each with its own feature cache (cache1, cache2)."""
    one = run_cli(*tiny_refine_args(pairs, tmp_path / "one", tiny_config, *common, "--cache-dir", tmp_path / "cache1"))
    assert one.returncode == 0, one.stderr
    two_args = tiny_refine_args(pairs, tmp_path / "two", tiny_config, *common, "--cache-dir", str(tmp_path / "cache2"))
    two_args[two_args.index("--batch-size") + 1] = "4"
    two = torchrun_two(two_args)
    assert two.returncode == 0, two.stderr[-3000:]


def cache_entries(folder):
    return {path.name: load_file(str(path)) for path in sorted((folder / "features").iterdir())}


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_config):
    # The frozen teacher's and the locked text tower's rows are precomputed, each rank its half;
    # no term uses the model's logit scale (refine's clip weight is 0, lite's critic is its own),
    # and lite's negatives, prior draws and critic are over the global batch.
    pairs = write_pairs(tmp_path / "pairs", n=16)
    common = ["--method", "refine+lite", "--lite-critic", "learned", "--lite-negatives", "shuffle",
              "--lite-prior-weight", "0.1", "--lock-text", "--epochs", "1", "--lr", "1e-3", "--log-every", "1"]
    one_and_two_processes(pairs, tmp_path, tiny_config, common)

    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)  # rank 0 alone logs
    locked = [json.loads((tmp_path / run / "run.json").read_text())["locked_towers"] for run in ("one", "two")]
    assert [facts["items_encoded_by_rank_0"] for facts in locked] == [16, 8] and locked[1]["towers"]["text"]["rows"] == 16
    single, parallel = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    # Attention key biases get no gradient in exact arithmetic (softmax ignores a shift), so Adam
    # turns rounding noise into steps of up to lr: weights agree to 1e-4 (lr 1e-3, 2 steps), not bitwise.
    for name in single:
        assert torch.allclose(single[name], parallel[name], atol=1e-4, rtol=0), name


def test_ping_and_dclip_banks_are_encoded_once_in_shares_and_train_as_one_process(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=16, captions_per_image=2)
    common = ["--method", "ping+dclip", "--epochs", "1", "--lr", "1e-3", "--log-every", "1",
              "--dclip-teacher-epochs", "2", "--ping-k", "2"]  # k 2: neighbour picks are drawn per step
    one_and_two_processes(pairs, tmp_path, tiny_config, common)

    facts = [json.loads((tmp_path / run / "run.json").read_text())["methods"] for run in ("one", "two")]
    assert facts[0]["ping"]["bank_items_encoded_by_rank"] == {"ping-image": [16], "ping-text": [16]}
    assert facts[1]["ping"]["bank_items_encoded_by_rank"] == {"ping-image": [8, 8], "ping-text": [8, 8]}
    assert facts[1]["dclip"]["pairs encoded by rank"] == {"dclip-regions": [8, 8], "dclip-tokens": [8, 8]}
    assert facts[1]["dclip"]["stage 1"].startswith("teacher trained 2 epoch(s)")

    # the same entries (same keys), holding the same numbers: one file per bank, written by rank 0
    single, parallel = cache_entries(tmp_path / "cache1"), cache_entries(tmp_path / "cache2")
    assert sorted(single) == sorted(parallel) and len(single) == 6  # 5 banks and the frozen teacher's rows
    for name, tensors in single.items():
        for key, value in tensors.items():
            assert torch.allclose(value.float(), parallel[name][key].float(), atol=2e-3, rtol=0), (name, key)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    teachers = [load_file(str(tmp_path / run / "teacher.safetensors")) for run in ("one", "two")]
    for name in teachers[0]:
        assert torch.allclose(teachers[0][name], teachers[1][name], atol=1e-6, rtol=0), name  # global batch

    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    terms = ("loss", "clip", "nn", "xnn", "dclip_img", "dclip_txt", "dclip_con")
    assert len(rows[0]) == 2
    for single_row, parallel_row in zip(*rows):
        assert {t: parallel_row[t] for t in terms} == pytest.approx({t: single_row[t] for t in terms}, abs=1e-5)


def test_positives_are_gathered_across_processes_with_the_features(tmp_path, tiny_config):
    """Three captions over a global batch of 8: every caption of one rank's 4 pairs repeats on the
    other rank or its own. Multi-positive targets are built from the gathered groups, so two processes
    train what one does; the step logs of a one-hot run differ (the targets did change)."""
    pairs = repeat_captions(write_pairs(tmp_path / "pairs", n=16), kinds=3)
    common = ["--method", "contrastive+refine+lite", "--lite-critic", "learned", "--lite-negatives", "shuffle",
              "--epochs", "1", "--lr", "1e-3", "--log-every", "1"]
    one_and_two_processes(pairs, tmp_path, tiny_config, common)
    one_hot = run_cli(*tiny_refine_args(pairs, tmp_path / "one-hot", tiny_config, *common, "--no-multi-positive",
                                        "--cache-dir", tmp_path / "cache1"))
    assert one_hot.returncode == 0, one_hot.stderr

    terms = ("loss", "clip", "rafa", "hycd", "lite")
    rows = {run: [{t: row[t] for t in terms} for row in read_jsonl(tmp_path / run / "metrics.jsonl")]
            for run in ("one", "two", "one-hot")}
    assert len(rows["one"]) == 2
    for single, parallel in zip(rows["one"], rows["two"]):
        assert parallel == pytest.approx(single, abs=1e-5)
    assert rows["one-hot"][0]["lite"] != pytest.approx(rows["one"][0]["lite"], abs=1e-3)
    single, parallel = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    for name in single:  # as in the first test: Adam turns rounding noise on gradient-free biases into steps
        assert torch.allclose(single[name], parallel[name], atol=1e-4, rtol=0), name
