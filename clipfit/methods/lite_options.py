"""CLIP-Lite's options (no torch import: `clipfit refine --help` lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from clipfit.errors import UsageError
from clipfit.options import PANEL_METHOD, MethodOptions, check_choice, check_not_negative, opt


@dataclass
class LiteOptions(MethodOptions):
    lite_critic: str = opt("heads", "lite: critic: heads (the authors': exp(t)·cos of MLP+LayerNorm heads, t learned from ln(1/0.07); saved as lite_critic.safetensors), learned (exp(t)·cos of the embeddings) or logit-scale (the model's own scale times cos).", PANEL_METHOD)
    lite_negatives: str = opt("roll", "lite: negative for pair i: roll (caption i+1) or shuffle (seeded derangement).", PANEL_METHOD)
    lite_prior_weight: float = opt(0.0, "lite: weight of the authors' prior-matching term (off for pre-trained models).", PANEL_METHOD)

    def validate(self) -> None:
        check_choice(self, "lite_critic", ("heads", "learned", "logit-scale"))
        check_choice(self, "lite_negatives", ("roll", "shuffle"))
        check_not_negative(self, "lite_prior_weight")
        if not 0 <= self.lite_prior_weight < 1:
            raise UsageError(f"--lite-prior-weight must be in [0, 1): the lite term gets 1 - w (got {self.lite_prior_weight})")
