"""The text tower alone: forward + backward of a batch of typical captions, padded vs trimmed.

    python benchmarks/trim_text_tower.py [--captions 32] [--repeats 2] [--json out.json]

For the offline starter `lite0-minilm` (MiniLM, Hugging Face tower) and the reduced ViT-B/32 of
benchmarks/throughput.py with context 77 (CLIP's causal text transformer, random weights):
`model.encode_text` on the padded batch (what open_clip and clipfit 0.1.0 run) against
`clipfit.models.encode_text` (trimmed to the batch's longest caption), each followed by a
backward pass, alternately. Times are CPU seconds of this one-thread process, which a shared
machine's load does not stretch; the largest differences of features and of gradients (relative
to the tower's largest gradient entry) are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def load(name: str, work: Path):
    from clipfit.models import load_model
    from throughput import VIT_77_CFG

    if name == "starter":
        return load_model("lite0-minilm", "aligned")
    config = work / "bench-vit-77.json"
    config.write_text(json.dumps(VIT_77_CFG))
    torch.manual_seed(0)
    return load_model(str(config), "none")


def pass_once(model, tokens, encode) -> tuple[float, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    started = time.process_time()
    features = encode(model, tokens)
    features.square().sum().backward()
    seconds = time.process_time() - started
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return seconds, features.detach(), grads


def main() -> None:
    import tempfile

    from clipfit.data.tokens import text_trim_rule, trim_tokens
    from clipfit.models import encode_text
    from throughput import typical_captions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default="starter,vit")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work, report = Path(tempfile.mkdtemp(prefix="trim-bench-")), {}
    captions = typical_captions(args.captions, seed=1)
    for name in args.models.split(","):
        loaded = load(name, work)
        model = loaded.model.eval()  # no dropout: both passes compute the same function
        tokens = loaded.tokenizer(captions)
        width = trim_tokens(tokens, text_trim_rule(model)).shape[1]
        times = {"padded": [], "trimmed": []}
        contenders = {"padded": lambda m, t: m.encode_text(t), "trimmed": encode_text}
        for r in range(args.repeats):
            for label in list(contenders)[r % 2:] + list(contenders)[:r % 2]:
                seconds, features, grads = pass_once(model, tokens, contenders[label])
                times[label].append(seconds)
                if label == "padded":
                    padded = (features, grads)
                else:
                    trimmed = (features, grads)
        feature_difference = float((padded[0] - trimmed[0]).abs().max())
        # against the largest gradient entry of the tower: some gradients are zero in exact arithmetic
        # (attention key biases shift every score of a query alike), so their own scale is float noise
        scale = max(float(g.abs().max()) for g in padded[1].values())
        relative_gradient = max(float((padded[1][n] - trimmed[1][n]).abs().max()) for n in padded[1]) / scale
        medians = {label: statistics.median(t) for label, t in times.items()}
        report[name] = {"context": tokens.shape[1], "trimmed_to": width, "cpu_seconds": times, "median": medians,
                        "speedup": medians["padded"] / medians["trimmed"], "feature_difference": feature_difference,
                        "largest_relative_gradient_difference": relative_gradient}
        print(f"{name}: {args.captions} captions, {tokens.shape[1]} -> {width} tokens; forward+backward CPU s "
              f"padded {medians['padded']:.2f}, trimmed {medians['trimmed']:.2f} ({report[name]['speedup']:.1f}x); "
              f"largest feature difference {feature_difference:.2g}, gradient {relative_gradient:.2g} (relative)",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
