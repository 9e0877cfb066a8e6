"""How a setting is declared and checked, for the run's core settings (clipfit.config) and for
each method's own options (clipfit.methods.*_options) alike.

A setting is a dataclass field made by `opt`: its default, its help text and the --help panel
it is listed in. The CLI, TOML loading and run.json all read these fields, so a setting is
declared once. This module imports neither torch nor any other clipfit module but errors:
method options are read to build `clipfit refine --help`, which must start fast.
"""

from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Any, Iterable

from clipfit.errors import UsageError

PANEL_RUN, PANEL_TRAIN, PANEL_LORA, PANEL_DATA = "Run", "Training", "LoRA", "Data"
PANEL_METHOD, PANEL_EVAL, PANEL_PERF, PANEL_OUTPUT = "Method options", "Evaluation", "Performance", "Output"


def opt(default: Any, help: str, panel: str = PANEL_TRAIN, **extra: Any) -> Any:
    """A setting: `default` (a callable makes a fresh value per instance, e.g. list), its help text
    and its --help panel."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, "panel": panel, **extra}, **kwargs)


def flag(name: str) -> str:
    """The command-line spelling of a setting: rafa_sigma -> --rafa-sigma."""
    return "--" + name.replace("_", "-")


def check_choice(settings: Any, name: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if getattr(settings, name) not in allowed:
        raise UsageError(f"{flag(name)} {getattr(settings, name)!r}: choose one of {', '.join(allowed)}")


def check_at_least_one(settings: Any, name: str) -> None:
    if getattr(settings, name) < 1:
        raise UsageError(f"{flag(name)} must be at least 1 (got {getattr(settings, name)})")


def check_not_negative(settings: Any, name: str) -> None:
    if getattr(settings, name) < 0:
        raise UsageError(f"{flag(name)} must not be negative (got {getattr(settings, name)})")


def check_positive(settings: Any, name: str) -> None:
    value = getattr(settings, name)
    if value is not None and value <= 0:
        raise UsageError(f"{flag(name)} must be positive (got {value})")


def check_finite(name: str, value: Any) -> None:
    """A number setting is a finite number: NaN and infinity are refused (exit 2)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag(name)} must be a finite number (got {value})")


def check_finite_numbers(settings: Any) -> None:
    """Every setting of a settings dataclass that holds a float (core settings and every method's
    options alike), checked before any other check compares it."""
    for f in fields(settings):
        check_finite(f.name, getattr(settings, f.name))


class MethodOptions:
    """Base of a method's options dataclass (e.g. clipfit.methods.refine_options.RefineOptions).

    Subclass it as a @dataclass whose fields are made by `opt(..., panel=PANEL_METHOD)`, named with
    the method's prefix (refine's hycd_alpha is --hycd-alpha and `hycd_alpha = ...` in a TOML file),
    and check the values in `validate`, raising UsageError with one line naming the flag.
    """

    def validate(self) -> None:
        """Raise UsageError if a value, or a combination of values, is not allowed."""
