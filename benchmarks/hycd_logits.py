"""What `--hycd-logits auto` chooses for a model: the starting model as HyCD's in-batch teacher.

For each model, encodes the first --pairs pairs of PAIRS (each image with its first caption),
cuts them into batches of --batch-size, and prints, for raw-dot and scaled-cos logits, the mean
probability the teacher's softmax gives the true pair and its in-batch top-1 (the numbers
clipfit.methods.refine.probe_hycd_logits decides by), plus how much of the raw dot product's
spread comes from the text norms (their correlation with a caption's mean probability).

    python benchmarks/hycd_logits.py PAIRS --model lite0-minilm@aligned --model ViT-B-32@none
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import torch


def probe(spec: str, pairs, batch_size: int) -> dict:
    from clipfit import models
    from clipfit.methods.refine import probe_hycd_logits, starting_embeddings

    name, _, weights = spec.partition("@")
    torch.manual_seed(0)
    loaded = models.load_model(name, weights or "none")
    config = SimpleNamespace(max_image_pixels=89_478_485)
    ctx = SimpleNamespace(model=loaded.model, loaded=loaded, config=config, device=torch.device("cpu"))
    image, text = starting_embeddings(ctx, pairs)
    scale = float(loaded.model.logit_scale.exp())
    found = probe_hycd_logits(image, text, scale, batch_size)
    probabilities = torch.softmax(image @ text.T, dim=0).mean(0)  # each caption's mean probability over images
    norms = text.norm(dim=-1)
    found["text_norm_vs_caption_mean_probability"] = float(torch.corrcoef(torch.stack([norms, probabilities]))[0, 1])
    found["mean_norms"] = {"image": float(image.norm(dim=-1).mean()), "text": float(norms.mean())}
    found["logit_scale"] = scale
    return found


def main(argv: list[str]) -> None:
    from clipfit.data.layouts import load_pairs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs")
    parser.add_argument("--model", action="append", required=True, help="ARCH@WEIGHTS (weights: a tag, a file or none)")
    parser.add_argument("--pairs", dest="n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    pairs = load_pairs(args.pairs, "auto").pairs[:args.n]
    print(json.dumps({spec: probe(spec, pairs, args.batch_size) for spec in args.model}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
