"""CLIP-PING's options (no torch import: `clipfit refine --help` lists them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from clipfit.options import PANEL_METHOD, MethodOptions, check_at_least_one, check_choice, check_positive, opt


@dataclass
class PingOptions(MethodOptions):
    ping_image_encoder: Optional[str] = opt(None, "ping: frozen image encoder (open_clip spec) [default: the starting model].", PANEL_METHOD)
    ping_text_encoder: Optional[str] = opt(None, "ping: frozen text encoder (open_clip spec or local HF/sentence-transformers folder).", PANEL_METHOD)
    ping_k: int = opt(1, "ping: sample the neighbour from the top k.", PANEL_METHOD)
    ping_temperature: float = opt(0.07, "ping: InfoNCE temperature of the neighbour terms.", PANEL_METHOD)
    ping_index: str = opt("auto", "ping: faiss index: flat (exact), ivf, or auto (ivf above 100k items).", PANEL_METHOD)

    def validate(self) -> None:
        check_choice(self, "ping_index", ("auto", "flat", "ivf"))
        check_at_least_one(self, "ping_k")
        check_positive(self, "ping_temperature")
