"""One AdamW step on CPU: torch's per-parameter loop (its CPU default, and open_clip's trainer's)
against its fused kernel, which clipfit's optimiser uses.

    python benchmarks/adamw_step.py [--repeats 7] [--threads 2]

The parameters have the starter's shapes and count (an EfficientNet-Lite0 trunk and a
MiniLM-L6 text tower, about 34M weights in 219 tensors), random values and gradients. Printed:
the median seconds of a step of each and the largest difference of the updated weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(1152, 192, 1, 1)] * 20 + [(384, 1536)] * 12 + [(1536, 384)] * 12 + [(384, 384)] * 24 + [(30522, 384)] + [(96,)] * 150


def stepped(kind: dict, values: list[torch.Tensor], grads: list[torch.Tensor], repeats: int):
    params = [torch.nn.Parameter(v.clone()) for v in values]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, **kind)
    optimizer.step()  # the first step allocates the moments
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    values = [torch.randn(shape) for shape in SHAPES]
    grads = [torch.randn(shape) for shape in SHAPES]
    loop, a = stepped({"foreach": False}, values, grads, args.repeats)
    fused, b = stepped({"fused": True}, values, grads, args.repeats)
    difference = max((x - y).abs().max().item() for x, y in zip(a, b))
    print(f"{sum(v.numel() for v in values) / 1e6:.1f}M weights in {len(values)} tensors, {args.threads} thread(s), "
          f"median of {args.repeats}: per-parameter loop {loop * 1000:.0f} ms, fused {fused * 1000:.0f} ms "
          f"({loop / fused:.1f}x); largest difference of the weights {difference:.1e}")


if __name__ == "__main__":
    main()
