"""Every setting of a refine run: defaults, help text, TOML loading, validation.

`CoreSettings` declares the settings every run has; each method declares its own options
(clipfit.methods.*_options, named by the registry). `RefineConfig` composes the two into one flat
dataclass: the CLI builds its options from its fields, a `--config FILE` (TOML) sets any field by
name, and run.json saves it whole, so a setting is declared once and its flag, TOML key and
run.json key are the same name. Flags given on the command line win over the file.
"""

from __future__ import annotations

import difflib
import json
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Optional

from clipfit import methods
from clipfit.errors import UsageError
from clipfit.options import (PANEL_DATA, PANEL_EVAL, PANEL_LORA, PANEL_OUTPUT, PANEL_PERF, PANEL_RUN, check_at_least_one,
                             check_choice, check_finite_numbers, check_not_negative, check_positive, flag, opt)
from clipfit.trackers import check_available, parse_report_to


# Settings that change what a run computes: --resume refuses to continue if these differ.
RESULT_NEUTRAL = {"out", "overwrite", "resume", "quiet", "json", "debug", "workers", "save_every",
                  "keep_checkpoints", "log_every", "cache_dir", "config", "eval_zeroshot",
                  "eval_retrieval", "fail_on_zeroshot_drop", "max_steps", "strict", "report_to"}
# Result-affecting settings added after runs were recorded: the value a run.json without the key
# was trained with, so --resume and sweeps compare an older run's settings truthfully.
ADDED_LATER = {"multi_positive": False}


def saved_settings(recorded: dict[str, Any]) -> dict[str, Any]:
    """A run.json's "config" with the settings it predates filled in as that run used them."""
    return {**ADDED_LATER, **recorded}


@dataclass
class CoreSettings:
    """The settings of every run, whatever its method (the methods' own are their options)."""

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
    layout: str = opt("auto", "Pairs layout: auto, sidecar, hf, csv, parquet, datasets (save_to_disk folder or hf://datasets/ORG/NAME), webdataset (streamed .tar shards), or classes (one sub-folder of images per class; auto-detected when no image has a caption).", PANEL_DATA)
    classnames: Optional[str] = opt(None, "Classes layout: file of class names, one per line in sorted folder order [default: the folder names, _ read as a space].", PANEL_DATA)
    templates: Optional[str] = opt(None, "Classes layout: file of caption templates, {c} marking the class name; each epoch draws one per image [default: PAIRS/templates.txt, else open_clip's 80 ImageNet templates].", PANEL_DATA)
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
    multi_positive: bool = opt(True, "Items of one batch with the same class (labelled folders) or the same caption (after whitespace and case normalisation) are positives of each other: targets uniform over them, never a negative (every method). --no-multi-positive: one-hot targets, each item's own pair its only positive.")
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
    # (each method's options are composed in here: see METHOD_OPTIONS_BEFORE)
    # evaluation
    eval_zeroshot: list[str] = opt(list, "Zero-shot sets before/after: DATASET=PATH, wds/NAME, robustness[=ROOT], vtab[=ROOT] or a suite .toml file (repeatable; docs/evaluation.md).", PANEL_EVAL)
    eval_retrieval: list[str] = opt(list, "Pairs folder for retrieval before/after (repeatable).", PANEL_EVAL)
    fail_on_zeroshot_drop: Optional[float] = opt(None, "Exit 6 if zero-shot top-1 drops by more than this many points.", PANEL_EVAL)
    eval_every: int = opt(0, "Measure the validation split and the --eval-* sets every N optimiser steps, logged to metrics.jsonl (0: at the end of each epoch).", PANEL_EVAL)
    select_best: Optional[str] = opt(None, "Keep the best evaluated step by this metric as model.safetensors, the last as last.safetensors: val/clip_loss, val/text_to_image_R@1, val/image_to_text_R@1, val/modality_gap, mean-R@1, zeroshot/SET/METRIC, retrieval/SET/METRIC; for a folder of classes also val/acc1, val/acc5, val/mean_per_class_recall, val/ece.", PANEL_EVAL)
    patience: Optional[int] = opt(None, "With --select-best: stop after this many evaluations in a row without a new best.", PANEL_EVAL)
    max_zeroshot_drop: Optional[float] = opt(None, "With --select-best and --eval-zeroshot: only steps whose zero-shot top-1 is at most this many points below the starting model's are eligible.", PANEL_EVAL)
    # performance and output
    workers: int = opt(2, "DataLoader worker processes.", PANEL_PERF)
    cache_images: bool = opt(False, "Decode and resize every image once, into one in-memory tensor shared with the workers (small folders; not with --augment).", PANEL_PERF)
    length_buckets: bool = opt(False, "Draw each batch from captions of similar token length, so less padding is encoded (changes which pairs share a batch, hence the result).", PANEL_PERF)
    no_precompute: bool = opt(False, "Run the frozen teacher and locked towers at every step, and whole towers at every measurement, instead of once per item (less memory, more compute).", PANEL_PERF)
    grad_checkpointing: bool = opt(False, "open_clip gradient checkpointing (less memory, more compute).", PANEL_PERF)
    compile: bool = opt(False, "torch.compile the model.", PANEL_PERF)
    cache_dir: Optional[str] = opt(None, "Feature-bank cache folder [default: user cache dir].", PANEL_PERF)
    save_every: int = opt(0, "Checkpoint every N steps (0: only at epoch ends and on interrupt).", PANEL_OUTPUT)
    keep_checkpoints: int = opt(2, "Checkpoints to keep.", PANEL_OUTPUT)
    log_every: int = opt(10, "Log a metrics line every N steps.", PANEL_OUTPUT)
    report_to: str = opt("none", "Also log metrics, config and pictures to tensorboard and/or wandb (comma-separated; optional extras).", PANEL_OUTPUT)
    quiet: bool = opt(False, "Print nothing but errors and the final line.", PANEL_OUTPUT)
    json: bool = opt(False, "Print one machine-readable JSON summary at the end.", PANEL_OUTPUT)


