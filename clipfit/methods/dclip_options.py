"""DCLIP's options (no torch import: `clipfit refine --help` lists them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from clipfit.errors import UsageError
from clipfit.options import (PANEL_METHOD, MethodOptions, check_at_least_one, check_choice, check_not_negative,
                             check_positive, opt)


@dataclass
class DCLIPOptions(MethodOptions):
    dclip_regions: str = opt("grid", "dclip: regions: grid (full + grid + centre crop) or boxes (--dclip-boxes).", PANEL_METHOD)
    dclip_grid: int = opt(2, "dclip: grid size for --dclip-regions grid.", PANEL_METHOD)
    dclip_boxes: Optional[str] = opt(None, "dclip: JSONL of boxes: {file_name, boxes: [[x0,y0,x1,y1], ...]}.", PANEL_METHOD)
    dclip_teacher: Optional[str] = opt(None, "dclip: reuse a trained teacher.safetensors (skips stage 1).", PANEL_METHOD)
    dclip_teacher_epochs: int = opt(5, "dclip: teacher training epochs.", PANEL_METHOD)
    dclip_teacher_lr: float = opt(1e-5, "dclip: teacher Adam learning rate.", PANEL_METHOD)
    dclip_vision: str = opt("proj", "dclip: image-tower weights that train: proj (the authors': only those whose name contains 'proj', i.e. attention and output projections) or all.", PANEL_METHOD)

    def validate(self) -> None:
        check_choice(self, "dclip_regions", ("grid", "boxes"))
        check_choice(self, "dclip_vision", ("proj", "all"))
        check_at_least_one(self, "dclip_grid")
        check_not_negative(self, "dclip_teacher_epochs")
        check_positive(self, "dclip_teacher_lr")
        if self.dclip_regions == "boxes" and not self.dclip_boxes:
            raise UsageError("--dclip-regions boxes needs --dclip-boxes FILE")
        if self.dclip_boxes and self.dclip_regions != "boxes":
            raise UsageError("--dclip-boxes is only read with --dclip-regions boxes")
