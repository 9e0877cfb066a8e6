"""Neighbour search: identical to brute force for exact search, usable at 200k items with IVF."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfit.neighbours import IVF_THRESHOLD, index_kind, nearest_neighbours


def brute_force(bank: torch.Tensor, k: int) -> torch.Tensor:
    """Every pair's score in float64, self excluded, ordered by (score desc, index asc)."""
    x = bank.double()
    scores = (x[:, None, :] * x[None, :, :]).sum(-1)
    scores.fill_diagonal_(-float("inf"))
    n = len(bank)
    order = [sorted(range(n), key=lambda j: (-scores[i, j].item(), j))[:k] for i in range(n)]
    return torch.tensor(order)


def random_bank(n: int, d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=generator), dim=-1).half()


@pytest.mark.parametrize("k", [1, 3])
def test_flat_search_equals_brute_force(k):
    bank = random_bank(300, 16, seed=k)
    assert torch.equal(nearest_neighbours(bank, k, "flat", chunk=64), brute_force(bank, k))


def test_ties_break_towards_the_lower_index_and_never_to_the_item_itself():
    bank = random_bank(40, 8, seed=5)
    bank[10] = bank[3]
    bank[25] = bank[3]  # 3, 10 and 25 are identical: each one's nearest are the other two
    found = nearest_neighbours(bank, 2, "flat")
    assert found[3].tolist() == [10, 25]
    assert found[10].tolist() == [3, 25]
    assert found[25].tolist() == [3, 10]
    assert torch.equal(found, brute_force(bank, 2))


def test_ivf_on_a_small_bank_still_excludes_self_and_fills_every_row():
    bank = random_bank(500, 16, seed=7)
    found = nearest_neighbours(bank, 2, "ivf")
    assert found.shape == (500, 2)
    assert (found >= 0).all() and (found != torch.arange(500)[:, None]).all()


def test_auto_switches_to_ivf_above_the_threshold():
    assert index_kind(IVF_THRESHOLD, "auto") == "flat"
    assert index_kind(IVF_THRESHOLD + 1, "auto") == "ivf"
    assert index_kind(10, "ivf") == "ivf"


def test_k_must_leave_room_for_excluding_self():
    with pytest.raises(ValueError, match="k < N"):
        nearest_neighbours(random_bank(3, 4, seed=0), 3)


def test_200k_bank_with_ivf_finds_true_neighbours_for_most_items():
    """Clustered like real embeddings; checked against exact search on 300 sampled items."""
    n, d = 200_000, 64
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4000, d, generator=generator), dim=-1)
    members = centres[torch.randint(0, 4000, (n,), generator=generator)]
    bank = F.normalize(members + 0.08 * torch.randn(n, d, generator=generator), dim=-1).half()
    found = nearest_neighbours(bank, 1, "auto")
    assert found.shape == (n, 1)
    sample = torch.from_numpy(np.random.default_rng(0).choice(n, 300, replace=False))
    scores = bank[sample].float() @ bank.float().T
    scores[torch.arange(300), sample] = -float("inf")
    recall = (scores.argmax(1) == found[sample, 0]).float().mean().item()
    assert recall > 0.8