METHOD_OPTIONS_BEFORE = "eval_zeroshot"  # methods' options sit between LoRA and evaluation (--help, run.json)


class RefineSettings:
    """What RefineConfig adds to its fields: the run's settings as the parts that use them."""

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.lora else 1e-5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def options_for(self, method: str) -> Any:
        """The method's options dataclass filled from these settings; None if it has no flags."""
        cls = OPTIONS_CLASSES.get(method)
        return None if cls is None else cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def method_options(self) -> dict[str, Any]:
        """Every registered method's options (clipfit.methods.build_methods takes them by name)."""
        return {name: self.options_for(name) for name in OPTIONS_CLASSES}


def composed_fields(core: type, options: dict[str, type]) -> list[tuple[str, Any, Any]]:
    """(name, type, field) of the core settings with each method's options inserted, in order,
    before METHOD_OPTIONS_BEFORE (no name is declared twice: clipfit.methods.options_classes)."""
    method_fields = [(f, typing.get_type_hints(cls)[f.name]) for cls in options.values() for f in fields(cls)]
    core_hints = typing.get_type_hints(core)
    composed = []
    for f in fields(core):
        if f.name == METHOD_OPTIONS_BEFORE:
            composed += [(m.name, hint, copied(m)) for m, hint in method_fields]
        composed.append((f.name, core_hints[f.name], copied(f)))
    return composed


def copied(f: Any) -> Any:
    """A fresh field like `f` (a dataclass records its own state in the field objects it is given)."""
    return field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


methods.load_plugins()  # before the options are read: a plugin may register a method with flags
OPTIONS_CLASSES = methods.options_classes({f.name for f in fields(CoreSettings)})
RefineConfig = make_dataclass("RefineConfig", composed_fields(CoreSettings, OPTIONS_CLASSES), bases=(RefineSettings,),
                              namespace={"__module__": __name__, "__qualname__": "RefineConfig", "__doc__":
                                         "Every setting of a refine run: CoreSettings and each method's options."})
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
    "layout": ("auto", "sidecar", "hf", "csv", "parquet", "datasets", "webdataset", "classes"),
}
POSITIVE = ("epochs", "batch_size", "grad_accum", "lora_rank", "keep_checkpoints", "log_every", "max_image_pixels",
            "nan_limit")
NON_NEGATIVE = ("weight_decay", "warmup_steps", "save_every", "workers", "lora_dropout", "eval_every")


def validate(c: RefineConfig) -> None:
    check_finite_numbers(c)
    for name, allowed in CHOICES.items():
        check_choice(c, name, allowed)
    for name in POSITIVE:
        check_at_least_one(c, name)
    for name in NON_NEGATIVE:
        check_not_negative(c, name)
    check_positive(c, "lr")
    if not 0 <= c.val_split < 1:
        raise UsageError(f"--val-split must be in [0, 1) (got {c.val_split})")
    if c.max_steps is not None and c.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1 (got {c.max_steps})")
    for name in ("grad_clip", "adam_eps"):
        check_positive(c, name)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise UsageError(f"{flag(name)} must be in [0, 1) (got {getattr(c, name)})")
    for options in c.method_options().values():  # every method's, as before they were split out
        options.validate()
    check_available(parse_report_to(c.report_to))
    validate_combinations(c)


def validate_selection(c: RefineConfig) -> None:
    """--select-best's form here; whether this run measures the metric is checked once its sets are known."""
    import re

    from clipfit.selection import CLASSIFIER_METRICS, MEAN_R1, SPLIT_METRICS

    split = SPLIT_METRICS + CLASSIFIER_METRICS
    form = rf"val/({'|'.join(map(re.escape, split))})|{re.escape(MEAN_R1)}|(zeroshot|retrieval)/[^/]+/[^/]+"
    if c.select_best is not None and not re.fullmatch(form, c.select_best):
        raise UsageError(f"--select-best {c.select_best!r}: choose one of {', '.join('val/' + m for m in SPLIT_METRICS)}, "
                         f"{MEAN_R1}, zeroshot/SET/METRIC or retrieval/SET/METRIC, or for a folder of classes "
                         f"{', '.join('val/' + m for m in CLASSIFIER_METRICS)}")
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
    validate_selection(c)
    if c.fail_on_zeroshot_drop is not None and not c.eval_zeroshot:
        raise UsageError("--fail-on-zeroshot-drop needs --eval-zeroshot DATASET=PATH to measure the drop")
    if c.cache_images and c.augment:
        raise UsageError("--cache-images keeps each image transformed once, which would freeze --augment's "
                         "random crops; use one or the other")
    if c.layout == "webdataset" and (c.val_split or c.cache_images):
        raise UsageError("--layout webdataset streams its shards: hold validation pairs out as their own shards "
                         "instead of --val-split, and drop --cache-images")
    if c.layout == "webdataset" and (c.classnames or c.templates):
        raise UsageError("--classnames and --templates prompt a folder of classes (--layout classes); a --layout "
                         "webdataset stream has captions of its own")
    if c.layout == "webdataset" and c.length_buckets:
        raise UsageError("--length-buckets sorts a pairs list by caption length; a --layout webdataset stream "
                         "has none: drop --length-buckets")
    if c.precision == "fp16" and c.device == "cpu":
        raise UsageError("--precision fp16 is not supported on CPU; use bf16")
