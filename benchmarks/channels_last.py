"""Convolutional image towers on CPU: the usual (NCHW) weight layout against channels-last.

    python benchmarks/channels_last.py [--batch-size 16] [--repeats 5] [--threads 2]

The starter's image trunk (timm `tf_efficientnet_lite0` at 224 px, random weights) runs a
forward pass (as evaluation does) and a forward + backward pass with BatchNorm statistics fixed
(as clipfit's training loop does), once with its weights as built and once after
converting it as `clipfit.models.use_channels_last` does, alternating, `--repeats` times each. Printed:
the median seconds of each, the largest difference of the outputs and of the gradients, and how
far each layout's float32 gradients are from a float64 pass (the rounding both layouts share).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

from clipfit.train import freeze_batchnorm


def timed(step, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return seconds


def forward_backward(model, images):
    model.zero_grad()
    out = model(images)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    usual = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    converted = copy.deepcopy(usual).to(memory_format=torch.channels_last)
    for model in (usual, converted):
        model.train()
        freeze_batchnorm(model)
    images = torch.randn(args.batch_size, 3, 224, 224)
    results = {}
    for model in (usual, converted):
        forward_backward(model, images)  # warm-up: oneDNN picks its kernels on the first call
    for what, run in (("forward", lambda m: m(images)), ("forward + backward", lambda m: forward_backward(m, images))):
        times = {"usual": [], "channels-last": []}
        for _ in range(args.repeats):  # alternate, so a shared machine's drift hits both alike
            for name, model in (("usual", usual), ("channels-last", converted)):
                with torch.set_grad_enabled(what != "forward"):
                    times[name] += timed(lambda: run(model), 1)
        results[what] = {name: statistics.median(t) for name, t in times.items()}
    out_a, grads_a = forward_backward(usual, images)
    out_b, grads_b = forward_backward(converted, images)
    print(f"tf_efficientnet_lite0, batch {args.batch_size}, 224 px, {args.threads} thread(s), "
          f"median of {args.repeats}:")
    for what, medians in results.items():
        print(f"  {what:<19} usual {medians['usual']:.2f} s, channels-last {medians['channels-last']:.2f} s, "
              f"{medians['usual'] / medians['channels-last']:.2f}x")
    _, exact = forward_backward(copy.deepcopy(usual).double(), images.double())
    print(f"  largest difference: outputs {(out_a - out_b).abs().max().item():.1e}, gradients "
          f"{largest_difference(grads_a, grads_b):.1e}; each layout's gradients against float64: usual "
          f"{largest_difference(grads_a, exact):.1e}, channels-last {largest_difference(grads_b, exact):.1e}")


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


if __name__ == "__main__":
    main()
