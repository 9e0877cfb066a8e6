"""Nearest neighbours of every item of a frozen feature bank, by inner product (faiss-cpu).

The bank's rows are L2-normalised, so inner product is cosine similarity. Search runs once,
before training, in chunks of queries so memory stays at the index plus one chunk.

Exact search (`IndexFlatIP`) is the default; above IVF_THRESHOLD items `auto` switches to an
inverted-file index (`IndexIVFFlat`, NLIST_PER_SQRT_N·√N lists, NPROBE probed), which scans
about NPROBE/nlist of the bank per query: much faster, but a true neighbour in an unprobed list
is missed (recall below 1; docs/methods.md gives measured numbers).

Candidates from faiss are re-scored in float64 and ordered by (score descending, index
ascending), so ties break towards the lower index and the result does not depend on faiss's
threading or BLAS rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

IVF_THRESHOLD = 100_000
NLIST_PER_SQRT_N = 4
NPROBE = 8
TIE_SLACK = 8  # extra candidates fetched so equal scores at the k-th place are all seen
QUERY_CHUNK = 2048


def index_kind(n: int, requested: str = "auto") -> str:
    """'flat' or 'ivf' for a bank of n items under --ping-index `requested`."""
    if requested not in ("auto", "flat", "ivf"):
        raise ValueError(f"index must be auto, flat or ivf, not {requested!r}")
    if requested == "auto":
        return "ivf" if n > IVF_THRESHOLD else "flat"
    return requested


def build_index(vectors: np.ndarray, kind: str):
    """A faiss inner-product index over float32 `vectors` (N×d), trained if it needs training."""
    import faiss

    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, min(int(NLIST_PER_SQRT_N * math.sqrt(n)), n // 16))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample, few iterations: coarse centroids are enough to route queries
        index.cp.niter, index.cp.seed, index.cp.spherical = 8, 0, True
        index.cp.max_points_per_centroid, index.cp.min_points_per_centroid = 16, 1
        index.train(vectors)
        index.nprobe = min(NPROBE, nlist)
    index.add(vectors)
    return index


def rescore(queries: np.ndarray, bank: np.ndarray, candidates: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Top-k of `candidates` (rows of -1 allowed) by float64 inner product, self and -1 excluded,
    ties to the lower index. Returns indices, -1 where fewer than k candidates were valid."""
    safe = np.where(candidates < 0, 0, candidates)
    scores = np.einsum("qd,qmd->qm", queries.astype(np.float64), bank[safe].astype(np.float64))
    invalid = (candidates < 0) | (candidates == query_ids[:, None])
    scores[invalid] = -np.inf
    order = np.lexsort((candidates, -scores), axis=-1)[:, :k]
    chosen = np.take_along_axis(candidates, order, axis=1)
    chosen[np.take_along_axis(invalid, order, axis=1)] = -1
    return chosen


def nearest_neighbours(bank: Tensor, k: int = 1, index: str = "auto", chunk: int = QUERY_CHUNK) -> Tensor:
    """The k nearest other items of every row of `bank` (N×d), as an N×k int64 tensor, nearest first.

    NN(i) = argmax_{j≠i} b_i·b_j; rows are expected L2-normalised. The item itself is excluded
    even when a duplicate row scores as high.
    """
    n = bank.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < N to find k neighbours besides the item itself (k={k}, N={n})")
    vectors = np.ascontiguousarray(bank.detach().float().cpu().numpy())
    kind = index_kind(n, index)
    faiss_index = build_index(vectors, kind)
    fetch = min(n, k + 1 + TIE_SLACK)
    found = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        queries = vectors[start:start + chunk]
        ids = np.arange(start, start + len(queries))
        _, candidates = faiss_index.search(queries, fetch)
        found[start:start + len(queries)] = rescore(queries, vectors, candidates, ids, k)
    missing = np.flatnonzero((found < 0).any(axis=1))
    if len(missing):  # an IVF probe can come back short: search those few rows exactly
        exact = build_index(vectors, "flat")
        _, candidates = exact.search(vectors[missing], fetch)
        found[missing] = rescore(vectors[missing], vectors, candidates, missing, k)
    return torch.from_numpy(found)
