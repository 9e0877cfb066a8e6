"""Distributed data parallel on CPU (gloo): two processes with batch 4 each train what one
process with batch 8 does, because the contrastive loss gathers features across ranks."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, run_cli, tiny_refine_args, write_pairs


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=16)
    common = ["--epochs", "1", "--lr", "1e-3", "--log-every", "1"]
    one = run_cli(*tiny_refine_args(pairs, tmp_path / "one", tiny_config, *common))
    assert one.returncode == 0, one.stderr
    two_args = tiny_refine_args(pairs, tmp_path / "two", tiny_config, *common)
    two_args[two_args.index("--batch-size") + 1] = "4"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "clipfit", *two_args], capture_output=True, text=True, env=cli_env(), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)  # rank 0 alone logs
    single, parallel = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    # Attention key biases get no gradient in exact arithmetic (softmax ignores a shift), so Adam
    # turns rounding noise into steps of up to lr: weights agree to 1e-4 (lr 1e-3, 2 steps), not bitwise.
    for name in single:
        assert torch.allclose(single[name], parallel[name], atol=1e-4, rtol=0), name
