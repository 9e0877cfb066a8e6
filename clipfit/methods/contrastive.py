"""Plain contrastive fine-tuning: open_clip's symmetric InfoNCE with the learnable logit scale."""

from __future__ import annotations

from clipfit.losses import clip_loss
from clipfit.methods.base import Method, both_towers_read


class Contrastive(Method):
    name = "contrastive"
    terms = {"clip": 1.0}

    def outputs_read(self, terms):
        return both_towers_read(terms, "clip" in terms)

    def losses(self, step, wanted):
        return {"clip": clip_loss(step.gather(step.image), step.gather(step.text), step.logit_scale, step.positives())}
