"""Decide where an `hf-hub:` model loads from before open_clip asks the hub for it.

Without a network, huggingface_hub retries each file it cannot find in its cache for about
25 s, and open_clip asks for several; a user waited half a minute or more for a one-line
error. One HEAD request for the model's config, without retries, tells in seconds whether the
hub answers: if it does, open_clip loads as usual; if not, a model in the local Hugging Face
cache loads from there with the hub switched off, and any other fails at once.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import ContextManager

from clipfit.errors import ModelError

log = logging.getLogger("clipfit")

HUB_PREFIX = "hf-hub:"
OFFLINE_HINT = "offline alternatives: --model lite0-minilm, --pretrained PATH/TO/weights.safetensors, or --pretrained none"


def repo_of(spec: str) -> str:
    return spec.removeprefix(HUB_PREFIX)


def is_cached(repo: str) -> bool:
    """Whether the local cache holds what open_clip needs offline: the config and weights."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, filename), str)

    # open_clip loads a hub model without weights when it finds none: never silently offline
    return cached(HF_CONFIG_NAME) and (cached(HF_SAFE_WEIGHTS_NAME) or cached(HF_WEIGHTS_NAME))


def why_unreachable(spec: str) -> str | None:
    """None when the hub serves `spec`'s config, else why it cannot be asked.

    Raises ModelError when the hub answers that there is no such model."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
    from open_clip.constants import HF_CONFIG_NAME

    try:
        get_hf_file_metadata(hf_hub_url(repo_of(spec), HF_CONFIG_NAME), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        raise ModelError(f"{spec} is gated: accept its terms on the Hugging Face hub, then log in "
                         "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{spec}: no such model on {constants.ENDPOINT}, or it is private "
                         "(log in with `hf auth login` or HF_TOKEN)") from None
    except EntryNotFoundError:
        raise ModelError(f"{spec} is not an open_clip model: the repository has no {HF_CONFIG_NAME}") from None
    except Exception as e:  # refused, no DNS, timeout, proxy, hub down: huggingface_hub's types vary by version
        return f"cannot reach {constants.ENDPOINT} ({first_line(e)})"
    return None


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def not_cached_error(spec: str, why: str, advice: str) -> ModelError:
    from huggingface_hub import constants

    return ModelError(f"could not load {spec}: {why}, and it is not in the local Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}); {advice}; {OFFLINE_HINT}")


def hub_source(spec: str) -> ContextManager:
    """A context to run open_clip's loading of `spec` in: as usual, or offline from the cache.

    Raises ModelError when the model can be loaded from neither."""
    from huggingface_hub import constants

    from clipfit.starter import offline_hub

    if constants.is_offline_mode():
        if not is_cached(repo_of(spec)):
            raise not_cached_error(spec, "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to download it")
        return nullcontext()
    why = why_unreachable(spec)
    if why is None:
        return nullcontext()
    if not is_cached(repo_of(spec)):
        raise not_cached_error(spec, why, f"check the network, or download it where there is one "
                                          f"(`hf download {repo_of(spec)}`) and copy that cache here")
    log.warning("%s: %s; loading the copy in the local cache (HF_HUB_OFFLINE=1 skips this check)", spec, why)
    return offline_hub()
