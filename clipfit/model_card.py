"""README.md for the Hugging Face hub, written from a run's run.json.

Only what the run recorded, and no path of the machine that made it: the data is named by its
folder's name, its size and its hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipfit.report import grouped_before_after

PIPELINE_TAG = "zero-shot-image-classification"


def front_matter(info: dict[str, Any], licence: str, base_model: str | None) -> list[str]:
    method = info["config"]["method"]
    lines = ["---", "library_name: open_clip", f"pipeline_tag: {PIPELINE_TAG}", f"license: {licence}", "tags:"]
    lines += [f"- {tag}" for tag in ("clip", "open_clip", "clipfit", *method.split("+"))]
    if base_model:
        lines.append(f"base_model: {base_model}")
    return lines + ["---"]


def settings_lines(info: dict[str, Any]) -> list[str]:
    c, r = info["config"], info["resolved"]
    locked = [tower for tower in ("image", "text") if c.get(f"lock_{tower}")]
    weights = ", ".join(f"{k}={v:g}" for k, v in r["weights"].items())
    return [
        f"- method: `{c['method']}` (loss weights {weights})",
        f"- {info.get('steps', 0)} optimiser steps, batch {c['batch_size']} × accumulation {c['grad_accum']}, "
        f"{c['epochs']} epoch(s), lr {r['lr']:g} ({c['schedule']} schedule, {c['warmup_steps']} warm-up steps), "
        f"weight decay {c['weight_decay']:g}",
        f"- trained: {'LoRA r=' + str(c['lora_rank']) + ', merged into the weights' if c['lora'] else 'all unlocked weights'}"
        f"{'; locked towers: ' + ', '.join(locked) if locked else ''}; "
        f"{r['parameters']['trainable']:,} of {r['parameters']['total']:,} parameters",
        f"- precision {c['precision']}, seed {c['seed']}, device {r['device']}, "
        f"training time {info.get('train_seconds', 0):.0f} s",
    ]


def render(info: dict[str, Any], repo_id: str, licence: str, base_model: str | None, pictures: list[str],
           version: str | None) -> str:
    model, r = info["model"], info["resolved"]
    lines = front_matter(info, licence, base_model) + [
        f"# {repo_id.rpartition('/')[2]}", "",
        f"A CLIP model post-trained with [clipfit](https://pypi.org/project/clipfit/) {version or ''}".rstrip()
        + f" from `{model['arch']}` (weights: `{Path(str(model['pretrained'])).name}`) with `{info['config']['method']}`.",
        "", "## Use it", "", "```python", "import open_clip", "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo_id}")',
        f'tokenizer = open_clip.get_tokenizer("hf-hub:{repo_id}")', "```", "",
        "## Data", "",
        f"- `{Path(info['pairs']).name}` ({r['layout']} layout): {r['train_pairs']} training pairs, "
        f"{r['val_pairs']} validation pairs, {info.get('skipped', 0)} skipped",
        f"- data hash `{info['data_hash']}` (clipfit's hash of the pair list: keys, captions, file sizes and times)",
        "", "## Method and settings", "", *settings_lines(info), "",
        f"## Before → after ({info.get('eval_split', 'validation')})", "",
        *grouped_before_after(info.get("before", {}), info.get("after", {})), "",
    ]
    if pictures:
        lines += ["## Pictures", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in pictures] + [""]
    lines += ["## Licence", "", f"`{licence}`; the licence of the base model's weights applies to this model too.", ""]
    return "\n".join(lines)
