"""CLIP-Lite (Shrivastava et al., AISTATS 2023): a Jensen-Shannon lower bound on image-text
mutual information with one negative per pair, optionally with Deep InfoMax prior matching.
See docs/methods.md for what follows the authors' code and what differs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipfit.errors import ModelError, UsageError
from clipfit.losses import lite_loss, prior_matching_loss
from clipfit.methods.base import Method, both_towers_read
from clipfit.rundir import LITE_CRITIC

INITIAL_TEMPERATURE = 0.07  # the authors' critic temperature: log-scale starts at ln(1/0.07)
CRITIC_UNITS = 2048  # the authors' encode-and-dot width
CRITIC_FILE = LITE_CRITIC


class CriticHead(nn.Module):
    """The authors' encode-and-dot block for one modality: Linear (no bias) → BatchNorm → ReLU →
    Linear, plus a linear shortcut started as a noisy identity (U(−0.01, 0.01), ones on the
    diagonal), then LayerNorm. The critic compares the two heads' outputs by cosine."""

    def __init__(self, dim: int, units: int = CRITIC_UNITS):
        super().__init__()
        self.nonlinear = nn.Sequential(nn.Linear(dim, units, bias=False), nn.BatchNorm1d(units), nn.ReLU(),
                                       nn.Linear(units, units))
        self.shortcut = nn.Linear(dim, units)
        self.norm = nn.LayerNorm(units)
        with torch.no_grad():
            self.shortcut.weight.uniform_(-0.01, 0.01)
            self.shortcut.weight[torch.arange(min(dim, units)), torch.arange(min(dim, units))] = 1.0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.nonlinear(features) + self.shortcut(features))


def prior_discriminator(dim: int) -> nn.Module:
    """The authors' prior discriminator shape (d → 1000 → 200 → 1); outputs a logit, σ is in the loss."""
    return nn.Sequential(nn.Linear(dim, 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(), nn.Linear(200, 1))


def prior_term(discriminator: nn.Module, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    uniform = torch.rand(features.shape, generator=generator).to(features.device)
    return prior_matching_loss(discriminator(uniform), discriminator(features))


def embedding_dim(ctx) -> int:
    from clipfit.models import base_model

    dim = ctx.loaded.model_cfg.get("embed_dim") or getattr(base_model(ctx.model).visual, "output_dim", None)
    if not dim:
        raise ModelError(f"{ctx.loaded.arch}: cannot tell the embedding size, needed by --lite-prior-weight")
    return int(dim)


class Lite(Method):
    name = "lite"

    @classmethod
    def default_terms(cls, options):
        # The authors' total is (1 - w)·JSD + w·prior; --weight overrides either term.
        return {"lite": 1.0 - options.lite_prior_weight, "lite_prior": options.lite_prior_weight}

    def __init__(self, options, run):
        super().__init__(options, run)
        self.log_scale = (nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))
                          if options.lite_critic in ("learned", "heads") else None)
        self.prior: nn.Module | None = None
        self.heads: nn.Module | None = None  # --lite-critic heads: the authors' critic heads

    def prior_wanted(self) -> bool:
        return self.run.weights["lite_prior"] != 0

    def prepare(self, ctx):
        if min(self.run.batch_size, len(ctx.pairs)) < 2:
            raise UsageError("--method lite needs at least 2 pairs per batch to form a negative (--batch-size)")
        if self.prior_wanted():
            with torch.random.fork_rng(devices=[]):  # seeded init without moving the global RNG
                torch.manual_seed(self.run.seed)
                dim = embedding_dim(ctx)
                # The authors' configuration matches both modalities to the prior, each with its own discriminator.
                self.prior = nn.ModuleDict({"image": prior_discriminator(dim), "text": prior_discriminator(dim)})
                self.prior.to(ctx.device)
        if self.options.lite_critic == "heads":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.run.seed + 1)
                dim = embedding_dim(ctx)
                self.heads = nn.ModuleDict({"image": CriticHead(dim), "text": CriticHead(dim)}).to(ctx.device)

    def own_modules(self) -> list[nn.Module]:
        return [m for m in (self.prior, self.heads) if m is not None]

    def parameters(self):
        own = [self.log_scale] if self.log_scale is not None else []
        return own + [p for module in self.own_modules() for p in module.parameters()]

    def outputs_read(self, terms):
        scale = "lite" in terms and self.log_scale is None  # --lite-critic fixed: the model's logit scale
        return both_towers_read(terms, scale)

    def critic_scale(self, step) -> torch.Tensor:
        return self.log_scale.exp() if self.log_scale is not None else step.logit_scale

    def losses(self, step, wanted):
        parts = {}
        # Over the global batch: negatives and prior draws then do not depend on the process count.
        if "lite" in wanted:
            image, text = step.gather(step.image), step.gather(step.text)
            if self.heads is not None:  # the authors feed the encoders' raw outputs to their heads
                image, text = self.heads["image"](step.gather(step.image_raw)), self.heads["text"](step.gather(step.text_raw))
            parts["lite"] = lite_loss(image, text, self.critic_scale(step), negatives=self.options.lite_negatives,
                                      generator=step.generator, positives=step.positives())
        if "lite_prior" in wanted:
            # On the raw (unnormalised) embeddings, as the authors feed the encoders' outputs.
            parts["lite_prior"] = (prior_term(self.prior["image"], step.gather(step.image_raw), step.generator)
                                   + prior_term(self.prior["text"], step.gather(step.text_raw), step.generator))
        return parts

    def state_dict(self):
        state = {"log_scale": self.log_scale.detach()} if self.log_scale is not None else {}
        for prefix, module in (("prior", self.prior), ("heads", self.heads)):
            if module is not None:
                state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        return state

    def load_state_dict(self, state):
        # Copy in place: the optimiser holds references to these very tensors.
        with torch.no_grad():
            if self.log_scale is not None and "log_scale" in state:
                self.log_scale.copy_(state["log_scale"])
            for prefix, module in (("prior", self.prior), ("heads", self.heads)):
                if module is not None:
                    module.load_state_dict({k.removeprefix(f"{prefix}."): v for k, v in state.items()
                                            if k.startswith(f"{prefix}.")})

    def save(self, run_dir):
        if self.heads is not None:
            from clipfit.models import save_state_dict

            save_state_dict({**{f"{k}": v for k, v in self.heads.state_dict().items()},
                             "log_scale": self.log_scale.detach()}, run_dir / CRITIC_FILE,
                            {"critic": "exp(log_scale) * cos(image(f_v), text(f_t))"})

    def report(self):
        facts = {"critic": self.options.lite_critic, "negatives": self.options.lite_negatives}
        if self.log_scale is not None:
            facts["learned_critic_scale"] = float(self.log_scale.detach().exp())
        if self.prior is not None:
            facts["prior_discriminators_parameters"] = sum(p.numel() for p in self.prior.parameters())
        if self.heads is not None:
            facts["critic_heads_parameters"] = sum(p.numel() for p in self.heads.parameters())
            facts["critic_heads_file"] = CRITIC_FILE
        return facts
