"""clipfit: small-data CLIP post-training on open_clip models."""

from __future__ import annotations

__version__ = "0.1.0"


def installed_version(distribution: str) -> str | None:
    """The installed version of a Python distribution, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
