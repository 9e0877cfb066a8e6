"""`--recipe paper`: the training settings each method's authors' code sets (no torch import).

Only what the authors' code sets is listed; everything else keeps clipfit's default, and a flag
given on the command line (or in --config) still wins. docs/methods.md has one table per method:
paper value, clipfit default, and why they differ.
"""

from __future__ import annotations

from clipfit.errors import UsageError

TORCH_ADAMW = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "decay_all": True}
# Every authors' code has one-hot in-batch targets: labels arange(B) (CLIP-Refine's HyCD: torch.eye,
# updater/contrastive.py), CLIP-Lite's rolled negative and DCLIP's InfoNCE, whatever repeats.
ONE_HOT = {"multi_positive": False}

PAPER_RECIPES: dict[str, dict] = {
    # yshinya6/clip-refine, config/01_post-pre-training/clip-refine.yaml and main/train.py:
    # AdamW(model.parameters(), lr=1e-6, weight_decay=0.1), no lr_milestone (constant), 1 epoch, batch 512.
    "refine": {**TORCH_ADAMW, **ONE_HOT, "lr": 1e-6, "weight_decay": 0.1, "schedule": "constant", "warmup_steps": 0,
               "batch_size": 512, "epochs": 1, "hycd_logits": "raw-dot", "hycd_alpha": 0.5,
               "hycd_temperature": 1.0, "rafa_sigma": 1.0},
    # 4m4n5/CLIP-Lite, loss.py (GlobalDiscriminatorDot: encode-and-dot heads, learned temperature from
    # ln(1/0.07), rolled negative; PriorDiscriminator, prior weight 0.1) and config.py (batch 256,
    # weight decay 1e-4, clip 10, 10k warm-up then cosine). Its SGD + Lookahead optimiser with
    # separate learning rates for the CNN and the rest is not reproduced (clipfit has AdamW only).
    "lite": {**ONE_HOT, "lite_critic": "heads", "lite_negatives": "roll", "lite_prior_weight": 0.1, "batch_size": 256,
             "weight_decay": 1e-4, "grad_clip": 10.0, "warmup_steps": 10_000, "schedule": "cosine"},
    # ChuckDanz/DCLIP, training/CLIP_image_distillation.py and CLIP_image_distill_training.py:
    # AdamW(self.parameters(), lr) with torch's defaults (weight decay 0.01), linear warm-up then
    # linear decay, vision weights without "proj" frozen, batch 32, accumulate 4, clip 0.5, fp32;
    # the paper's lr 1e-6 and 2 epochs.
    "dclip": {**TORCH_ADAMW, **ONE_HOT, "lr": 1e-6, "weight_decay": 0.01, "schedule": "linear", "warmup_steps": 0,
              "batch_size": 32, "grad_accum": 4, "grad_clip": 0.5, "epochs": 2, "precision": "fp32",
              "dclip_vision": "proj", "dclip_teacher_lr": 1e-5},
}


def paper_recipe(method: str) -> dict:
    """The settings --recipe paper applies for `method` (one method; combinations have no paper)."""
    names = [n.strip() for n in method.split("+") if n.strip()]
    if len(names) != 1 or names[0] not in PAPER_RECIPES:
        raise UsageError(f"--recipe paper: no paper recipe for --method {method}; it exists for "
                         f"{', '.join(PAPER_RECIPES)} alone (ping's authors published no code)")
    return dict(PAPER_RECIPES[names[0]])
