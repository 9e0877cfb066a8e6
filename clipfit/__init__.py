"""clipfit: small-data CLIP post-training on open_clip models."""

__version__ = "0.1.0"
