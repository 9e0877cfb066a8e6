"""Load open_clip models from any spec a user may give, wrap them with LoRA, save them.

A model spec is one of: an open_clip architecture name, `hf-hub:org/name`, a path to an
open_clip model-config JSON, a clipfit run folder, or the offline starter `lite0-minilm`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from clipfit.errors import ModelError, UsageError
from clipfit.hub import HUB_PREFIX, OFFLINE_HINT, check_hub_name, first_line, hub_source, model_files, tag_files
from clipfit.io import atomic_path
from clipfit.weights import PLACEHOLDER_DEVICE, assign_weights, check_loaded, placeholder_weights
from clipfit.rundir import (ADAPTER_DIR, HF_TEXT_CONFIG, MODEL_FILE, OPEN_CLIP_CONFIG, TOKENIZER_FILES, is_run_dir,
                            read_config)

log = logging.getLogger("clipfit")

DEFAULT_LORA_TARGETS = ("attn", "c_fc", "c_proj")
# `--lora-targets auto`: open_clip transformers' attention and MLP, Hugging Face text towers'
# attention projections; whichever the model has.
AUTO_LORA_TARGETS = DEFAULT_LORA_TARGETS + ("query", "key", "value")


@dataclass
class LoadedModel:
    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    arch: str  # what open_clip calls the architecture
    model_cfg: dict
    preprocess_cfg: dict
    pretrained: str
    source: dict = field(default_factory=dict)  # how it was loaded, for run.json

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or self.model_cfg.get("text_cfg", {}).get("context_length", 77))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: no MPS device is available on this machine")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name!r} is not one of auto, cpu, cuda, mps")
    return torch.device(name)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights from safetensors, or from a pickle only under weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelError(f"{path}: not a valid safetensors file ({e})") from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"{path}: refused to load: this pickle needs more than plain tensors to unpickle "
            f"(weights_only=True rejected it: {str(e).splitlines()[0][:160]}); convert it to safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0][:160]})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def load_weights_into(model: nn.Module, path: str | Path) -> None:
    import open_clip

    state = read_state_dict(path)
    state = open_clip.factory.convert_state_dict(model, state) if hasattr(open_clip.factory, "convert_state_dict") else state
    check_shapes(model, state, path)
    missing, unexpected = assign_weights(model, state)
    if missing or unexpected:
        raise ModelError(
            f"{path}: weights do not fit the architecture "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )


def check_shapes(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """ModelError naming the first tensor whose shape differs from the model's (load_state_dict
    would raise a many-line RuntimeError listing them all)."""
    expected = model.state_dict()
    wrong = [name for name, tensor in state.items() if name in expected and tensor.shape != expected[name].shape]
    if wrong:
        name = wrong[0]
        others = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ModelError(f"{path}: tensor {name} has shape {list(state[name].shape)}, the architecture needs "
                         f"{list(expected[name].shape)}{others}; these weights are for a different model")


def non_finite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, t in named if t.is_floating_point() and not torch.isfinite(t).all()]


def register_config_file(path: Path) -> str:
    """Make an open_clip model-config JSON known to open_clip; return its architecture name."""
    import open_clip

    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read model config ({e})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: model config is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UsageError(f"{path}: model config needs embed_dim, vision_cfg and text_cfg")
    check_attention_heads(cfg, path)
    open_clip.add_model_config(path)
    return path.stem


def check_attention_heads(cfg: dict, path: Path) -> None:
    """ModelError naming the field when a tower of `cfg` would get no attention heads, or heads
    that do not divide its width; open_clip would build it and fail deep inside torch."""
    for tower, field, heads, width in attention_heads(cfg):
        if heads < 1 or width % heads:
            problem = "no attention heads" if heads < 1 else f"{heads} attention heads, which do not divide {width}"
            raise ModelError(f"{path}: {tower}.{field} gives {problem}")


def attention_heads(cfg: dict) -> list[tuple[str, str, int, int]]:
    """(tower, the field that sets its heads, heads, attention width) as open_clip derives them:
    a ViT has width // head_width heads (head_width defaults to 64), a ModifiedResNet's pooling
    width * 32 // head_width over width * 32, a text transformer `heads` (default 8) over width
    (default 512). Towers from timm or Hugging Face, and non-integer fields, are not checked here."""
    found = []
    vision, text = cfg.get("vision_cfg"), cfg.get("text_cfg")
    if isinstance(vision, dict) and not vision.get("timm_model_name"):
        width, head_width = vision.get("width", 768), vision.get("head_width", 64)
        if is_integer(width) and is_integer(head_width) and head_width > 0:
            resnet = isinstance(vision.get("layers"), (list, tuple))
            width = width * 32 if resnet else width
            field = f"width {vision.get('width', 768)} with head_width {head_width}" + (
                "" if "head_width" in vision else " (open_clip's default)")
            found.append(("vision_cfg", field, width // head_width, width))
    if isinstance(text, dict) and not text.get("hf_model_name"):
        heads, width = text.get("heads", 8), text.get("width", 512)
        if is_integer(heads) and is_integer(width):
            found.append(("text_cfg", f"heads {heads} with width {width}", heads, width))
    return found


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unknown_model_error(name: str) -> UsageError:
    import open_clip

    close = difflib.get_close_matches(name, open_clip.list_models() + ["lite0-minilm"], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `clipfit models` lists them"
    return UsageError(f"unknown model {name!r}: not an open_clip architecture, config JSON, run folder or hf-hub: spec{hint}")


def resolve_arch(spec: str) -> tuple[str, dict]:
    """Map a user's --model to an open_clip architecture name (registering configs as needed)."""
    import open_clip

    path = Path(spec)
    if spec.endswith(".json"):
        if not path.is_file():
            raise UsageError(f"{spec}: model config file not found")
        return register_config_file(path), {"kind": "config", "path": str(path.resolve())}
    if spec in open_clip.list_models():
        return spec, {"kind": "builtin"}
    if spec.replace("/", "-") in open_clip.list_models():
        return spec.replace("/", "-"), {"kind": "builtin"}
    raise unknown_model_error(spec)


