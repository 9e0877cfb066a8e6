"""The method registry and composition (`--method refine+lite`).

This module must stay importable without torch: `clipfit methods` lists the registry fast, and
`clipfit refine --help` reads every method's options class (each in a torch-free module).

Adding a method: one module with a `Method` subclass (clipfit.methods.base), its options dataclass
if it has flags (clipfit.options.MethodOptions, torch-free), and one line in REGISTRY. A method kept
outside clipfit registers itself with `register(...)` in a module named by CLIPFIT_PLUGINS, which
clipfit imports before it builds its settings (docs/architecture.md walks through one).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from clipfit.errors import UsageError


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: its class and its options class (a class, or "module:Class" imported
    when first needed), and the one-line summary `clipfit methods` prints."""

    method: Any
    options: Any = None  # None: the method has no flags of its own
    summary: str = ""


REGISTRY: dict[str, MethodEntry] = {
    "contrastive": MethodEntry("clipfit.methods.contrastive:Contrastive", None,
                               "CLIP's symmetric InfoNCE with the learnable logit scale (plain fine-tuning)."),
    "refine": MethodEntry("clipfit.methods.refine:Refine", "clipfit.methods.refine_options:RefineOptions",
                          "CLIP-Refine: random feature alignment (RaFA) + hybrid contrastive distillation (HyCD)."),
    "lite": MethodEntry("clipfit.methods.lite:Lite", "clipfit.methods.lite_options:LiteOptions",
                        "CLIP-Lite: Jensen-Shannon mutual-information bound with one negative per pair."),
    "ping": MethodEntry("clipfit.methods.ping:Ping", "clipfit.methods.ping_options:PingOptions",
                        "CLIP-PING: nearest neighbours from frozen encoders' cached feature banks as extra "
                        "contrastive targets."),
    "dclip": MethodEntry("clipfit.methods.dclip:DCLIP", "clipfit.methods.dclip_options:DCLIPOptions",
                         "Distill CLIP: a region/token cross-attention teacher trained on your pairs, then distillation."),
}

PLUGINS_ENV = "CLIPFIT_PLUGINS"  # comma-separated modules imported before the settings are built
PLUGIN_ERRORS: list[str] = []  # reported by the CLI as a usage error (an import failure here has no CLI yet)
LOADED_PLUGINS: set[str] = set()
SEALED = {"options": False}  # set once clipfit.config has composed RefineConfig from the options classes


def register(name: str, method: Any, options: Any = None, summary: str = "") -> None:
    """Add a method to `--method`, `clipfit methods` and (with `options`) the refine flags.

    `method`: the Method subclass or "module:Class"; `options`: its MethodOptions dataclass (or
    "module:Class"), whose fields become flags and TOML keys. Call it from a plugin module named
    in CLIPFIT_PLUGINS: options must be known before clipfit.config builds the settings.
    """
    if not name or "+" in name or "," in name or name.strip() != name:
        raise ValueError(f"method name {name!r}: use a word without +, commas or spaces")
    if name in REGISTRY:
        raise ValueError(f"method {name!r} is registered already")
    if not summary:
        raise ValueError(f"method {name!r}: give a one-line summary for `clipfit methods`")
    if options is not None and SEALED["options"]:
        raise RuntimeError(f"method {name!r}: its options must be registered before clipfit.config is imported; "
                           f"register it from a module named in {PLUGINS_ENV}")
    REGISTRY[name] = MethodEntry(method, options, summary)


def load_plugins() -> None:
    """Import each module named in CLIPFIT_PLUGINS once; each registers its methods on import.
    A module that fails to import is recorded in PLUGIN_ERRORS for the CLI to report."""
    for module in (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",")):
        if not module or module in LOADED_PLUGINS:
            continue
        LOADED_PLUGINS.add(module)
        try:
            importlib.import_module(module)
        except Exception as e:  # any failure of someone else's module: one line, not a traceback
            first = (str(e).strip().splitlines() or [""])[0][:200]
            PLUGIN_ERRORS.append(f"{PLUGINS_ENV}: cannot load plugin {module} ({type(e).__name__}: {first})")


def imported(target: Any) -> Any:
    if not isinstance(target, str):
        return target
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


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
    return imported(REGISTRY[name].method)


def options_class(name: str):
    """The method's options dataclass, or None when it has no flags."""
    return imported(REGISTRY[name].options)


def options_classes(taken: set[str]) -> dict[str, type]:
    """Every registered method's options class, in registry order (the order of their flags).
    Called by clipfit.config to compose the settings; later registrations may not add options.
    A method whose option names are `taken` (core settings) or another method's is unregistered
    and reported in PLUGIN_ERRORS (only a plugin can do that: the built-in names are distinct)."""
    SEALED["options"] = True
    found, taken = {}, set(taken)
    for name in list(REGISTRY):
        cls = options_class(name)
        names = {f.name for f in fields(cls)} if cls is not None else set()
        if names & taken:
            del REGISTRY[name]
            PLUGIN_ERRORS.append(f"method {name}: option(s) {', '.join(sorted(names & taken))} are already settings "
                                 "of clipfit or of another method; rename them with the method's prefix")
        elif cls is not None:
            found[name], taken = cls, taken | names
    return found


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
        if not math.isfinite(weights[name.strip()]):
            raise UsageError(f"--weight {item!r}: the weight must be a finite number")
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


def build_methods(spec: str, options: Mapping[str, Any], run, overrides: dict[str, float]) -> Composite:
    """The methods of `spec`, each given its options (`options[name]`, absent for a method without
    flags) and `run` (clipfit.methods.base.RunContext) completed with the merged loss weights."""
    names = method_names(spec)
    classes = {name: method_class(name) for name in names}
    weights: dict[str, float] = {}
    owner_names: dict[str, str] = {}
    for name in names:
        for term, default in classes[name].default_terms(options.get(name)).items():
            owner_names.setdefault(term, name)
            weights[term] = max(weights.get(term, default), default)
    unknown = sorted(set(overrides) - set(weights))
    if unknown:
        raise UsageError(f"--weight {', '.join(unknown)}: no such loss term for --method {spec} "
                         f"(terms: {', '.join(weights)})")
    weights.update(overrides)
    if not any(weights.values()):
        raise UsageError(f"--method {spec}: every loss weight is 0, nothing would train")
    run = replace(run, weights=dict(weights))
    methods = {name: classes[name](options.get(name), run) for name in names}
    return Composite(list(methods.values()), weights, {t: methods[n] for t, n in owner_names.items()})
