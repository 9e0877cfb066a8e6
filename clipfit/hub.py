"""Decide where an `hf-hub:` model or a pretrained tag's weights load from before open_clip
asks the hub for them.

Without a network, huggingface_hub retries each file it cannot find in its cache for about
25 s, and open_clip asks for several; a user waited half a minute or more for a one-line
error. One HEAD request for one of the model's files, without retries, tells in seconds whether
the hub answers: if it does, open_clip loads as usual; if not, a model in the local Hugging Face
cache loads from there with the hub switched off, and any other fails at once.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

from clipfit.errors import DataError, ModelError, NetworkError, UsageError

log = logging.getLogger("clipfit")

HUB_PREFIX = "hf-hub:"
OFFLINE_HINT = "offline alternatives: --model lite0-minilm, --pretrained PATH/TO/weights.safetensors, or --pretrained none"


@dataclass(frozen=True)
class HubFiles:
    """What one model needs from the hub: `needed` holds groups of file names, and the cache
    must hold one name of every group for the model to load offline."""

    label: str  # as the user named it: hf-hub:org/name, or ARCH/TAG
    repo: str
    probe: str  # the file a HEAD request asks for
    needed: tuple[tuple[str, ...], ...]
    requires_probe: bool  # the probe file must exist (an hf-hub: model's config), else any answer will do


def check_hub_name(spec: str) -> None:
    """UsageError (exit 2), before any request, unless `spec` is hf-hub: and a valid repository id
    (`org/name` or `name`: letters, digits, '-', '_', '.', at most 96 characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = spec.removeprefix(HUB_PREFIX)
    example = "expected hf-hub:ORG/NAME, e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    if not repo:
        raise UsageError(f"{spec!r}: no repository after {HUB_PREFIX}; {example}")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        reason = first_line(e).split(". Use `repo_type`")[0]  # advice for another API
        raise UsageError(f"{spec!r}: not a Hugging Face repository id ({reason}); {example}") from None


def model_files(spec: str) -> HubFiles:
    """An `hf-hub:` model: its open_clip config and its weights."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    # open_clip loads a hub model without weights when it finds none: never silently offline
    return HubFiles(spec, spec.removeprefix(HUB_PREFIX), HF_CONFIG_NAME,
                    ((HF_CONFIG_NAME,), (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)), True)


def tag_files(arch: str, tag: str) -> HubFiles | None:
    """A pretrained tag's weights, when open_clip takes them from the hub (None: a URL download)."""
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME

    location = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", "")
    if not location:
        return None
    repo, filename = os.path.split(location)  # open_clip's convention: "org/name/" or "org/name/file"
    filename = filename or HF_WEIGHTS_NAME
    return HubFiles(f"{arch}/{tag}", repo, filename, ((*safetensors_names(filename), filename),), False)


def safetensors_names(filename: str) -> tuple[str, ...]:
    """The safetensors files open_clip prefers to `filename` when the repository has them."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if filename == HF_WEIGHTS_NAME:
        return (HF_SAFE_WEIGHTS_NAME,)
    return (filename[:-4] + ".safetensors",) if filename.endswith((".bin", ".pth")) else ()


def is_cached(files: HubFiles) -> bool:
    """Whether the local cache holds one file of every group `files` needs."""
    from huggingface_hub import try_to_load_from_cache

    return all(any(isinstance(try_to_load_from_cache(files.repo, name), str) for name in group)
               for group in files.needed)


def why_unreachable(files: HubFiles) -> str | None:
    """None when the hub answers for `files`, else why it cannot be asked.

    Raises ModelError when the hub answers that there is no such model."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(files.repo, files.probe), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        raise ModelError(f"{files.label} is gated: accept its terms on the Hugging Face hub, then log in "
                         "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{files.label}: no such model on {constants.ENDPOINT}, or it is private "
                         "(log in with `hf auth login` or HF_TOKEN)") from None
    except EntryNotFoundError:
        if files.requires_probe:
            raise ModelError(f"{files.label} is not an open_clip model: the repository has no {files.probe}") from None
    except Exception as e:  # refused, no DNS, timeout, proxy, hub down: huggingface_hub's types vary by version
        return f"cannot reach {constants.ENDPOINT} ({first_line(e)})"
    return None


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def not_cached_error(label: str, why: str, advice: str) -> ModelError:
    from huggingface_hub import constants

    return ModelError(f"could not load {label}: {why}, and it is not in the local Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}); {advice}; {OFFLINE_HINT}")


def hub_source(files: HubFiles | None) -> ContextManager:
    """A context to run open_clip's loading of `files` in: as usual, or offline from the cache.

    Raises ModelError when the model can be loaded from neither."""
    from huggingface_hub import constants

    from clipfit.starter import offline_hub

    if files is None:
        return nullcontext()
    if constants.is_offline_mode():
        if not is_cached(files):
            raise not_cached_error(files.label, "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to download it")
        return nullcontext()
    why = why_unreachable(files)
    if why is None:
        return nullcontext()
    if not is_cached(files):
        raise not_cached_error(files.label, why, f"check the network, or download it where there is one "
                                                 f"(`hf download {files.repo}`) and copy that cache here")
    log.warning("%s: %s; loading the copy in the local cache (HF_HUB_OFFLINE=1 skips this check)", files.label, why)
    return offline_hub()


def check_hub_dataset(repo: str, location: str) -> None:
    """One quick request for a hub dataset: returns when the hub answers that it exists; DataError
    (exit 3) when it says there is no such dataset or it is gated, NetworkError (exit 4) at once
    when the hub cannot be reached (huggingface_hub itself would retry for half a minute)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo, "README.md", repo_type="dataset"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except EntryNotFoundError:
        pass
    except GatedRepoError:
        raise DataError(f"{location} is gated: accept its terms on the hub, then log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise DataError(f"{location}: no such dataset on {constants.ENDPOINT}, or it is private") from None
    except Exception as e:  # refused, no DNS, timeout, proxy: huggingface_hub's types vary by version
        raise NetworkError(f"{location}: cannot reach {constants.ENDPOINT} ({first_line(e)}); "
                           "with the dataset in the local Hugging Face cache, set HF_HUB_OFFLINE=1 to use it") from None


def dataset_snapshot(location: str, patterns: list[str], example: str) -> Path:
    """The files of hub dataset `location` (hf-hub:ORG/NAME) matching `patterns`, in huggingface_hub's
    cache: fetched after one quick request (check_hub_dataset), or with HF_HUB_OFFLINE=1 from the
    cache only. UsageError for a malformed id; NetworkError (exit 4) at once without network or
    when offline and not cached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = location.removeprefix(HUB_PREFIX)
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UsageError(f"{location!r}: not a Hugging Face repository id ({first_line(e)}); "
                         f"expected hf-hub:ORG/NAME, e.g. {example}") from None
    if constants.is_offline_mode():
        try:
            return Path(snapshot_download(repo, repo_type="dataset", allow_patterns=patterns, local_files_only=True))
        except Exception:  # not in the cache: huggingface_hub's error types vary by version
            raise NetworkError(f"{location}: HF_HUB_OFFLINE is set and the dataset is not in the local Hugging Face "
                               f"cache ({constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE to download it") from None
    check_hub_dataset(repo, location)
    try:
        return Path(snapshot_download(repo, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # the hub answered a moment ago; a download broken off is a network failure
        raise NetworkError(f"{location}: download failed ({first_line(e)})") from None
