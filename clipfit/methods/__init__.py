"""The method registry and composition (`--method refine+lite`).

This module must stay importable without torch: `clipfit methods` lists the registry fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from clipfit.errors import UsageError

# name -> ("module:Class", one-line summary)
REGISTRY: dict[str, tuple[str, str]] = {
    "contrastive": ("clipfit.methods.contrastive:Contrastive",
                    "CLIP's symmetric InfoNCE with the learnable logit scale (plain fine-tuning)."),
    "refine": ("clipfit.methods.refine:Refine",
               "CLIP-Refine: random feature alignment (RaFA) + hybrid contrastive distillation (HyCD)."),
    "lite": ("clipfit.methods.lite:Lite",
             "CLIP-Lite: Jensen-Shannon mutual-information bound with one negative per pair."),
    "ping": ("clipfit.methods.ping:Ping",
             "CLIP-PING: nearest neighbours from frozen encoders' cached feature banks as extra contrastive targets."),
    "dclip": ("clipfit.methods.dclip:DCLIP",
              "Distill CLIP: a region/token cross-attention teacher trained on your pairs, then distillation."),
}


def method_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split("+") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if not names or unknown:
        raise UsageError(f"unknown method {', '.join(unknown) or repr(spec)}; choose from {', '.join(REGISTRY)} "
                         "(combine with +, e.g. refine+lite)")
    if len(set(names)) != len(names):
        raise UsageError(f"--method {spec}: a method is named twice")
    return names


def method_class(name: str):
    module_name, class_name = REGISTRY[name][0].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise UsageError(f"--weight {item!r}: expected NAME=NUMBER, e.g. --weight rafa=0.5")
    return weights


@dataclass
class Composite:
    """Several methods summed; each loss term is computed once, by the first method that declares it."""

    methods: list
    weights: dict[str, float]
    owners: dict[str, object]

    @property
    def teacher_towers(self) -> frozenset[str]:
        """The frozen teacher's towers some method reads; the teacher encodes only these."""
        return frozenset().union(*(m.teacher_towers for m in self.methods))

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_towers)

    @property
    def active_terms(self) -> list[str]:
        return [t for t, w in self.weights.items() if w != 0]

    def wanted(self, method) -> set[str]:
        """The active terms `method` computes (a term two methods declare is the first one's)."""
        return {t for t in self.active_terms if self.owners[t] is method}

    @property
    def outputs_read(self) -> frozenset[str]:
        """The step outputs ("image", "text", "logit_scale") some active term reads (after `prepare`,
        which may settle a method's choice, e.g. refine's --hycd-logits auto)."""
        return frozenset().union(*(m.outputs_read(self.wanted(m)) for m in self.methods))

    def parameters(self) -> list:
        return [p for m in self.methods for p in m.parameters()]

    def restrict(self, model, log) -> None:
        for method in self.methods:
            method.restrict(model, log)

    def losses(self, step) -> dict:
        """Weighted terms for one step; their sum is the training loss."""
        parts = {}
        for method in self.methods:
            wanted = self.wanted(method)
            if wanted:
                computed = method.losses(step, wanted)
                parts.update({t: computed[t] for t in wanted})
        return parts

    def total(self, parts: dict):
        return sum(self.weights[t] * v for t, v in parts.items())


def build_methods(spec: str, config, overrides: dict[str, float]) -> Composite:
    methods = [method_class(name)(config) for name in method_names(spec)]
    weights: dict[str, float] = {}
    owners: dict[str, object] = {}
    for method in methods:
        for term, default in method.terms.items():
            owners.setdefault(term, method)
            weights[term] = max(weights.get(term, default), default)
    unknown = sorted(set(overrides) - set(weights))
    if unknown:
        raise UsageError(f"--weight {', '.join(unknown)}: no such loss term for --method {spec} "
                         f"(terms: {', '.join(weights)})")
    weights.update(overrides)
    if not any(weights.values()):
        raise UsageError(f"--method {spec}: every loss weight is 0, nothing would train")
    return Composite(methods, weights, owners)
