"""CLIP-Refine (Yamaguchi et al., CVPR 2025): RaFA + HyCD against a frozen copy of the start.

RaFA pulls the unnormalised image and text embeddings of a pair towards one shared random
point, which narrows the modality gap; HyCD distils the starting model's similarity structure,
softened towards the identity, so zero-shot knowledge is kept. See docs/methods.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipfit.losses import clip_loss, hycd_loss, rafa_loss
from clipfit.methods.base import Method, both_towers_read

PROBE_PAIRS = 256  # the first training pairs the HyCD logits choice looks at


def teacher_log_likelihood(logits: torch.Tensor) -> float:
    """Mean log-probability the teacher's soft target gives the true pair, both directions."""
    labels = torch.arange(len(logits))
    return -0.5 * float(F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def probe_hycd_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: float, batch_size: int) -> dict:
    """How good a teacher the starting model is with each form of HyCD logits, on in-batch targets.

    `image`, `text`: the starting model's unnormalised embeddings of matched pairs, cut into
    batches of `batch_size` (the step's global batch) as training would see them. Per form: in-batch image→text top-1
    and the mean log-probability softmax(G) gives the true pair. HyCD's target is α·I plus
    (1−α)·softmax(G/T): the form under which the teacher's softmax already puts more mass on the
    true pair gives the target the method intends; raw dot products of a model whose norms
    carry no meaning give a confident target on the wrong captions. Ties keep raw-dot (the authors').
    """
    forms = {"raw-dot": lambda i, t: i @ t.T,
             "scaled-cos": lambda i, t: logit_scale * F.normalize(i, dim=-1) @ F.normalize(t, dim=-1).T}
    found = {}
    for name, logits_of in forms.items():
        top1, likelihood, batches = 0.0, 0.0, 0
        for start in range(0, max(1, len(image) - 1), batch_size):
            i, t = image[start:start + batch_size].double(), text[start:start + batch_size].double()
            if len(i) < 2:
                continue
            logits = logits_of(i, t)
            top1 += float((logits.argmax(1) == torch.arange(len(i))).double().mean())
            likelihood += teacher_log_likelihood(logits)
            batches += 1
        found[name] = {"in_batch_top1": top1 / max(batches, 1), "mean_log_prob_true_pair": likelihood / max(batches, 1)}
    better = found["scaled-cos"]["mean_log_prob_true_pair"] > found["raw-dot"]["mean_log_prob_true_pair"]
    choice = "scaled-cos" if better else "raw-dot"
    return {"choice": choice, "pairs": len(image), "batch_size": batch_size, **found}


def describe_probe(probe: dict) -> str:
    raw, cos = probe["raw-dot"], probe["scaled-cos"]
    return (f"HyCD logits {probe['choice']} (--hycd-logits auto): on the first {probe['pairs']} training pairs in "
            f"batches of {probe['batch_size']}, the starting model as teacher gives the true pair a mean probability "
            f"of {math.exp(raw['mean_log_prob_true_pair']):.3f} with raw dot products (in-batch top-1 "
            f"{raw['in_batch_top1']:.2f}) and {math.exp(cos['mean_log_prob_true_pair']):.3f} with scaled cosines "
            f"(top-1 {cos['in_batch_top1']:.2f}); HyCD uses the form whose target puts more mass on the true pair")


@torch.no_grad()
def starting_embeddings(ctx, pairs, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting model's unnormalised embeddings of `pairs` (each image with its first caption)."""
    from clipfit.data.images import open_rgb
    from clipfit.models import base_model, evaluating

    model, loaded = base_model(ctx.model), ctx.loaded
    images, texts = [], []
    with evaluating(model):
        for start in range(0, len(pairs), 64):
            part = pairs[start:start + 64]
            pixels = torch.stack([loaded.preprocess_val(open_rgb(p.image, max_pixels)) for p in part])
            tokens = loaded.tokenizer([p.captions[0] for p in part])
            images.append(model.encode_image(pixels.to(ctx.device), normalize=False).float().cpu())
            texts.append(model.encode_text(tokens.to(ctx.device), normalize=False).float().cpu())
    return torch.cat(images), torch.cat(texts)


class Refine(Method):
    name = "refine"
    # `clip` is the contrastive term's name: 0 by default (the authors' lambda_cont = 0), settable.
    terms = {"rafa": 1.0, "hycd": 1.0, "clip": 0.0}
    teacher_towers = frozenset({"image", "text"})  # HyCD distils the teacher's image-text similarities

    def __init__(self, options, run):
        super().__init__(options, run)
        self.hycd_logits = options.hycd_logits
        self.facts: dict = {"hycd_logits": options.hycd_logits, "hycd_logits_reason": "set by --hycd-logits"}

    def prepare(self, ctx):
        if self.options.hycd_logits != "auto":
            return
        from clipfit.models import base_logit_scale

        pairs = ctx.pairs[:PROBE_PAIRS]
        image, text = starting_embeddings(ctx, pairs, self.run.max_image_pixels)
        scale = float(base_logit_scale(ctx.model).detach().exp())
        batch = self.run.batch_size * self.run.grad_accum * ctx.dist.world_size  # what HyCD's softmax spans
        probe = probe_hycd_logits(image, text, scale, min(batch, len(pairs)))
        self.hycd_logits = probe["choice"]
        reason = describe_probe(probe)
        ctx.log(f"refine: {reason}")
        self.facts = {"hycd_logits": probe["choice"], "hycd_logits_reason": reason, "hycd_logits_probe": probe}

    def outputs_read(self, terms):
        # Only the contrastive term and HyCD's scaled-cos logits use the model's logit scale.
        scale = "clip" in terms or ("hycd" in terms and self.hycd_logits == "scaled-cos")
        return both_towers_read(terms, scale)

    def losses(self, step, wanted):
        o = self.options
        parts = {}
        if "rafa" in wanted:  # over the global batch, so the draws of z do not depend on the process count
            image, text = step.gather(step.image_raw), step.gather(step.text_raw)
            parts["rafa"] = rafa_loss(image, text, self.random_reference(image.shape, step.generator))
        if "hycd" in wanted:
            teacher_image, teacher_text = step.teacher()
            # Raw dot products of unnormalised embeddings reach the hundreds, where bf16/fp16
            # rounding would blur the soft targets: compute the logits in float32.
            with torch.autocast(step.image_raw.device.type, enabled=False):
                image, text, teacher_image, teacher_text = (step.gather(t.float()) for t in (
                    step.image_raw, step.text_raw, teacher_image, teacher_text))
                parts["hycd"] = hycd_loss(image, text, teacher_image, teacher_text, alpha=o.hycd_alpha,
                                          temperature=o.hycd_temperature, logits=self.hycd_logits,
                                          logit_scale=step.logit_scale.float(), positives=step.positives())
        if "clip" in wanted:
            parts["clip"] = clip_loss(step.gather(step.image), step.gather(step.text), step.logit_scale,
                                      step.positives())
        return parts

    def random_reference(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """z ~ N(0, σ²I), one row per pair; drawn on the CPU (the loss moves it to the features'
        device) so the numbers do not depend on the device."""
        return torch.randn(shape, generator=generator) * self.options.rafa_sigma

    def report(self):
        return dict(self.facts)
