"""A method kept outside clipfit, as a contributor's plugin would be: its options (one flag), the
method (one loss term) and the registration, in this one module. clipfit imports it when it is
named in CLIPFIT_PLUGINS (tests/test_plugins.py runs `clipfit refine --method toy --toy-flag ...`).
"""

from __future__ import annotations

from dataclasses import dataclass

from clipfit.methods import register
from clipfit.methods.base import Method
from clipfit.options import PANEL_METHOD, MethodOptions, check_positive, opt


@dataclass
class ToyOptions(MethodOptions):
    toy_flag: float = opt(1.0, "toy: scale of the toy term (test plugin).", PANEL_METHOD)

    def validate(self) -> None:
        check_positive(self, "toy_flag")


class Toy(Method):
    """toy = toy_flag · mean_i (1 − cos(image_i, text_i)): pulls each pair together, no negatives."""

    name = "toy"
    terms = {"toy": 1.0}

    def losses(self, step, wanted):
        cos = (step.gather(step.image) * step.gather(step.text)).sum(-1)
        return {"toy": self.options.toy_flag * (1 - cos).mean()}

    def report(self):
        return {"toy_flag": self.options.toy_flag, "seed": self.run.seed, "batch_size": self.run.batch_size,
                "weights": self.run.weights}


register("toy", Toy, ToyOptions, summary="Toy: pulls each pair's embeddings together (a test plugin).")