def create(arch: str, placeholders: bool = False, **kwargs):
    """open_clip's model and transforms; with `placeholders`, for weights loaded next (placeholder_weights)."""
    import open_clip

    with warnings.catch_warnings(), placeholder_weights() if placeholders else nullcontext():
        warnings.simplefilter("ignore")
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            arch, **kwargs, **(PLACEHOLDER_DEVICE if placeholders else {}))
    return model, preprocess_train, preprocess_val


def load_pretrained_tag(arch: str, tag: str):
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        hint = f"known tags for {arch}: {', '.join(tags)}" if tags else f"{arch} has no published tags"
        raise UsageError(f"unknown pretrained tag {tag!r} for {arch} ({hint}), and no file of that name exists")
    try:
        with hub_source(tag_files(arch, tag)):
            return create(arch, pretrained=tag)
    except ModelError:
        raise
    except Exception as e:  # chained, so --debug shows the cause the message points to
        raise ModelError(f"could not download the {arch}/{tag} weights (no network, or the hub is unreachable; "
                         f"--debug shows why); {OFFLINE_HINT}") from e


def load_hub(spec: str) -> LoadedModel:
    import open_clip

    check_hub_name(spec)
    with hub_source(model_files(spec)):  # the tokenizer's config comes from the hub too
        try:
            model, preprocess_train, preprocess_val = create(spec)
            tokenizer = open_clip.get_tokenizer(spec)
        except Exception as e:
            raise ModelError(f"could not load {spec} from the Hugging Face hub ({first_line(e)}; "
                             f"--debug shows more); {OFFLINE_HINT}") from e
    return LoadedModel(model, preprocess_train, preprocess_val, tokenizer, spec,
                       getattr(model, "model_cfg", {}) or {}, dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
                       "hub", {"kind": "hf-hub"})


def text_tower_overrides(folder: Path, model_cfg: dict) -> dict:
    """Build a Hugging Face text tower from the folder's own config.json, not from its hub id."""
    text_cfg = model_cfg.get("text_cfg", {})
    if not text_cfg.get("hf_model_name") or not (folder / HF_TEXT_CONFIG).is_file():
        return {}
    # every weight comes from model.safetensors; the tower only needs its architecture
    return {"text_cfg": {**text_cfg, "hf_model_name": str(folder.resolve()), "hf_model_pretrained": False}}


@contextmanager
def quiet_load(offline: bool) -> Iterator[None]:
    """Without warnings and transformers' chatter; with the hub switched off when nothing needs it."""
    from clipfit.starter import offline_hub, quiet_loading

    with ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if offline:
            stack.enter_context(offline_hub())
        if find_spec("transformers") is not None:
            stack.enter_context(quiet_loading())
        yield


def folder_tokenizer(spec: str, folder: Path, model_cfg: dict):
    """open_clip's tokenizer of the folder; a run folder written before folders held their
    tokenizer files (clipfit 0.1.0) has a Hugging Face tokenizer only by the name its config gives."""
    import open_clip

    text_cfg = model_cfg.get("text_cfg", {})
    name = text_cfg.get("hf_tokenizer_name")
    if name and not any((folder / file).is_file() for file in TOKENIZER_FILES):
        return open_clip.tokenizer.HFTokenizer(name, context_length=text_cfg.get("context_length", 77))
    return open_clip.get_tokenizer(spec)


