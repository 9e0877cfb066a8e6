"""Loss functions: pure, tensor in, scalar out, each with its formula.

Conventions: B is the batch size, rows of `image_features` and `text_features` are matched
pairs (row i of one goes with row i of the other). Unless a docstring says otherwise the
features are expected L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021), as in open_clip's ClipLoss.

    S = s · I Tᵀ with s = logit_scale (already exponentiated), then
    L = ½ [ CE(S, y) + CE(Sᵀ, y) ],  y_i = i,
    where CE(X, y) = −(1/B) Σ_i log softmax(X_i)_{y_i}.
    """
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between rows of a and b at a fixed temperature τ.

    L = ½ [ CE(â b̂ᵀ / τ, y) + CE(b̂ âᵀ / τ, y) ] with â, b̂ the L2-normalised rows and y_i = i.
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    return clip_loss(a, b, 1.0 / temperature)
