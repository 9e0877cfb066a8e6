"""The teacher's inputs, from the frozen starting model: region embeddings and token embeddings.

Regions: each crop through the image tower (projected, L2-normalised). Tokens: the text
tower's per-token final states, start/end/padding dropped, through the text projection
(L2-normalised, like the regions, so neither side dominates the attention). Both are cached
with clipfit.cache.FeatureCache, keyed by everything they depend on, and built once per run
under torchrun (each rank encodes its share of the pairs).
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from clipfit.cache import FeatureCache, captions_hash, images_hash, starting_model_identity
from clipfit.data.dataset import open_checked
from clipfit.data.tokens import text_trim_rule, trim_tokens
from clipfit.dclip.regions import Regions
from clipfit.errors import UsageError
from clipfit.features import ordered_loader
from clipfit.models import base_model, encode_text, evaluating
from clipfit.progress import track

CACHE_FORMAT = 1


class _RegionCrops(Dataset):
    def __init__(self, pairs, regions: Regions, preprocess, max_pixels: int):
        self.pairs, self.regions, self.preprocess, self.max_pixels = pairs, regions, preprocess, max_pixels

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        pair = self.pairs[i]
        image = open_checked(pair, self.max_pixels)
        boxes = self.regions.boxes(pair.key, *image.size)
        return torch.stack([self.preprocess(image.crop(box)) for box in boxes])


def _concat_crops(items: list[Tensor]) -> tuple[Tensor, Tensor]:
    return torch.cat(items), torch.tensor([len(crops) for crops in items])


def frozen(model: nn.Module):
    """The starting model: with LoRA, the student with its adapters off (exactly the start)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


@torch.no_grad()
def encode_regions(model: nn.Module, pairs, regions: Regions, preprocess, device, batch_size: int,
                   workers: int = 0, max_pixels: int = 0) -> dict[str, Tensor]:
    """{"regions": [Σ R_i, d] normalised crop embeddings in pair order, "region_counts": [pairs]}."""
    vectors, counts = [], []
    with frozen(model), ordered_loader(_RegionCrops(pairs, regions, preprocess, max_pixels), batch_size,
                                       workers, collate_fn=_concat_crops) as loader:
        for pixels, per_image in track(loader, "dclip: image regions", len(pairs), size=lambda batch: len(batch[1])):
            vectors.append(F.normalize(model.encode_image(pixels.to(device)).float(), dim=-1).cpu())
            counts.append(per_image)
    return {"regions": torch.cat(vectors), "region_counts": torch.cat(counts)}


def project(states: Tensor, projection) -> Tensor:
    if projection is None:
        return states
    if isinstance(projection, nn.Module):
        return projection(states)
    return states @ projection


def token_tap(model: nn.Module) -> tuple[nn.Module, object, callable]:
    """(module whose output holds per-token states, projection, how to read that output).

    Native CLIP and open_clip's TextTransformer apply ln_final to every token before pooling;
    a Hugging Face tower (HFTextEncoder) exposes last_hidden_state before its pooler.
    """
    inner = base_model(model)
    text = getattr(inner, "text", None)
    if hasattr(inner, "ln_final") and hasattr(inner, "token_embedding"):
        return inner.ln_final, inner.text_projection, lambda out: out
    if text is not None and hasattr(text, "ln_final") and getattr(text, "cls_emb", None) is None:
        return text.ln_final, text.text_projection, lambda out: out
    if text is not None and hasattr(text, "transformer") and hasattr(text, "proj") and hasattr(text, "config"):
        return text.transformer, text.proj, lambda out: out.last_hidden_state
    raise UsageError(f"--method dclip: cannot read per-token states from this text tower "
                     f"({type(text or inner).__name__}); supported: CLIP's own text transformer, "
                     "open_clip TextTransformer without a class token, Hugging Face text towers")