def open_folder(folder: Path):
    """(model, preprocess_train, preprocess_val, tokenizer, config) of a run folder (clipfit.rundir)
    through open_clip's `local-dir:`.

    open_clip builds the model, its preprocessing and tokenizer from the folder; the weights are
    then read by clipfit's checked loader, so a damaged or mismatched model.safetensors is one
    line naming the file and tensor rather than open_clip's traceback (the tensors are the same)."""
    import open_clip

    config = read_config(folder)
    check_attention_heads(config["model_cfg"], folder / OPEN_CLIP_CONFIG)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise ModelError(f"{folder}: run folder has no {MODEL_FILE} (did the run finish? try --resume)")
    spec = f"local-dir:{folder}"
    overrides = text_tower_overrides(folder, config["model_cfg"])
    try:
        with quiet_load(offline=bool(overrides)), placeholder_weights():
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                spec, load_weights=False, pretrained_text=False, **PLACEHOLDER_DEVICE, **overrides)
            tokenizer = folder_tokenizer(spec, folder, config["model_cfg"])
    except Exception as e:  # open_clip and transformers raise many types; --debug shows the cause
        raise ModelError(f"{folder}: cannot build the model its {OPEN_CLIP_CONFIG} describes ({first_line(e)})") from e
    load_weights_into(model, weights)
    check_loaded(model, str(weights))
    return model, preprocess_train, preprocess_val, tokenizer, config


def load_run_dir(path: Path) -> LoadedModel:
    """A run folder, through open_clip's `local-dir:` loader, whatever the model (clipfit.rundir)."""
    model, preprocess_train, preprocess_val, tokenizer, config = open_folder(path)
    return LoadedModel(model, preprocess_train, preprocess_val, tokenizer, config.get("clipfit", {}).get("arch", path.name),
                       config["model_cfg"], dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
                       str(path / MODEL_FILE), {"kind": "run", "path": str(path)})


def load_starter(aligned: bool = True) -> LoadedModel:
    from clipfit import starter

    try:
        model, preprocess_train, preprocess_val, tokenizer = starter.create_starter(aligned=aligned)
    except starter.StarterMissing as e:
        raise ModelError(str(e)) from None
    return LoadedModel(model, preprocess_train, preprocess_val, tokenizer, starter.STARTER_NAME,
                       starter.portable_model_config(), dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
                       "aligned" if aligned else "towers-only", {"kind": "starter"})


def load_model(spec: str, pretrained: str | None = "none") -> LoadedModel:
    """Load `spec` with `pretrained` weights (an open_clip tag, a local file, or 'none')."""
    import open_clip

    pretrained = pretrained or "none"
    if spec == "lite0-minilm":
        return load_starter(aligned=pretrained != "none")
    if is_run_dir(Path(spec)):
        return load_run_dir(Path(spec))
    if spec.startswith(HUB_PREFIX):
        return load_hub(spec)
    arch, source = resolve_arch(spec)
    if pretrained == "none":
        log.warning("--pretrained none: %s starts from RANDOM weights; this is only useful for tests", arch)
        model, preprocess_train, preprocess_val = create(arch, pretrained_text=False)
    elif Path(pretrained).is_file():
        model, preprocess_train, preprocess_val = create(arch, placeholders=True, pretrained_text=False)
        load_weights_into(model, pretrained)
        check_loaded(model, pretrained)
    elif Path(pretrained).suffix in (".safetensors", ".pt", ".pth", ".bin"):
        raise UsageError(f"--pretrained {pretrained}: file not found")
    else:
        model, preprocess_train, preprocess_val = load_pretrained_tag(arch, pretrained)
    return LoadedModel(model, preprocess_train, preprocess_val, open_clip.get_tokenizer(arch), arch,
                       open_clip.get_model_config(arch) or {}, dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
                       pretrained, source)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for a while, then every submodule back to its own mode.

    model.train(True) afterwards would also put frozen BatchNorm layers back into training mode,
    where a small batch overwrites their running statistics."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# --- text encoding at the batch's real length ----------------------------------------------

