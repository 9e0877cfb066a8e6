"""CLIP-PING (Thwal et al. 2024), reconstructed: nearest neighbours in frozen encoders' feature
spaces as extra contrastive targets.

Before training every pair is encoded once by a frozen image encoder (bank U, N×d_I) and a
frozen text encoder (bank W, N×d_T), cached on disk, and each item's nearest other items are
found with faiss. A step then only looks targets up: learnable linear heads map the student's
embeddings into the frozen spaces and `ping_loss` pulls them towards the neighbours' embeddings
(intra-modal: NN, cross-modal: XNN). The formulation is ours; see docs/methods.md.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch
from torch import nn

from clipfit.errors import UsageError
from clipfit.cache import FeatureCache, cache_key, captions_hash, images_hash, items_built_by_rank
from clipfit.features import image_bank, text_bank
from clipfit.losses import clip_loss, ping_loss
from clipfit.methods.base import Method, both_towers_read
from clipfit.models import encode_text
from clipfit.neighbours import index_kind, nearest_neighbours
from clipfit.rundir import PING_HEADS

HEADS_FILE = PING_HEADS
BANK_FORMAT = 1
HEAD_NAMES = ("h_I", "h_T", "x_I", "x_T")


class PingHeads(nn.Module):
    """h_I: f_v→d_I, h_T: f_t→d_T (NN); x_I: f_v→d_T, x_T: f_t→d_I (XNN); linear, no bias."""

    def __init__(self, student_dim: int, image_dim: int, text_dim: int, identity: dict[str, bool], seed: int):
        super().__init__()
        out_dims = {"h_I": image_dim, "h_T": text_dim, "x_I": text_dim, "x_T": image_dim}
        generator = torch.Generator().manual_seed(seed)
        for name in HEAD_NAMES:
            head = nn.Linear(student_dim, out_dims[name], bias=False)
            with torch.no_grad():
                if identity[name] and out_dims[name] == student_dim:
                    head.weight.copy_(torch.eye(student_dim))
                else:  # nn.Linear's default scale, drawn from our own generator so the run's RNG is untouched
                    bound = student_dim ** -0.5
                    head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 * bound - bound)
            self.add_module(name, head)


class Ping(Method):
    name = "ping"
    terms = {"clip": 1.0, "nn": 0.5, "xnn": 0.5}

    def __init__(self, options, run):
        super().__init__(options, run)
        self.heads: PingHeads | None = None
        self.image_bank = self.text_bank = None
        self.image_neighbours = self.text_neighbours = None
        self.facts: dict = {}
        self.term_seconds: list[float] = []
        self.step_seconds: list[float] = []
        self.last_call: float | None = None

    def outputs_read(self, terms):
        return both_towers_read(terms, "clip" in terms)

    # --- before training ------------------------------------------------------------------
    def prepare(self, ctx) -> None:
        from clipfit.methods.ping_encoders import image_encoder, text_encoder

        n, k = len(ctx.pairs), self.options.ping_k
        if k >= n:
            raise UsageError(f"--ping-k {k} needs more than {k} training pairs "
                             f"(there are {n}): each pair's neighbours exclude the pair itself")
        cache = FeatureCache(ctx.cache_dir, log=ctx.log, warn=ctx.warn)
        encoders = {"image": image_encoder(self.options.ping_image_encoder, ctx, self.run),
                    "text": text_encoder(self.options.ping_text_encoder, ctx, self.run)}
        started = time.perf_counter()
        keys = {tower: self.bank_key(tower, encoder, ctx.pairs) for tower, encoder in encoders.items()}
        self.image_bank, self.text_bank = (
            cache.get_or_build(keys[tower], partial(self.build_bank, tower, encoders[tower], ctx),
                               shards=ctx.dist, items=n, rows={"bank": n})["bank"]
            for tower in ("image", "text"))
        bank_seconds = time.perf_counter() - started
        self.find_neighbours(cache, keys, ctx)
        self.heads = self.make_heads(ctx, encoders)
        encoded = items_built_by_rank(cache, [key["kind"] for key in keys.values()], ctx.dist)
        self.facts = {
            "image_encoder": encoders["image"].label, "text_encoder": encoders["text"].label,
            "bank_items": n, "image_dim": self.image_bank.shape[1], "text_dim": self.text_bank.shape[1],
            "bank_cache_image": "built" if any(encoded["ping-image"]) else "hit",
            "bank_cache_text": "built" if any(encoded["ping-text"]) else "hit",
            "bank_items_encoded_by_rank": encoded,
            "bank_build_seconds": round(bank_seconds, 3),
            "bank_bytes_fp16": 2 * n * (self.image_bank.shape[1] + self.text_bank.shape[1]),
            **self.facts,
        }

    def bank_key(self, tower: str, encoder, pairs) -> dict:
        data = images_hash(pairs) if tower == "image" else captions_hash(pairs)
        recipe = ("encoder's evaluation transform, no augmentation" if tower == "image"
                  else "normalised mean of the normalised embeddings of every caption")
        return {"kind": f"ping-{tower}", "format": BANK_FORMAT, "encoder": encoder.identity, "data": data,
                "items": len(pairs), "preprocessing": recipe}

    def build_bank(self, tower: str, encoder, ctx, part: range) -> dict:
        """The `tower` bank rows of the pairs in `part` (all of them in a single process)."""
        pairs = [ctx.pairs[i] for i in part]
        share = f" (pairs {part.start}-{part.stop - 1} on this process)" if len(pairs) < len(ctx.pairs) else ""
        ctx.log(f"ping: encoding the {tower} bank of {len(ctx.pairs)} pairs{share} with the frozen {encoder.label}")
        loaded = encoder.load()
        batch, workers = self.run.batch_size, self.run.workers
        if tower == "image":
            bank = image_bank(pairs, loaded.encode, loaded.preprocess, batch, workers, self.run.max_image_pixels)
        else:
            bank = text_bank(pairs, loaded.encode, batch)
        return {"bank": bank}

    def find_neighbours(self, cache: FeatureCache, bank_keys: dict, ctx) -> None:
        """Top-k neighbours in each bank, computed once (the banks are frozen; under torchrun by
        rank 0 alone) and cached with them."""
        k, kind = self.options.ping_k, index_kind(self.image_bank.shape[0], self.options.ping_index)
        key = {"kind": "ping-neighbours", "format": BANK_FORMAT, "k": k, "index": kind,
               "image_bank": cache_key(bank_keys["image"]), "text_bank": cache_key(bank_keys["text"])}
        started = time.perf_counter()

        def search() -> dict:
            ctx.log(f"ping: searching {k} neighbour(s) per item ({kind} index)")
            return {"image": nearest_neighbours(self.image_bank, k, kind),
                    "text": nearest_neighbours(self.text_bank, k, kind)}

        found = cache.get_or_build(key, search, shards=ctx.dist)
        self.image_neighbours, self.text_neighbours = found["image"].long(), found["text"].long()
        self.facts = {"index": kind, "k": k, "neighbour_seconds": round(time.perf_counter() - started, 3)}

    def make_heads(self, ctx, encoders) -> PingHeads:
        with torch.no_grad():
            probe = encode_text(ctx.model, ctx.loaded.tokenizer(["a"]).to(ctx.device))
        identity = {"h_I": encoders["image"].is_starting_model, "h_T": encoders["text"].is_starting_model,
                    "x_I": encoders["text"].is_starting_model, "x_T": encoders["image"].is_starting_model}
        heads = PingHeads(probe.shape[-1], self.image_bank.shape[1], self.text_bank.shape[1], identity,
                          self.run.seed)
        return heads.to(ctx.device)

    # --- each step ------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters()) if self.heads is not None else []

    def neighbour_picks(self, step) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank rows (item ids) of each pair's image- and text-space neighbour (one of the top k),
        for every pair of the global batch: each rank draws the picks a single process would."""
        device = step.image.device
        indices = step.gather(step.indices.to(device)).cpu().long()
        k = self.options.ping_k
        image_pick = torch.randint(0, k, (len(indices),), generator=step.generator) if k > 1 else torch.zeros_like(indices)
        text_pick = torch.randint(0, k, (len(indices),), generator=step.generator) if k > 1 else torch.zeros_like(indices)
        return self.image_neighbours[indices, image_pick], self.text_neighbours[indices, text_pick]

    def neighbour_targets(self, step) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-bank embeddings of the neighbours `neighbour_picks` draws."""
        return self.targets(*self.neighbour_picks(step), step.image.device)

    def targets(self, image_nn: torch.Tensor, text_nn: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_bank[image_nn].to(device).float(), self.text_bank[text_nn].to(device).float()

    def losses(self, step, wanted):
        started = self.clock(step.image.device)
        parts = {}
        if "nn" in wanted or "xnn" in wanted:
            # Over the global batch (rows of every rank), as the contrastive loss: a distributed
            # step then equals a single-process step over the same pairs.
            image, text = step.gather(step.image.float()), step.gather(step.text.float())
            image_nn, text_nn = self.neighbour_picks(step)
            image_target, text_target = self.targets(image_nn, text_nn, step.image.device)
            h, tau, positives = self.heads, self.options.ping_temperature, step.positives()
            # small heads and unit-norm targets: float32 keeps the τ=0.07 logits exact under autocast
            with torch.autocast(step.image.device.type, enabled=False):
                # pairs sharing a neighbour share a target, and positives are not negatives: ping_loss ignores both
                if "nn" in wanted:
                    parts["nn"] = ping_loss(h.h_I(image), h.h_T(text), image_target, text_target, tau, image_nn, text_nn,
                                            positives)
                if "xnn" in wanted:
                    parts["xnn"] = ping_loss(h.x_I(image), h.x_T(text), text_target, image_target, tau, text_nn, image_nn,
                                             positives)
        self.record_time(started, self.clock(step.image.device))
        if "clip" in wanted:
            parts["clip"] = clip_loss(step.gather(step.image), step.gather(step.text), step.logit_scale,
                                      step.positives())
        return parts

    @staticmethod
    def clock(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def record_time(self, started: float, ended: float) -> None:
        """Time of the neighbour terms, and the time between calls (one training micro-step)."""
        self.term_seconds.append(ended - started)
        if self.last_call is not None:
            self.step_seconds.append(started - self.last_call)
        self.last_call = started

    # --- state and outputs ----------------------------------------------------------------
    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.heads.state_dict().items()} if self.heads is not None else {}

    def load_state_dict(self, state):
        if state and self.heads is not None:
            self.heads.load_state_dict(state)

    def save(self, run_dir):
        from clipfit.models import save_state_dict

        save_state_dict(self.heads.state_dict(), run_dir / HEADS_FILE, {
            "image_encoder": self.facts.get("image_encoder"), "text_encoder": self.facts.get("text_encoder"),
            "temperature": self.options.ping_temperature})

    def report(self):
        facts = dict(self.facts)
        if self.term_seconds:
            facts["neighbour_terms_ms_per_step_median"] = round(1000 * statistics.median(self.term_seconds), 3)
        if self.step_seconds:
            step = statistics.median(self.step_seconds)
            facts["step_ms_median"] = round(1000 * step, 3)
            facts["neighbour_terms_share_of_step"] = round(statistics.median(self.term_seconds) / step, 4) if step else None
        return facts


def load_heads(path) -> dict[str, torch.Tensor]:
    """The head weights a run saved (h_I, h_T, x_I, x_T), e.g. to keep training them."""
    from clipfit.models import read_state_dict

    return read_state_dict(path)
