"""How fast images come out of a Parquet table, in order and in random (training) order, with the
row-group cache holding the whole table or only two row groups (as for a table larger than it).

    python benchmarks/table_reading.py [--images 600] [--row-group 100] [--size 128]

Prints a markdown table for docs/performance.md. Images are noise PNGs (incompressible, like photos).
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_table(path: Path, images: int, row_group: int, size: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    cells = []
    for _ in range(images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    table = pa.table({"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "text": [f"picture {i}" for i in range(images)]})
    pq.write_table(table, path, row_group_size=row_group)
    return path.stat().st_size


def images_per_second(pairs, order: list[int], cache_bytes: int) -> tuple[float, int]:
    from clipfit.data import tables
    from clipfit.data.images import open_rgb

    tables.CACHE = tables.RowGroupCache(cache_bytes)
    reads = 0
    original = tables.read_group

    def counting(*args):
        nonlocal reads
        reads += 1
        return original(*args)

    tables.read_group = counting
    try:
        started = time.perf_counter()
        for i in order:
            open_rgb(pairs[i].image)
        return len(order) / (time.perf_counter() - started), reads
    finally:
        tables.read_group = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--row-group", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clipfit.data.layouts import load_pairs

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.parquet"
        file_bytes = write_table(path, args.images, args.row_group, args.size)
        started = time.perf_counter()
        pairs = load_pairs(path).pairs
        listing = time.perf_counter() - started
        group_bytes = file_bytes // -(-args.images // args.row_group)
        shuffled = list(range(len(pairs)))
        random.Random(0).shuffle(shuffled)
        print(f"{args.images} noise PNGs of {args.size}x{args.size} px, {file_bytes / 2**20:.1f} MiB, "
              f"row groups of {args.row_group} ({group_bytes / 2**20:.1f} MiB); listing took {listing:.2f} s\n")
        print("| order | row-group cache | images/s | row groups read |")
        print("|---|---|---:|---:|")
        for order_name, order in (("in order", list(range(len(pairs)))), ("random", shuffled)):
            for cache_name, cache in (("whole table", 4 * file_bytes), ("2 row groups", 2 * group_bytes)):
                rate, reads = images_per_second(pairs, order, cache)
                print(f"| {order_name} | {cache_name} | {rate:.0f} | {reads} |")


if __name__ == "__main__":
    main()
