"""DCLIP, Distill CLIP (Csizmadia et al., arXiv 2505.21549): a cross-modal teacher, then distillation.

Stage 1 (in `prepare`) trains a one-layer region/token cross-attention teacher on the user's
pairs, or loads one with --dclip-teacher, and computes its image embedding t_img for every
caption. Stage 2 is the training loop: the student's image embedding is pulled towards t_img,
its text embedding kept near the frozen model's, plus InfoNCE at τ = 0.05. See docs/methods.md.

Regions are cropped from the original image and never augmented, so t_img is computed once
even with --augment: the student then sees augmented views and is pulled towards the same t_img.

Under torchrun the region and token embeddings are encoded once (each rank its share of the
pairs, clipfit.dclip.embed), stage 1 runs on rank 0 alone and the other ranks load the teacher
it saved, and the loss terms see the global batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from clipfit.data.dataset import item_group
from clipfit.losses import dclip_loss_parts
from clipfit.methods.base import Method

STUDENT_TEMPERATURE = 0.05


def describe_curve(losses: list[float]) -> str:
    return ", ".join(f"{epoch}: {loss:.4f}" for epoch, loss in enumerate(losses, start=1)) or "no epochs"


class DCLIP(Method):
    name = "dclip"
    terms = {"dclip_img": 1.0, "dclip_txt": 1.0, "dclip_con": 1.0}
    teacher_towers = frozenset({"text"})  # only the frozen text embedding; t_img comes from its own teacher
    term_outputs = {"dclip_img": {"image"}, "dclip_txt": {"text"}, "dclip_con": {"image", "text"}}  # fixed τ, no scale

    def __init__(self, options, run):
        super().__init__(options, run)
        self.targets: torch.Tensor | None = None  # t_img per caption row
        self.caption_starts: torch.Tensor | None = None
        self.facts: dict = {}

    def restrict(self, model, log) -> None:
        """--dclip-vision proj (the authors'): of the image tower only the weights whose name
        contains "proj" train. The authors' Hugging Face names match the attention q/k/v/out
        projections and the final projection; open_clip's names for those contain "proj" too
        (attn.in_proj_*, attn.out_proj, visual.proj, a timm tower's head.proj), and its MLP
        output (mlp.c_proj, Hugging Face's fc2, frozen there) is kept frozen here as well."""
        from clipfit.models import base_model

        if self.options.dclip_vision != "proj" or self.run.lora:  # LoRA freezes the base weights already
            return
        frozen = 0
        for name, param in base_model(model).visual.named_parameters():
            if param.requires_grad and ("proj" not in name or "mlp.c_proj" in name):
                param.requires_grad_(False)
                frozen += param.numel()
        trainable = sum(p.numel() for p in base_model(model).visual.parameters() if p.requires_grad)
        self.facts["image tower"] = (f"--dclip-vision proj: {frozen:,} weights frozen, {trainable:,} train "
                                     "(names with 'proj')")
        log(f"dclip: {self.facts['image tower']}")

    def prepare(self, ctx) -> None:
        from clipfit.dclip.embed import cached_inputs
        from clipfit.dclip.regions import Regions
        from clipfit.dclip.teacher import RegionTokenBank, TEACHER_FILE, load_teacher, teacher_image_embeddings
        from clipfit.cache import FeatureCache, items_built_by_rank

        regions = Regions.from_options(self.options)
        unused = regions.unused_names([p.key for p in ctx.pairs])
        if unused:
            ctx.log(f"dclip: {len(unused)} name(s) in {regions.boxes_file} match no training pair, e.g. {unused[0]}")
        source = self.saved_teacher(ctx.run_dir / TEACHER_FILE)
        saved = load_teacher(source) if source else None  # before encoding: a bad path fails fast
        cache = FeatureCache(ctx.cache_dir, log=ctx.log, warn=ctx.warn)
        inputs = {name: t.float() if t.is_floating_point() else t
                  for name, t in cached_inputs(ctx, regions, cache, self.run).items()}
        bank = RegionTokenBank(caption_counts=torch.tensor([len(p.captions) for p in ctx.pairs]),
                               caption_groups=self.caption_groups(ctx.pairs), **inputs)
        if saved:
            teacher = self.reuse_teacher(ctx, source, *saved, bank.regions.shape[1])
        else:
            teacher = self.teacher_trained_once(ctx, bank, bank.regions.shape[1], ctx.run_dir / TEACHER_FILE)
        teacher = teacher.to(ctx.device)
        self.targets = teacher_image_embeddings(teacher, bank, ctx.device, self.run.batch_size,
                                                ctx.dist).to(ctx.device)
        self.caption_starts = bank.caption_starts.to(ctx.device)
        self.facts.update({"regions": self.describe_regions(bank), "tokens per caption (mean)":
                           float(bank.token_counts.float().mean()),
                           "pairs encoded by rank": items_built_by_rank(cache, ["dclip-regions", "dclip-tokens"],
                                                                        ctx.dist)})

    def caption_groups(self, pairs) -> torch.Tensor | None:
        """Every caption's positives group, in the bank's caption order, for stage 1's targets."""
        if not self.run.multi_positive:
            return None
        return torch.tensor([item_group(pair, c) for pair in pairs for c in range(len(pair.captions))])

    def saved_teacher(self, own: Path) -> Path | None:
        """--dclip-teacher, or this run's own teacher when resuming; None means stage 1 runs."""
        if self.options.dclip_teacher:
            return Path(self.options.dclip_teacher)
        return own if self.run.resuming and own.is_file() else None

    def reuse_teacher(self, ctx, source: Path, teacher, metadata: dict, dim: int):
        from clipfit.dclip.teacher import TEACHER_FILE, check_teacher_dim

        check_teacher_dim(teacher, dim, source)
        own = ctx.run_dir / TEACHER_FILE
        if ctx.dist.is_main and source.resolve() != own.resolve():
            shutil.copyfile(source, own)  # the run folder stays self-contained
        ctx.log(f"dclip: stage 1 skipped, teacher loaded from {source}")
        self.facts.update({"stage 1": f"skipped: teacher loaded from {source}",
                           "teacher InfoNCE per epoch (when it was trained)":
                           describe_curve(json.loads(metadata.get("loss_per_epoch", "[]")))})
        return teacher

    def teacher_trained_once(self, ctx, bank, dim: int, path: Path):
        """Stage 1 on rank 0 alone (it writes the run folder); the other ranks load what it saved."""
        from clipfit.dclip.teacher import load_teacher

        teacher = self.train_new_teacher(ctx, bank, dim, path) if ctx.dist.is_main else None
        ctx.dist.barrier()  # the other ranks wait for the whole of stage 1 here
        return teacher if teacher is not None else load_teacher(path)[0]

    def train_new_teacher(self, ctx, bank, dim: int, path: Path):
        from clipfit.dclip.teacher import CrossModalTeacher, TeacherTraining, save_teacher, train_teacher

        o, run = self.options, self.run
        with torch.random.fork_rng(devices=[]):  # the student's random stream stays as without DCLIP
            torch.manual_seed(run.seed)
            teacher = CrossModalTeacher(dim)
        ctx.log(f"dclip stage 1: training the cross-modal teacher for {o.dclip_teacher_epochs} epoch(s)")
        # the run's global batch: under torchrun this one process trains what a single-process run would
        plan = TeacherTraining(o.dclip_teacher_epochs, o.dclip_teacher_lr, run.batch_size * ctx.dist.world_size, run.seed)
        train_teacher(teacher.to(ctx.device), bank, plan, ctx.device, ctx.log)
        save_teacher(teacher, path, plan)
        self.facts.update({"stage 1": f"teacher trained {plan.epochs} epoch(s), Adam lr {plan.lr:g}, saved to {path}",
                           "stage 1 seconds": plan.seconds,
                           "teacher InfoNCE per epoch": describe_curve(plan.loss_per_epoch)})
        return teacher

    def describe_regions(self, bank) -> str:
        o = self.options
        how = f"grid {o.dclip_grid}x{o.dclip_grid} + full + centre" if o.dclip_regions == "grid" else \
            f"full + boxes from {o.dclip_boxes}"
        return f"{how}, {float(bank.region_counts.float().mean()):.1f} per image"

    def outputs_read(self, terms):
        return frozenset().union(*(self.term_outputs[t] for t in terms))

    def losses(self, step, wanted):
        device = step.image_raw.device
        rows = self.caption_starts[step.indices.to(device)] + step.captions.to(device)
        _, frozen_text = step.teacher()
        # Over the global batch (rows of every rank): a distributed step equals a one-process step.
        rows, image, text, frozen_text = (step.gather(t) for t in (rows, step.image_raw.float(),
                                                                  step.text_raw.float(), frozen_text.float()))
        # Cosines and a τ = 0.05 softmax: keep them in float32 under bf16/fp16 autocast.
        with torch.autocast(device.type, enabled=False):
            parts = dclip_loss_parts(image, text, self.targets[rows], frozen_text, STUDENT_TEMPERATURE,
                                     step.positives())
        return {f"dclip_{name}": value for name, value in parts.items() if f"dclip_{name}" in wanted}

    def report(self):
        return dict(self.facts)
