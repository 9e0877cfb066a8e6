"""CLIP-Refine (Yamaguchi et al., CVPR 2025): RaFA + HyCD against a frozen copy of the start.

RaFA pulls the unnormalised image and text embeddings of a pair towards one shared random
point, which narrows the modality gap; HyCD distils the starting model's similarity structure,
softened towards the identity, so zero-shot knowledge is kept. See docs/methods.md.
"""

from __future__ import annotations

import torch

from clipfit.losses import clip_loss, hycd_loss, rafa_loss
from clipfit.methods.base import Method


class Refine(Method):
    name = "refine"
    summary = "CLIP-Refine: random feature alignment (RaFA) + hybrid contrastive distillation (HyCD)."
    # `clip` is the contrastive term's name: 0 by default (the authors' lambda_cont = 0), settable.
    terms = {"rafa": 1.0, "hycd": 1.0, "clip": 0.0}
    needs_teacher = True

    def losses(self, step, wanted):
        c = self.config
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
                parts["hycd"] = hycd_loss(image, text, teacher_image, teacher_text, alpha=c.hycd_alpha,
                                          temperature=c.hycd_temperature, logits=c.hycd_logits,
                                          logit_scale=step.logit_scale.float())
        if "clip" in wanted:
            parts["clip"] = clip_loss(step.gather(step.image), step.gather(step.text), step.logit_scale)
        return parts

    def random_reference(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """z ~ N(0, σ²I), one row per pair; drawn on the CPU (the loss moves it to the features'
        device) so the numbers do not depend on the device."""
        return torch.randn(shape, generator=generator) * self.config.rafa_sigma