def token_states(model: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(sentence embeddings [B, d], projected per-token states [B, L, d]) in one text-tower pass.

    L is the batch's real length: the tower runs on `tokens` trimmed of the padding that no output
    depends on (clipfit.data.tokens.trim_tokens), so states exist for `tokens[:, :L]` only."""
    module, projection, read = token_tap(model)
    tokens = trim_tokens(tokens, text_trim_rule(model))
    captured = []
    handle = module.register_forward_hook(lambda _m, _inputs, output: captured.append(read(output)))
    try:
        sentence = encode_text(model, tokens)
    finally:
        handle.remove()
    states = captured[-1]
    if states.dim() != 3 or states.shape[1] != tokens.shape[1]:
        raise UsageError("--method dclip: this text tower pools before its last layer, so per-token "
                         "states cannot be read")
    return sentence, project(states, projection)


def special_token_ids(tokenizer) -> Tensor:
    """Start, end and padding ids: whatever the tokenizer emits for an empty caption."""
    return torch.unique(tokenizer([""])[0])


@torch.no_grad()
def encode_tokens(model: nn.Module, captions: list[str], tokenizer, device, batch_size: int) -> dict[str, Tensor]:
    """{"tokens": [Σ L_j, d], "token_counts": [captions], "sentences": [captions, d]}, all normalised.

    A caption with no content token left (all special) keeps its sentence embedding as its one token.
    """
    special = special_token_ids(tokenizer).to(device)
    rule = text_trim_rule(model)  # states exist for the trimmed batch only (token_states)
    vectors, counts, sentences = [], [], []
    with frozen(model):
        chunks = (captions[start:start + batch_size] for start in range(0, len(captions), batch_size))
        for chunk in track(chunks, "dclip: caption tokens", len(captions)):
            ids = trim_tokens(tokenizer(chunk).to(device), rule)
            sentence, states = token_states(model, ids)
            content = ~torch.isin(ids, special)
            for row in range(len(ids)):
                kept = states[row][content[row]] if content[row].any() else sentence[row:row + 1]
                vectors.append(F.normalize(kept.float(), dim=-1).cpu())
                counts.append(len(kept))
            sentences.append(F.normalize(sentence.float(), dim=-1).cpu())
    return {"tokens": torch.cat(vectors), "token_counts": torch.tensor(counts), "sentences": torch.cat(sentences)}


def keys_hash(pairs) -> str:
    """The pairs' relative names, which a boxes file is matched on."""
    return hashlib.sha256("\n".join(p.key for p in pairs).encode()).hexdigest()[:16]


def cached_inputs(ctx, regions: Regions, cache: FeatureCache, run) -> dict[str, Tensor]:
    """Region and token embeddings of the training pairs, from the feature cache or encoded now;
    under torchrun each rank encodes its share of the pairs (contiguous, so the flat tables and
    their per-pair counts concatenate in pair order) and all ranks map the same entries. `run`: the
    run's clipfit.methods.base.RunContext (its starting model, batch size, workers, pixel limit)."""
    loaded, model = ctx.loaded, ctx.model
    encoder = starting_model_identity(run.model, run.pretrained, run.seed)

    def captions_of(part: range) -> list[str]:
        return [caption for i in part for caption in ctx.pairs[i].captions]

    with evaluating(model):
        region_part = cache.get_or_build(
            {"kind": "dclip-regions", "encoder": encoder, "images": images_hash(ctx.pairs),
             "keys": keys_hash(ctx.pairs), "regions": regions.identity(),
             "preprocess": loaded.preprocess_cfg, "format": CACHE_FORMAT},
            lambda part: encode_regions(model, [ctx.pairs[i] for i in part], regions, loaded.preprocess_val,
                                        ctx.device, run.batch_size, run.workers, run.max_image_pixels),
            shards=ctx.dist, items=len(ctx.pairs), rows={"region_counts": len(ctx.pairs)})
        token_part = cache.get_or_build(
            {"kind": "dclip-tokens", "encoder": encoder, "captions": captions_hash(ctx.pairs),
             "context_length": loaded.context_length, "format": CACHE_FORMAT},
            lambda part: encode_tokens(model, captions_of(part), loaded.tokenizer, ctx.device, run.batch_size),
            shards=ctx.dist, items=len(ctx.pairs), rows={"token_counts": len(captions_of(range(len(ctx.pairs))))})
    return {**region_part, **token_part}
