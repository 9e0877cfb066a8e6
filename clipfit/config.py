"""Every setting of a refine run, in one place: defaults, help text, TOML loading, validation.

The CLI builds its options from `RefineConfig`'s fields, so a setting is declared once.
A `--config FILE` (TOML) sets any field by name; flags given on the command line win.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from clipfit.errors import UsageError
from clipfit.trackers import check_available, parse_report_to

PANEL_RUN, PANEL_TRAIN, PANEL_LORA, PANEL_DATA = "Run", "Training", "LoRA", "Data"
PANEL_METHOD, PANEL_EVAL, PANEL_PERF, PANEL_OUTPUT = "Method options", "Evaluation", "Performance", "Output"


def opt(default: Any, help: str, panel: str = PANEL_TRAIN, **extra: Any) -> Any:
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, "panel": panel, **extra}, **kwargs)


# Settings that change what a run computes: --resume refuses to continue if these differ.
RESULT_NEUTRAL = {"out", "overwrite", "resume", "quiet", "json", "debug", "workers", "save_every",
                  "keep_checkpoints", "log_every", "cache_dir", "config", "eval_zeroshot",
                  "eval_retrieval", "fail_on_zeroshot_drop", "max_steps", "strict", "report_to"}


@dataclass
class RefineConfig:
    # run
    recipe: str = opt("clipfit", "Defaults: clipfit (tuned for small data, docs/methods.md) or paper: every training setting the method's authors' code sets (refine, lite, dclip; flags given still win).", PANEL_RUN)
    method: str = opt("contrastive", "Method, or several joined by + (e.g. refine+lite); `clipfit methods` lists them.", PANEL_RUN)
    model: str = opt("ViT-B-32", "open_clip architecture, hf-hub:org/name, model-config JSON, clipfit run folder, or lite0-minilm.", PANEL_RUN)
    pretrained: str = opt("openai", "open_clip pretrained tag, a .safetensors/.pt/.bin file, or 'none' (random init).", PANEL_RUN)
    out: Optional[str] = opt(None, "Run folder for weights, report and checkpoints [default: runs/<method>-<time>].", PANEL_OUTPUT)
    overwrite: bool = opt(False, "Replace an existing run folder.", PANEL_OUTPUT)
    resume: bool = opt(False, "Continue an interrupted run in --out from its last checkpoint.", PANEL_OUTPUT)
    weight: list[str] = opt(list, "Loss-term weight NAME=VALUE (repeatable), e.g. --weight rafa=0.5.", PANEL_RUN)
    # data
    layout: str = opt("auto", "Pairs layout: auto, sidecar, hf, csv, parquet, datasets (save_to_disk folder or hf://datasets/ORG/NAME), or webdataset (streamed .tar shards).", PANEL_DATA)
    csv_img_key: str = opt("filepath", "Image-path column of a CSV/TSV layout.", PANEL_DATA)
    csv_caption_key: str = opt("title", "Caption column of a CSV/TSV layout.", PANEL_DATA)
    image_column: Optional[str] = opt(None, "Image column of a parquet/datasets layout (default: image, or the only column of image bytes).", PANEL_DATA)
    caption_column: Optional[str] = opt(None, "Caption column of a parquet/datasets layout (default: text, or the only text column).", PANEL_DATA)
    strict: bool = opt(False, "Stop before training if any item is bad, instead of skipping it.", PANEL_DATA)
    max_image_pixels: int = opt(89_478_485, "Decompression-bomb limit: images with more pixels are skipped, never decoded.", PANEL_DATA)
    val_split: float = opt(0.0, "Fraction of pairs held out for validation (loss, R@1, modality gap each epoch).", PANEL_DATA)
    augment: bool = opt(False, "Use open_clip's training augmentation (RandomResizedCrop 0.9-1); off keeps frozen features cacheable.", PANEL_DATA)
    # training
    epochs: int = opt(1, "Passes over the training pairs.")
    max_steps: Optional[int] = opt(None, "Stop after this many optimiser steps.")
    batch_size: int = opt(32, "Pairs per step (per process).")
    grad_accum: int = opt(1, "Micro-batches per optimiser step, trained as ONE batch of batch-size x N: every batch-level loss sees all their pairs (open_clip's --accum-freq). Costs one extra forward (without gradients) per micro-batch.")
    lr: Optional[float] = opt(None, "AdamW learning rate [default: 1e-5 full fine-tuning, 1e-4 with --lora].")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to biases, norms, logit scale unless --decay-all).")
    decay_all: bool = opt(False, "Apply weight decay to every parameter (torch's AdamW(model.parameters()), as CLIP-Refine's and DCLIP's code).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.98, "AdamW beta2 (open_clip's 0.98; torch's default is 0.999).")
    adam_eps: float = opt(1e-6, "AdamW epsilon (open_clip's 1e-6; torch's default is 1e-8).")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    schedule: str = opt("constant", "Learning-rate schedule after warm-up: constant, cosine, or linear (down to 0 at the last step).")
    seed: int = opt(0, "Seed for data order, caption choice, random draws and init.")
    precision: str = opt("fp32", "fp32, bf16 or fp16 (autocast; fp16 uses a grad scaler on CUDA).")
    grad_clip: Optional[float] = opt(None, "Clip the gradient norm to this value.")
    lock_image: bool = opt(False, "Freeze the image tower (open_clip lock_image_tower).")
    lock_text: bool = opt(False, "Freeze the text tower (open_clip lock_text_tower).")
    device: str = opt("auto", "auto, cpu, cuda or mps.")
    nan_policy: str = opt("stop", "On a non-finite loss: stop (keep last checkpoint) or skip the step.")
    nan_limit: int = opt(10, "With --nan-policy skip: give up after this many skipped steps.")
    # lora
    lora: bool = opt(False, "Train LoRA adapters (peft) instead of all weights.", PANEL_LORA)
    lora_rank: int = opt(8, "LoRA rank r.", PANEL_LORA)
    lora_alpha: float = opt(16.0, "LoRA alpha (scale = alpha / r).", PANEL_LORA)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.", PANEL_LORA)
    lora_targets: str = opt("auto", "Comma-separated module names to adapt (attn = nn.MultiheadAttention); auto: attn,c_fc,c_proj for open_clip towers, query,key,value for Hugging Face text towers.", PANEL_LORA)
    # method options: CLIP-Refine
    rafa_sigma: float = opt(1.0, "refine: std of RaFA's random reference z ~ N(0, sigma^2 I).", PANEL_METHOD)
    hycd_alpha: float = opt(0.5, "refine: HyCD weight of the identity in the target Q = a I + (1-a) softmax(G/T).", PANEL_METHOD)
    hycd_temperature: float = opt(1.0, "refine: HyCD distillation temperature T.", PANEL_METHOD)
    hycd_logits: str = opt("auto", "refine: HyCD logits: raw-dot (unnormalised, authors'), scaled-cos, or auto: whichever makes the starting model the better in-batch teacher on the first training pairs (said in the log, run.json and report).", PANEL_METHOD)
    # method options: CLIP-Lite
    lite_critic: str = opt("heads", "lite: critic: heads (the authors': exp(t)·cos of MLP+LayerNorm heads, t learned from ln(1/0.07); saved as lite_critic.safetensors), learned (exp(t)·cos of the embeddings) or logit-scale (the model's own scale times cos).", PANEL_METHOD)
    lite_negatives: str = opt("roll", "lite: negative for pair i: roll (caption i+1) or shuffle (seeded derangement).", PANEL_METHOD)
    lite_prior_weight: float = opt(0.0, "lite: weight of the authors' prior-matching term (off for pre-trained models).", PANEL_METHOD)
    # method options: CLIP-PING
    ping_image_encoder: Optional[str] = opt(None, "ping: frozen image encoder (open_clip spec) [default: the starting model].", PANEL_METHOD)
    ping_text_encoder: Optional[str] = opt(None, "ping: frozen text encoder (open_clip spec or local HF/sentence-transformers folder).", PANEL_METHOD)
    ping_k: int = opt(1, "ping: sample the neighbour from the top k.", PANEL_METHOD)
    ping_temperature: float = opt(0.07, "ping: InfoNCE temperature of the neighbour terms.", PANEL_METHOD)
    ping_index: str = opt("auto", "ping: faiss index: flat (exact), ivf, or auto (ivf above 100k items).", PANEL_METHOD)
    # method options: DCLIP
    dclip_regions: str = opt("grid", "dclip: regions: grid (full + grid + centre crop) or boxes (--dclip-boxes).", PANEL_METHOD)
    dclip_grid: int = opt(2, "dclip: grid size for --dclip-regions grid.", PANEL_METHOD)
    dclip_boxes: Optional[str] = opt(None, "dclip: JSONL of boxes: {file_name, boxes: [[x0,y0,x1,y1], ...]}.", PANEL_METHOD)
    dclip_teacher: Optional[str] = opt(None, "dclip: reuse a trained teacher.safetensors (skips stage 1).", PANEL_METHOD)
    dclip_teacher_epochs: int = opt(5, "dclip: teacher training epochs.", PANEL_METHOD)
    dclip_teacher_lr: float = opt(1e-5, "dclip: teacher Adam learning rate.", PANEL_METHOD)
    dclip_vision: str = opt("proj", "dclip: image-tower weights that train: proj (the authors': only those whose name contains 'proj', i.e. attention and output projections) or all.", PANEL_METHOD)
    # evaluation
    eval_zeroshot: list[str] = opt(list, "Zero-shot set before/after, DATASET=PATH (repeatable).", PANEL_EVAL)
    eval_retrieval: list[str] = opt(list, "Pairs folder for retrieval before/after (repeatable).", PANEL_EVAL)
    fail_on_zeroshot_drop: Optional[float] = opt(None, "Exit 6 if zero-shot top-1 drops by more than this many points.", PANEL_EVAL)
    eval_every: int = opt(0, "Measure the validation split and the --eval-* sets every N optimiser steps, logged to metrics.jsonl (0: at the end of each epoch).", PANEL_EVAL)
    select_best: Optional[str] = opt(None, "Keep the best evaluated step by this metric as model.safetensors, the last as last.safetensors: val/clip_loss, val/text_to_image_R@1, val/image_to_text_R@1, val/modality_gap, mean-R@1, zeroshot/SET/METRIC, retrieval/SET/METRIC.", PANEL_EVAL)
    patience: Optional[int] = opt(None, "With --select-best: stop after this many evaluations in a row without a new best.", PANEL_EVAL)
    max_zeroshot_drop: Optional[float] = opt(None, "With --select-best and --eval-zeroshot: only steps whose zero-shot top-1 is at most this many points below the starting model's are eligible.", PANEL_EVAL)
    # performance and output
    workers: int = opt(2, "DataLoader worker processes.", PANEL_PERF)
    cache_images: bool = opt(False, "Decode and resize every image once, into one in-memory tensor shared with the workers (small folders; not with --augment).", PANEL_PERF)
    length_buckets: bool = opt(False, "Draw each batch from captions of similar token length, so less padding is encoded (changes which pairs share a batch, hence the result).", PANEL_PERF)
    no_precompute: bool = opt(False, "Run the frozen teacher and locked towers at every step instead of once per item before training (less memory, more compute).", PANEL_PERF)
    grad_checkpointing: bool = opt(False, "open_clip gradient checkpointing (less memory, more compute).", PANEL_PERF)
    compile: bool = opt(False, "torch.compile the model.", PANEL_PERF)
    cache_dir: Optional[str] = opt(None, "Feature-bank cache folder [default: user cache dir].", PANEL_PERF)
    save_every: int = opt(0, "Checkpoint every N steps (0: only at epoch ends and on interrupt).", PANEL_OUTPUT)
    keep_checkpoints: int = opt(2, "Checkpoints to keep.", PANEL_OUTPUT)
    log_every: int = opt(10, "Log a metrics line every N steps.", PANEL_OUTPUT)
    report_to: str = opt("none", "Also log metrics, config and pictures to tensorboard and/or wandb (comma-separated; optional extras).", PANEL_OUTPUT)
    quiet: bool = opt(False, "Print nothing but errors and the final line.", PANEL_OUTPUT)
    json: bool = opt(False, "Print one machine-readable JSON summary at the end.", PANEL_OUTPUT)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.lora else 1e-5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CONFIG_FIELDS = {f.name: f for f in fields(RefineConfig)}
CONFIG_HINTS = typing.get_type_hints(RefineConfig)


def field_default(name: str) -> Any:
    f = CONFIG_FIELDS[name]
    return f.default_factory() if f.default is MISSING else f.default


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config (as data, never executed): settings at the top level, in a [refine]
    table, or both; keys may use - or _. Every key and value type is checked here, so a mistake
    is one line naming the key, never a silently dropped setting or a traceback later."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # Windows editors may add a BOM
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read config file ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    settings = merged_tables(path, data)
    unknown = sorted(set(settings) - set(CONFIG_FIELDS) - {"pairs"})
    if unknown:
        raise UsageError(f"{path}: unknown setting(s) {', '.join(with_suggestion(name) for name in unknown)}")
    return {name: checked_value(path, name, value) for name, value in settings.items()}


def merged_tables(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys and [refine] keys as one dict; a setting given twice is refused."""
    table = data.pop("refine", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: refine must be a table ([refine]), not {type_name(table)}")
    settings: dict[str, Any] = {}
    first: dict[str, str] = {}  # name -> the key as spelled and where
    for where, values in (("at the top level", data), ("in [refine]", table)):
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in settings:
                raise UsageError(f"{path}: {name} is set twice ({first[name]} and {key} {where}); keep one")
            settings[name], first[name] = value, f"{key} {where}"
    return settings


def with_suggestion(name: str) -> str:
    close = difflib.get_close_matches(name, [*CONFIG_FIELDS, "pairs"], n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def type_name(value: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def expected_type(name: str) -> Any:
    """The field's type without Optional (TOML has no null): int, float, str, bool or list[str]."""
    if name == "pairs":
        return str
    hint = CONFIG_HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint


def checked_value(path: Path, name: str, value: Any) -> Any:
    wanted = expected_type(name)
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # `lr = 1` means 1.0
    if wanted == list[str]:
        ok, description = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    else:
        ok = isinstance(value, wanted) and not (isinstance(value, bool) and wanted is not bool)
        description = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[wanted]
    if not ok:
        shown = json.dumps(value, default=str)
        raise UsageError(f"{path}: {name} = {shown} is {type_name(value)}; expected {description}")
    return value


def build_config(cli_values: dict[str, Any], explicit: set[str], toml: dict[str, Any] | None) -> RefineConfig:
    """Defaults < the paper recipe (--recipe paper) < TOML < flags given on the command line."""
    values = {name: field_default(name) for name in CONFIG_FIELDS}
    given = {name: value for name, value in (toml or {}).items() if name in CONFIG_FIELDS}
    given.update({name: cli_values[name] for name in explicit if name in CONFIG_FIELDS})
    if given.get("recipe") == "paper":
        from clipfit.methods.recipes import paper_recipe

        values.update(paper_recipe(given.get("method", values["method"])))
    values.update(given)
    config = RefineConfig(**values)
    validate(config)
    return config


CHOICES = {
    "recipe": ("clipfit", "paper"),
    "schedule": ("constant", "cosine", "linear"),
    "precision": ("fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "nan_policy": ("stop", "skip"),
    "layout": ("auto", "sidecar", "hf", "csv", "parquet", "datasets", "webdataset"),
    "hycd_logits": ("auto", "raw-dot", "scaled-cos"),
    "lite_critic": ("heads", "learned", "logit-scale"),
    "lite_negatives": ("roll", "shuffle"),
    "ping_index": ("auto", "flat", "ivf"),
    "dclip_regions": ("grid", "boxes"),
    "dclip_vision": ("proj", "all"),
}
POSITIVE = ("epochs", "batch_size", "grad_accum", "lora_rank", "ping_k", "dclip_grid", "keep_checkpoints",
            "log_every", "max_image_pixels", "nan_limit")
NON_NEGATIVE = ("weight_decay", "warmup_steps", "lite_prior_weight", "save_every", "workers", "lora_dropout",
                "dclip_teacher_epochs", "eval_every")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(c: RefineConfig) -> None:
    for name, allowed in CHOICES.items():
        if getattr(c, name) not in allowed:
            raise UsageError(f"{flag(name)} {getattr(c, name)!r}: choose one of {', '.join(allowed)}")
    for name in POSITIVE:
        if getattr(c, name) < 1:
            raise UsageError(f"{flag(name)} must be at least 1 (got {getattr(c, name)})")
    for name in NON_NEGATIVE:
        if getattr(c, name) < 0:
            raise UsageError(f"{flag(name)} must not be negative (got {getattr(c, name)})")
    if c.lr is not None and not (c.lr > 0 and math.isfinite(c.lr)):
        raise UsageError(f"--lr must be a positive number (got {c.lr})")
    if not 0 <= c.val_split < 1:
        raise UsageError(f"--val-split must be in [0, 1) (got {c.val_split})")
    if c.max_steps is not None and c.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1 (got {c.max_steps})")
    if c.grad_clip is not None and c.grad_clip <= 0:
        raise UsageError(f"--grad-clip must be positive (got {c.grad_clip})")
    for name in ("rafa_sigma", "hycd_temperature", "ping_temperature", "dclip_teacher_lr", "adam_eps"):
        if getattr(c, name) <= 0:
            raise UsageError(f"{flag(name)} must be positive (got {getattr(c, name)})")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise UsageError(f"{flag(name)} must be in [0, 1) (got {getattr(c, name)})")
    if not 0 <= c.hycd_alpha <= 1:
        raise UsageError(f"--hycd-alpha must be in [0, 1] (got {c.hycd_alpha})")
    if not 0 <= c.lite_prior_weight < 1:
        raise UsageError(f"--lite-prior-weight must be in [0, 1): the lite term gets 1 - w (got {c.lite_prior_weight})")
    check_available(parse_report_to(c.report_to))
    validate_combinations(c)


def validate_selection(c: RefineConfig) -> None:
    """--select-best's form here; whether this run measures the metric is checked once its sets are known."""
    import re

    from clipfit.selection import MEAN_R1, SPLIT_METRICS

    form = rf"val/({'|'.join(map(re.escape, SPLIT_METRICS))})|{re.escape(MEAN_R1)}|(zeroshot|retrieval)/[^/]+/[^/]+"
    if c.select_best is not None and not re.fullmatch(form, c.select_best):
        raise UsageError(f"--select-best {c.select_best!r}: choose one of {', '.join('val/' + m for m in SPLIT_METRICS)}, "
                         f"{MEAN_R1}, zeroshot/SET/METRIC or retrieval/SET/METRIC")
    if c.patience is not None and c.patience < 1:
        raise UsageError(f"--patience must be at least 1 (got {c.patience})")
    if c.patience is not None and not c.select_best:
        raise UsageError("--patience counts evaluations without a new best: it needs --select-best METRIC")
    if c.max_zeroshot_drop is not None and not (c.select_best and c.eval_zeroshot):
        raise UsageError("--max-zeroshot-drop limits which steps --select-best may keep: it needs --select-best METRIC "
                         "and --eval-zeroshot DATASET=PATH")


def validate_combinations(c: RefineConfig) -> None:
    if c.lora and (c.lock_image or c.lock_text):
        raise UsageError("--lora freezes the base weights already; --lock-image/--lock-text contradict it")
    if c.resume and c.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: resume keeps the run folder, overwrite deletes it")
    if c.dclip_regions == "boxes" and not c.dclip_boxes:
        raise UsageError("--dclip-regions boxes needs --dclip-boxes FILE")
    if c.dclip_boxes and c.dclip_regions != "boxes":
        raise UsageError("--dclip-boxes is only read with --dclip-regions boxes")
    validate_selection(c)
    if c.fail_on_zeroshot_drop is not None and not c.eval_zeroshot:
        raise UsageError("--fail-on-zeroshot-drop needs --eval-zeroshot DATASET=PATH to measure the drop")
    if c.cache_images and c.augment:
        raise UsageError("--cache-images keeps each image transformed once, which would freeze --augment's "
                         "random crops; use one or the other")
    if c.layout == "webdataset" and (c.val_split or c.cache_images):
        raise UsageError("--layout webdataset streams its shards: hold validation pairs out as their own shards "
                         "instead of --val-split, and drop --cache-images")
    if c.layout == "webdataset" and c.length_buckets:
        raise UsageError("--length-buckets sorts a pairs list by caption length; a --layout webdataset stream "
                         "has none: drop --length-buckets")
    if c.precision == "fp16" and c.device == "cpu":
        raise UsageError("--precision fp16 is not supported on CPU; use bf16")
