"""The run-folder contract: a run folder is an open_clip `local-dir:` folder that works anywhere.

What a run folder holds for loading, and who reads it:
  open_clip_config.json   model_cfg + preprocess_cfg in open_clip's format, plus a `clipfit` block
                          (architecture and starting weights by name) that open_clip ignores
  model.safetensors       the full state dict with open_clip's key names
  tokenizer files         what `save_pretrained` writes, for a Hugging Face tokenizer:
                          `open_clip.get_tokenizer("local-dir:RUN")` reads them from the folder
  config.json             a Hugging Face text tower's transformers config

No file a loader reads holds an absolute path: a text tower that was built from a local folder
is named by its hub id (the starter's MiniLM: sentence-transformers/all-MiniLM-L6-v2) or, when
clipfit cannot know one, by the folder's name. open_clip 3.3 builds a Hugging Face text tower
from `text_cfg.hf_model_name` (a hub id or a path), never from the local-dir folder, so plain
open_clip needs that model's config.json from the hub or the local Hugging Face cache (one
small file; all weights come from model.safetensors). clipfit needs nothing outside the folder:
it builds such a tower from the folder's config.json, through the same `local-dir:` loader.

run.json and report.md are records, not loader inputs: they may name where the data and the
starting model came from on the machine that made the run.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import ExitStack, contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterator

from clipfit.errors import ModelError
from clipfit.io import write_json

log = logging.getLogger("clipfit")

OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's own `local-dir:` and hub format
MODEL_FILE = "model.safetensors"
HF_TEXT_CONFIG = "config.json"  # transformers' name for a model config
HF_NAME_KEYS = ("hf_model_name", "hf_tokenizer_name")
# What a tokenizer or config records about how it was loaded here, not what it is.
LOAD_TIME_KEYS = ("is_local", "local_files_only", "name_or_path", "_name_or_path")


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file()


def portable_name(name: str) -> str:
    """A hub id stays; a local path becomes the folder's name (clipfit cannot know its hub id)."""
    path = Path(name)
    if not (path.is_absolute() or path.exists()):
        return name
    log.warning("the text tower came from the local folder %s; the run folder names it %r, which plain "
                "open_clip resolves on the hub (clipfit loads it from the run folder)", name, path.name)
    return path.name


def portable_model_cfg(model_cfg: dict) -> dict:
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    for key in HF_NAME_KEYS:
        if text_cfg.get(key):
            text_cfg[key] = portable_name(str(text_cfg[key]))
    return {**model_cfg, "text_cfg": text_cfg}


def portable_weights_name(pretrained: str) -> str:
    """A tag as it is; a weights file by its name only."""
    return Path(pretrained).name if ("/" in pretrained or Path(pretrained).exists()) else pretrained


def write_text_tower(folder: Path, model, tokenizer) -> list[str]:
    """A Hugging Face tokenizer's files and text tower's config into `folder`; the names written."""
    written = []
    save_tokenizer = getattr(tokenizer, "save_pretrained", None)
    if callable(save_tokenizer):  # open_clip's HFTokenizer; its own CLIP tokenizer needs no files
        before = set(p.name for p in folder.iterdir())
        save_tokenizer(str(folder))
        written += sorted(set(p.name for p in folder.iterdir()) - before)
        drop_load_time_keys(folder / "tokenizer_config.json")
    text_config = getattr(getattr(model, "text", None), "config", None)
    if text_config is not None and hasattr(text_config, "to_dict"):
        # to_dict() is what transformers' save_pretrained writes, less where it was loaded from
        write_json(folder / HF_TEXT_CONFIG, {k: v for k, v in text_config.to_dict().items()
                                             if k not in LOAD_TIME_KEYS})
        written.append(HF_TEXT_CONFIG)
    return sorted(set(written))


def drop_load_time_keys(path: Path) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    write_json(path, {k: v for k, v in config.items() if k not in LOAD_TIME_KEYS})


def write_config(folder: Path, model_cfg: dict, preprocess_cfg: dict, arch: str, pretrained: str) -> None:
    write_json(folder / OPEN_CLIP_CONFIG, {
        "model_cfg": portable_model_cfg(model_cfg),
        "preprocess_cfg": preprocess_cfg,
        "clipfit": {"arch": arch, "pretrained": portable_weights_name(pretrained)},
    })


def read_config(folder: Path) -> dict[str, Any]:
    """A run folder's open_clip_config.json; ModelError (exit 4) when it is not one clipfit wrote."""
    from clipfit.hub import first_line

    path = folder / OPEN_CLIP_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable model config ({first_line(e)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelError(f"{path}: not an open_clip model config (no model_cfg object)")
    if not isinstance(config.get("clipfit"), dict):
        config["clipfit"] = {}
    return config


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


def open_folder(folder: Path):
    """(model, preprocess_train, preprocess_val, tokenizer, config) through open_clip's `local-dir:`.

    open_clip builds the model, its preprocessing and tokenizer from the folder; the weights are
    then read by clipfit's checked loader, so a damaged or mismatched model.safetensors is one
    line naming the file and tensor rather than open_clip's traceback (the tensors are the same)."""
    import open_clip

    from clipfit.hub import first_line
    from clipfit.models import load_weights_into

    config = read_config(folder)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise ModelError(f"{folder}: run folder has no {MODEL_FILE} (did the run finish? try --resume)")
    spec = f"local-dir:{folder}"
    overrides = text_tower_overrides(folder, config["model_cfg"])
    try:
        with quiet_load(offline=bool(overrides)):
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                spec, load_weights=False, pretrained_text=False, **overrides)
            tokenizer = open_clip.get_tokenizer(spec)
    except Exception as e:  # open_clip and transformers raise many types; --debug shows the cause
        raise ModelError(f"{folder}: cannot build the model its {OPEN_CLIP_CONFIG} describes ({first_line(e)})") from e
    load_weights_into(model, weights)
    return model, preprocess_train, preprocess_val, tokenizer, config
