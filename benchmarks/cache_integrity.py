"""What the feature cache's integrity checks cost: writing an entry (checksums included), its
first map in a process (checksums compared: the whole file read once), later maps (header only),
and the content digest of data files (whole below SMALL_FILE, sampled above).

    python benchmarks/cache_integrity.py [--mib 256] [--images 2000] [--image-kib 100]

Prints a Markdown table for docs/performance.md. Each number is the median of --repeats runs;
the file is in the page cache after the first write, so these are CPU costs, not disk reads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(function, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    from clipfit import cache as cache_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="entry size (float16 rows of 512)")
    parser.add_argument("--images", type=int, default=2000, help="data files to digest")
    parser.add_argument("--image-kib", type=int, default=100, help="size of each data file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        rows = args.mib * 2**20 // (512 * 2)
        bank = {"bank": torch.randn(rows, 512)}
        cache = cache_module.FeatureCache(root)
        key = {"kind": "bench"}
        put = timed(lambda: cache.put(key, bank), args.repeats)
        half = bank["bank"].half()
        checksum = timed(lambda: cache_module.tensor_checksum(half), args.repeats)

        def first_map():
            cache_module._VERIFIED.clear()
            cache.get(key)
        first = timed(first_map, args.repeats)
        later = timed(lambda: cache.get(key), args.repeats)

        files = []
        for i in range(args.images):
            files.append(root / f"{i}.bin")
            files[-1].write_bytes(torch.randint(0, 256, (args.image_kib * 1024,), dtype=torch.uint8).numpy().tobytes())

        def digest_all():
            cache_module._DIGESTS.clear()
            for f in files:
                cache_module.content_digest(f)
        small = timed(digest_all, args.repeats)
        memo = timed(lambda: [cache_module.content_digest(f) for f in files], args.repeats)
        big = root / "big.bin"
        with open(big, "wb") as f:
            f.truncate(4 * 2**30)  # sparse: sampled reads cost the same on a real file

        def digest_big():
            cache_module._DIGESTS.clear()
            cache_module.content_digest(big)
        sampled = timed(digest_big, args.repeats)

    mib = args.mib
    import os

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| step | size | seconds | MiB/s |\n|---|---:|---:|---:|")
    print(f"| write an entry (float16, checksums included) | {mib} MiB | {put:.3f} | {mib / put:.0f} |")
    print(f"| of which the checksum | {mib} MiB | {checksum:.3f} | {mib / checksum:.0f} |")
    print(f"| first map in a process (checksums compared) | {mib} MiB | {first:.3f} | {mib / first:.0f} |")
    print(f"| later maps (header and layout only) | {mib} MiB | {later:.4f} | |")
    data_mib = args.images * args.image_kib / 1024
    print(f"| content digest of {args.images} files of {args.image_kib} KiB | {data_mib:.0f} MiB | {small:.3f} | "
          f"{data_mib / small:.0f} |")
    print(f"| the same again in the same process (memo) | {data_mib:.0f} MiB | {memo:.4f} | |")
    print(f"| sampled digest of one 4 GiB file ({cache_module.SAMPLES} x {cache_module.SAMPLE_BYTES // 1024} KiB) "
          f"| 4096 MiB | {sampled:.4f} | |")


if __name__ == "__main__":
    main()
