"""The processes of a run. Under `torchrun --nproc-per-node N -m clipfit refine ...` (RANK,
WORLD_SIZE, LOCAL_RANK set) every process trains on its slice of each global batch (EpochBatches,
ShardStream); only rank 0 writes the run folder and shows progress. Losses over the batch gather
features from all ranks (`StepInputs.gather`), so a 2-process run with --batch-size B computes
what one process with --batch-size 2B does.

Work done once per run rather than once per process uses `Distributed.from_main` (rank 0 does
it, the others receive the result) or, for encoding many items with a frozen model, the sharded
pattern: each rank takes `shard_range(n, state)`, encodes it, and `gather_rows` puts the rows
of every rank back together in item order (`build_in_shares`; clipfit.cache.FeatureCache
.get_or_build uses it for feature banks).

This module knows no model: methods, the feature cache and frozen work all import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def from_main(self, make: Callable[[], Any]) -> Any:
        """`make()` run on rank 0 only (it may write files), its result sent to every rank."""
        box = [make() if self.is_main else None]
        if self.active:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for in a single process)."""
        if self.active:
            dist.barrier()

    def stop(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def start_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun describes in the environment (a single process otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    state = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(state.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return state


def local_device(device: torch.device, state: Distributed) -> torch.device:
    return torch.device("cuda", state.local_rank) if device.type == "cuda" and state.active else device


def gather_features(local: torch.Tensor, state: Distributed) -> torch.Tensor:
    """Rows of every rank, in rank order; gradients flow through this rank's own rows only,
    as in open_clip's gather_features(gather_with_grad=False).

    Every rank computes the same loss over the gathered rows, so the true gradient of this
    rank's rows is the sum of all ranks' (identical) gradients, world_size times the local one;
    DDP then averages over ranks. The local rows carry that factor in their gradient (not their
    value), which makes a distributed step equal to a one-process step over the global batch.
    """
    if not state.active:
        return local
    parts = [torch.empty_like(local) for _ in range(state.world_size)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[state.rank] = local + (state.world_size - 1) * (local - local.detach())
    return torch.cat(parts)


def average_gradients(parameters: list[nn.Parameter], state: Distributed) -> None:
    """Average the gradients of trainable tensors DDP does not hold (method heads)."""
    if not state.active:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= state.world_size


def shard_range(n: int, state: Distributed) -> range:
    """This rank's contiguous share of n items: the ranks, in order, cover 0..n-1 exactly once.

    Shares differ by at most one item; with more ranks than items some shares are empty.
    Contiguous shares keep per-item outputs of variable length (several rows per item)
    in item order when `gather_rows` concatenates them rank by rank.
    """
    return range(n * state.rank // state.world_size, n * (state.rank + 1) // state.world_size)


def build_in_shares(build: Callable[[range], dict[str, torch.Tensor]], n: int,
                    state: Distributed) -> tuple[dict[str, torch.Tensor], int]:
    """`build(part)` on this rank's `shard_range` of n items, every rank's rows gathered in item
    order; and how many items this rank built."""
    part = shard_range(n, state)
    mine = build(part) if len(part) or not state.active else {}  # an empty share adds no rows
    return gather_rows(mine, state), len(part)


def gather_rows(tensors: dict[str, torch.Tensor], state: Distributed) -> dict[str, torch.Tensor]:
    """Every rank's `tensors`, concatenated along dim 0 in rank order, on every rank.

    Ranks may contribute different numbers of rows under each name, or leave a name out (no
    rows). Meant for CPU tensors computed without gradients, e.g. each rank's share of a feature
    bank; all of them pass through memory on every rank. With one process `tensors` is returned
    as it is.
    """
    if not state.active:
        return tensors
    # all_gather_object rather than all_gather: it takes different row counts (gloo's all_gather
    # needs equal sizes) and CPU tensors under NCCL. It pickles, but only between this run's own
    # processes, as torch's own transport; no file or user input is unpickled.
    shares: list = [None] * state.world_size
    dist.all_gather_object(shares, tensors)
    names = dict.fromkeys(name for share in shares for name in share)
    return {name: torch.cat([share[name] for share in shares if name in share]) for name in names}
