"""CLIP-Refine's options (no torch import: `clipfit refine --help` lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from clipfit.errors import UsageError
from clipfit.options import PANEL_METHOD, MethodOptions, check_choice, check_positive, opt


@dataclass
class RefineOptions(MethodOptions):
    rafa_sigma: float = opt(1.0, "refine: std of RaFA's random reference z ~ N(0, sigma^2 I).", PANEL_METHOD)
    hycd_alpha: float = opt(0.5, "refine: HyCD weight of the identity in the target Q = a I + (1-a) softmax(G/T).", PANEL_METHOD)
    hycd_temperature: float = opt(1.0, "refine: HyCD distillation temperature T.", PANEL_METHOD)
    hycd_logits: str = opt("auto", "refine: HyCD logits: raw-dot (unnormalised, authors'), scaled-cos, or auto: whichever makes the starting model the better in-batch teacher on the first training pairs (said in the log, run.json and report).", PANEL_METHOD)

    def validate(self) -> None:
        check_choice(self, "hycd_logits", ("auto", "raw-dot", "scaled-cos"))
        check_positive(self, "rafa_sigma")
        check_positive(self, "hycd_temperature")
        if not 0 <= self.hycd_alpha <= 1:
            raise UsageError(f"--hycd-alpha must be in [0, 1] (got {self.hycd_alpha})")
