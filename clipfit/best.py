"""Evaluations during training (--eval-every) and the best weights so far (--select-best).

The starting model's measurement is candidate 0 (step 0): when training never beats it, the
starting weights are what --select-best keeps. The history of measurements and the best
trainable tensors travel in every checkpoint, so a resumed run chooses as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from clipfit.selection import Choice, Rule, choose, patience_exhausted


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the trainable parameters (LoRA's adapters, or the unlocked weights)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def step_label(step: int) -> str:
    return "step 0 (start)" if step == 0 else f"step {step}"


def log_row(metrics: dict[str, float], has_validation: bool) -> dict[str, float]:
    """A metrics.jsonl row: the split's yardsticks as val_NAME (as before), the suite's keys as they are."""
    return {(k if "/" in k else f"val_{k}"): v for k, v in metrics.items() if "/" in k or has_validation}


@dataclass
class TrainingEvaluations:
    measure: Callable[[], dict[str, float]]  # clipfit.run.measure, bound to the run
    model: nn.Module
    rule: Rule | None  # None: measure and log only
    patience: int | None
    has_validation: bool
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "epoch", "metrics"}
    best: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable tensors of the chosen step

    def __post_init__(self):
        if self.rule is not None:
            self.best = trainable_state(self.model)  # step 0's, replaced by a checkpoint's on resume

    def begin(self, start: dict[str, float]) -> None:
        """The starting model's numbers: candidate 0 (kept from a checkpoint when resuming)."""
        if not self.history:
            self.history.append({"step": 0, "epoch": 0, "metrics": start})

    @property
    def start(self) -> dict[str, float]:
        return self.history[0]["metrics"]

    def choice(self) -> Choice:
        return choose([h["metrics"] for h in self.history], self.start, self.rule,
                      [step_label(h["step"]) for h in self.history])

    def evaluate(self, step: int, epoch: int) -> tuple[dict[str, float], bool]:
        """Measure now; keep the weights when they are the new best. Returns the row and whether to stop."""
        if self.history and self.history[-1]["step"] == step:  # already measured at this step
            return {}, self.should_stop()
        metrics = self.measure()
        self.history.append({"step": step, "epoch": epoch, "metrics": metrics})
        if self.rule is None:
            return log_row(metrics, self.has_validation), False
        choice = self.choice()
        if choice.index == len(self.history) - 1:
            self.best = trainable_state(self.model)
        row = {**log_row(metrics, self.has_validation), "best_step": self.history[choice.index]["step"]
               if choice.index is not None else None}
        return row, patience_exhausted(choice, self.patience)

    def should_stop(self) -> bool:
        return self.rule is not None and patience_exhausted(self.choice(), self.patience)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore from a checkpoint; True when --patience had already stopped the run."""
        if state.get("history"):
            self.history = list(state["history"])
            self.best = dict(state.get("best") or self.best)
        return self.should_stop() if self.history else False

    def load_best_into(self, model: nn.Module) -> None:
        missing = set(self.best) - {name for name, _ in model.named_parameters()}
        if missing:
            raise RuntimeError(f"best weights name unknown parameters, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            parameters = dict(model.named_parameters())
            for name, tensor in self.best.items():
                parameters[name].copy_(tensor.to(parameters[name].device))
