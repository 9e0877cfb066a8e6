"""DCLIP's stage 1: a one-layer cross-modal teacher over image regions and caption tokens.

Tokens attend to regions and regions attend to tokens (8-head attention, residual + LayerNorm
on each side); each side is attention-pooled and the teacher's image embedding is the mean of
the two pooled vectors. It is trained with symmetric InfoNCE against the frozen model's
sentence embeddings; only the teacher's own weights train.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipfit.data.dataset import EpochBatches, caption_index
from clipfit.errors import ModelError, UsageError
from clipfit.losses import info_nce, positives_of
from clipfit.rundir import DCLIP_TEACHER

HEADS = 8
POOL_TEMPERATURE = 2.0
TEACHER_TEMPERATURE = 0.05
TEACHER_FILE = DCLIP_TEACHER


def attention_pool(x: Tensor, mask: Tensor, temperature: float = POOL_TEMPERATURE) -> Tensor:
    """Σ_k a_k x_k with a_k = softmax_k(cos(x_k, x̄) / T), x̄ the mean of the valid x_k.

    x: [B, N, d]; mask: [B, N], True where x_k is real (not padding); every row needs one.
    """
    weights = mask.unsqueeze(-1).to(x.dtype)
    mean = (x * weights).sum(1) / weights.sum(1)
    logits = F.cosine_similarity(x, mean.unsqueeze(1), dim=-1) / temperature
    attention = logits.masked_fill(~mask, float("-inf")).softmax(dim=1)
    return (attention.unsqueeze(-1) * x).sum(1)


def teacher_heads(dim: int) -> int:
    """8 heads as in the paper; fewer (a divisor of 8) when the embedding size is not a multiple of 8."""
    return math.gcd(dim, HEADS)


class CrossModalTeacher(nn.Module):
    def __init__(self, dim: int, pool_temperature: float = POOL_TEMPERATURE):
        super().__init__()
        heads = teacher_heads(dim)
        self.dim, self.pool_temperature = dim, pool_temperature
        self.tokens_attend = nn.MultiheadAttention(dim, heads, batch_first=True)  # queries: tokens
        self.regions_attend = nn.MultiheadAttention(dim, heads, batch_first=True)  # queries: regions
        self.token_norm = nn.LayerNorm(dim)
        self.region_norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, token_mask: Tensor, regions: Tensor, region_mask: Tensor) -> Tensor:
        """Teacher image embeddings [B, d] from tokens [B, L, d] and regions [B, R, d] (masks: True = real)."""
        from_regions, _ = self.tokens_attend(tokens, regions, regions, key_padding_mask=~region_mask,
                                             need_weights=False)
        from_tokens, _ = self.regions_attend(regions, tokens, tokens, key_padding_mask=~token_mask,
                                             need_weights=False)
        tokens = self.token_norm(tokens + from_regions)
        regions = self.region_norm(regions + from_tokens)
        return 0.5 * attention_pool(tokens, token_mask, self.pool_temperature) + \
            0.5 * attention_pool(regions, region_mask, self.pool_temperature)


def padded(vectors: Tensor, offsets: Tensor, counts: Tensor, rows: list[int]) -> tuple[Tensor, Tensor]:
    """Rows of a flat [Σ counts, d] table cut into segments, zero-padded to [B, max, d], with the mask."""
    segments = [vectors[offsets[r]:offsets[r] + counts[r]] for r in rows]
    lengths = torch.tensor([len(s) for s in segments])
    mask = torch.arange(int(lengths.max())).unsqueeze(0) < lengths.unsqueeze(1)
    return nn.utils.rnn.pad_sequence(segments, batch_first=True), mask


def starts(counts: Tensor) -> Tensor:
    return torch.cumsum(counts, 0) - counts


@dataclass
class RegionTokenBank:
    """Frozen-model inputs of the teacher, flat: regions per pair, tokens and sentence per caption.

    Captions are numbered pair by pair: caption c of pair i is row caption_starts[i] + c.
    """

    regions: Tensor  # [Σ region_counts, d], L2-normalised
    region_counts: Tensor  # [pairs]
    tokens: Tensor  # [Σ token_counts, d], L2-normalised
    token_counts: Tensor  # [captions]
    sentences: Tensor  # [captions, d], the frozen sentence embeddings (the teacher's text side)
    caption_counts: Tensor  # [pairs]
    caption_groups: Tensor | None = None  # [captions]: positives groups (item_group); None: one-hot targets
    region_starts: Tensor = field(init=False)
    token_starts: Tensor = field(init=False)
    caption_starts: Tensor = field(init=False)

    def __post_init__(self):
        self.region_starts = starts(self.region_counts)
        self.token_starts = starts(self.token_counts)
        self.caption_starts = starts(self.caption_counts)

    @property
    def pairs(self) -> int:
        return len(self.region_counts)

    def caption_rows(self, pairs: list[int], captions: list[int]) -> list[int]:
        return [int(self.caption_starts[i]) + c for i, c in zip(pairs, captions)]

    def teacher_inputs(self, pairs: list[int], caption_rows: list[int], device) -> tuple[Tensor, ...]:
        tokens, token_mask = padded(self.tokens, self.token_starts, self.token_counts, caption_rows)
        regions, region_mask = padded(self.regions, self.region_starts, self.region_counts, pairs)
        return tokens.to(device), token_mask.to(device), regions.to(device), region_mask.to(device)


@dataclass
class TeacherTraining:
    epochs: int
    lr: float
    batch_size: int
    seed: int
    loss_per_epoch: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_teacher(teacher: CrossModalTeacher, bank: RegionTokenBank, plan: TeacherTraining, device,
                  log: Callable[[str], None]) -> TeacherTraining:
    """Symmetric InfoNCE (τ = 0.05) between teacher image and frozen sentence embeddings, Adam,
    with the batch's multi-positive targets when the bank has caption groups.

    Batches and caption choice follow the student's rules (clipfit.data.dataset), seeded."""
    started = time.time()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=plan.lr)
    teacher.train()
    for epoch in range(plan.epochs):
        losses = []
        for batch in EpochBatches(bank.pairs, plan.batch_size, plan.seed, epoch):
            pairs = [i for _, i in batch]
            chosen = [caption_index(plan.seed, epoch, i, int(bank.caption_counts[i])) for i in pairs]
            rows = bank.caption_rows(pairs, chosen)
            image = teacher(*bank.teacher_inputs(pairs, rows, device))
            positives = None if bank.caption_groups is None else positives_of(bank.caption_groups[rows])
            loss = info_nce(image, bank.sentences[rows].to(device), TEACHER_TEMPERATURE, positives=positives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        plan.loss_per_epoch.append(sum(losses) / len(losses))
        log(f"dclip teacher epoch {epoch + 1}/{plan.epochs}: InfoNCE {plan.loss_per_epoch[-1]:.4f}")
    teacher.eval()
    plan.seconds = time.time() - started
    return plan


@torch.no_grad()
def teacher_image_embeddings(teacher: CrossModalTeacher, bank: RegionTokenBank, device, batch_size: int,
                             shards=None) -> Tensor:
    """t_img for every caption row (float32, CPU): what the student's image side is pulled towards.
    Under torchrun (`shards`) each rank computes its share of the rows and every rank gets all."""
    from clipfit.distributed import Distributed, build_in_shares

    teacher.eval()
    pairs = [i for i in range(bank.pairs) for _ in range(int(bank.caption_counts[i]))]

    def targets(part: range) -> dict[str, Tensor]:
        out = []
        for start in range(part.start, part.stop, batch_size):
            rows = list(range(start, min(start + batch_size, part.stop)))
            out.append(teacher(*bank.teacher_inputs([pairs[r] for r in rows], rows, device)).float().cpu())
        return {"targets": torch.cat(out)}

    return build_in_shares(targets, len(pairs), shards or Distributed())[0]["targets"]


def save_teacher(teacher: CrossModalTeacher, path: Path, plan: TeacherTraining) -> None:
    from clipfit.io import dumps_json
    from clipfit.models import save_state_dict

    save_state_dict(teacher.state_dict(), path, {
        "clipfit": "dclip-teacher", "dim": teacher.dim, "pool_temperature": teacher.pool_temperature,
        "epochs": plan.epochs, "lr": plan.lr, "loss_per_epoch": dumps_json(plan.loss_per_epoch, indent=None),
        "seconds": plan.seconds,
    })


def load_teacher(path: str | Path) -> tuple[CrossModalTeacher, dict]:
    """A saved teacher (eval mode) and its metadata."""
    from safetensors import safe_open

    from clipfit.models import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--dclip-teacher {path}: file not found")
    state = read_state_dict(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("clipfit") != "dclip-teacher":
        raise ModelError(f"{path}: not a clipfit DCLIP teacher (no dclip-teacher metadata)")
    teacher = CrossModalTeacher(int(metadata["dim"]), float(metadata["pool_temperature"]))
    try:
        teacher.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"{path}: teacher weights do not fit ({str(e).splitlines()[0][:160]})") from None
    return teacher.eval(), metadata


def check_teacher_dim(teacher: CrossModalTeacher, dim: int, path: Path) -> None:
    if teacher.dim != dim:
        raise UsageError(f"--dclip-teacher {path}: the teacher works on {teacher.dim}-d embeddings, "
                         f"this model's are {dim}-d")