def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """`model.encode_text(tokens)`, computed on the tokens the output depends on.

    The batch is trimmed to its longest real sequence (clipfit.data.tokens.trim_tokens, which
    knows each text tower); the features are those of the padded batch up to float rounding,
    and so are the gradients. Towers it does not know run on the full batch."""
    from clipfit.data.tokens import text_trim_rule, trim_tokens

    rule = text_trim_rule(model)
    short = trim_tokens(tokens, rule)
    if rule.native and short.shape[1] < native_text_tower(model).positional_embedding.shape[0]:
        features = causal_text_features(model, short, rule)
    else:
        features = model.encode_text(short)  # open_clip's default: unnormalised
    return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def native_text_tower(model: nn.Module) -> nn.Module:
    """open_clip's TextTransformer of a CustomTextCLIP, or the CLIP model that holds its text modules itself."""
    inner = base_model(model)
    return inner.text if getattr(inner, "text", None) is not None else inner


def causal_text_features(model: nn.Module, tokens: torch.Tensor, rule) -> torch.Tensor:
    """open_clip's causal text transformer (CLIP's own, or a TextTransformer) on a batch shorter
    than its context: what its forward computes, with the positional embedding and the causal
    mask sliced to the batch's length (open_clip's own forward would refuse the shorter batch)."""
    from open_clip.transformer import text_global_pool

    tower = native_text_tower(model)
    length = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask[:length, :length]))
    pooled = text_global_pool(x, tokens, rule.pool, eos_token_id=rule.eos_id)
    projection = tower.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection


# --- LoRA -----------------------------------------------------------------------------------

def matching_modules(model: nn.Module, targets: list[str]) -> list[str]:
    return [name for name, _ in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)]


def adaptable_names(model: nn.Module) -> list[str]:
    """Distinct last names of the Linear and MultiheadAttention modules: what --lora-targets may name."""
    kinds = (nn.Linear, nn.MultiheadAttention)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})


def resolve_lora_targets(model: nn.Module, spec: str) -> list[str]:
    if spec.strip() == "auto":
        return [t for t in AUTO_LORA_TARGETS if matching_modules(model, [t])]
    return [t.strip() for t in spec.split(",") if t.strip()]


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on the named submodules; only adapters train."""
    from peft import LoraConfig, get_peft_model

    if not targets or not matching_modules(model, targets):
        raise UsageError(f"--lora-targets {','.join(targets) or 'auto'} match no module of this model; "
                         f"this model's linear/attention modules are named: {', '.join(adaptable_names(model)[:12])}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def base_model(model: nn.Module) -> nn.Module:
    """The open_clip model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_logit_scale(model: nn.Module) -> torch.Tensor:
    """The open_clip model's own logit scale (log-space), through a peft or DistributedDataParallel wrapper."""
    inner = base_model(model)
    return getattr(inner, "module", inner).logit_scale


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Store a convolutional image tower's weights channels-last on CPU, where oneDNN's
    convolutions run faster in that layout (EfficientNet-Lite0's forward + backward about 1.5×,
    docs/performance.md); outputs and gradients are the same to float rounding, and saved weights
    are written contiguous as before. A ViT (one patch convolution) and other devices keep their
    layout: no gain was measured there."""
    visual = getattr(base_model(model), "visual", None)
    convolutions = sum(isinstance(m, nn.Conv2d) for m in visual.modules()) if visual is not None else 0
    if device.type != "cpu" or convolutions < 2:
        return False
    visual.to(memory_format=torch.channels_last)
    return True


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain open_clip model with LoRA deltas folded in; the trained wrapper is left intact.

    peft 0.21 adds an nn.MultiheadAttention adapter's out_proj delta twice, but in the training
    forward as well as here, so the merged model is the trained one and needs no correction
    (tests/test_lora_merge.py; peft PR #3774).
    """
    import copy

    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()


# --- saving ---------------------------------------------------------------------------------

def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    # clone() breaks storage sharing, which safetensors refuses to serialise
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def save_model(loaded: LoadedModel, model: nn.Module, run_dir: Path) -> None:
    """Write model.safetensors (+ adapter/ for LoRA), the tokenizer and text-tower config files,
    and open_clip_config.json into run_dir: a folder plain open_clip loads (clipfit.rundir)."""
    from clipfit import rundir

    plain = merged_copy(model)
    save_state_dict(plain.state_dict(), run_dir / MODEL_FILE, {"format": "pt", "arch": loaded.arch})
    if plain is not model:
        save_adapter(model, run_dir / ADAPTER_DIR)
    rundir.write_text_tower(run_dir, plain, loaded.tokenizer)
    rundir.write_config(run_dir, loaded.model_cfg, loaded.preprocess_cfg, loaded.arch, loaded.pretrained)


def save_adapter(model: nn.Module, folder: Path) -> None:
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=folder.parent))
    model.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def describe(loaded: LoadedModel) -> dict[str, Any]:
    return {"arch": loaded.arch, "pretrained": loaded.pretrained, **loaded.source}
