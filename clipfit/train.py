"""The one training loop. It knows models, batches, optimisers and checkpoints; what the
loss is comes from the methods (clipfit.methods.Composite)."""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from clipfit.checkpoint import (checkpoint_paths, drop_newer, load_latest, prune_checkpoints, rng_state, save_checkpoint,
                                set_rng_state)
from clipfit.data.dataset import EpochBatches, batches_per_epoch
from clipfit.data.workers import Loader, ignore_stop_signals
from clipfit.errors import Interrupted, OutputError, TrainingError, UsageError
from clipfit.best import TrainingEvaluations
from clipfit.distributed import Distributed, average_gradients, gather_features
from clipfit.frozen.prepare import FrozenInputs
from clipfit.io import append_jsonl, read_jsonl, truncate_jsonl
from clipfit.methods import Composite
from clipfit.methods.base import StepInputs
from clipfit.models import base_logit_scale, non_finite_tensors
from clipfit.parallel import PairEncoder
from clipfit.precision import autocast
from clipfit.progress import Progress
from clipfit.rundir import CHECKPOINT_DIR, METRICS_JSONL
from clipfit.trackers import Trackers


@dataclass
class Position:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already consumed
    nan_skipped: int = 0
    rows: int = 0  # metrics.jsonl rows written: a resumed run goes on from exactly these


@dataclass
class LoopSettings:
    epochs: int
    total_steps: int
    grad_accum: int
    batch_size: int
    seed: int
    precision: str
    grad_clip: float | None
    nan_policy: str
    nan_limit: int
    save_every: int
    keep_checkpoints: int
    log_every: int
    workers: int
    rank: int = 0
    world_size: int = 1
    eval_every: int = 0  # measure every N optimiser steps; 0: at the end of each epoch
    multi_positive: bool = True  # pass the batches' positives groups on to the step (StepInputs.groups)


def no_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: biases, norms, gains and the logit scale get no weight decay."""
    return param.ndim < 2 or "bias" in name or "logit_scale" in name or ".ln" in name or "norm" in name


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, decay_all: bool = False):
    """AdamW; open_clip's decay groups unless `decay_all` (decay on every parameter, torch's plain
    AdamW(model.parameters()) as CLIP-Refine's and DCLIP's code use it)."""
    trainable = [(n, p) for n, p in named_params if p.requires_grad]
    exempt = (lambda n, p: False) if decay_all else no_decay
    groups = [
        {"params": [p for n, p in trainable if exempt(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in trainable if not exempt(n, p)], "weight_decay": weight_decay},
    ]
    # torch's fused kernel: the same update to float rounding, ~5x faster a step on CPU (benchmarks/adamw_step.py)
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for _, p in trainable)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps, then constant, cosine to 0, or linear to 0 (at `total`),
    the last as transformers' get_linear_schedule_with_warmup."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def steps_per_epoch(n_items: int, s: LoopSettings) -> int:
    return max(1, batches_per_epoch(n_items, s.batch_size, s.world_size) // s.grad_accum)


def freeze_batchnorm(model: nn.Module) -> None:
    """Small post-training batches would corrupt BatchNorm running statistics: keep them fixed."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes the current step, checkpoints and stops.
    A second signal stops at once, without a new checkpoint."""

    def __init__(self):
        self.signal: int | None = None

    def __bool__(self):
        return self.signal is not None

    @contextmanager
    def installed(self):
        def handler(signum, _frame):
            if self.signal is not None:  # asked twice: stop now; atomic writes keep the last checkpoint whole
                raise KeyboardInterrupt
            self.signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@dataclass
class Trainer:
    model: nn.Module
    methods: Composite
    dataset: Dataset | IterableDataset
    settings: LoopSettings
    device: torch.device
    run_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    frozen: FrozenInputs  # the teacher, locked towers' rows, and what stays in eval mode
    progress: Progress
    resume_command: str = ""
    position: Position = field(default_factory=Position)
    stop: StopFlag = field(default_factory=StopFlag)
    evaluator: TrainingEvaluations | None = None  # measures the model during training
    scaler: torch.amp.GradScaler | None = None
    is_main: bool = True
    encoder: nn.Module | None = None  # both towers in one forward (clipfit.parallel.PairEncoder)
    trackers: Trackers | None = None  # --report-to, rank 0 only
    # The starting model's identity (clipfit.cache.cache_key of it): checkpoints hold only what trains,
    # so --resume must build the frozen weights from the very same start.
    starting_model: str | None = None
    data_loader: Loader | None = field(default=None, init=False, repr=False)
    saved_step: int | None = field(default=None, init=False)  # step of the newest checkpoint
    stopped_early: bool = field(default=False, init=False)  # the evaluator said stop (--patience)

    @property
    def distributed(self) -> Distributed:
        return Distributed(self.settings.rank, self.settings.world_size)

    def __post_init__(self):
        if self.encoder is None:
            self.encoder = PairEncoder(self.model, self.frozen.rests)

    # --- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": changing_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "methods": {m.name: m.state_dict() for m in self.methods.methods},
            "position": vars(self.position).copy(),
            "rng": rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "evaluations": self.evaluator.state_dict() if self.evaluator is not None else {},
            "starting_model": self.starting_model,
        }

    def save(self) -> Path | None:
        if not self.is_main:
            return None
        self.check_finite_weights()  # a checkpoint of NaN weights would replace a good one
        try:
            path = save_checkpoint(self.run_dir, self.position.step, self.state(), self.settings.keep_checkpoints)
        except OutputError as e:
            if not checkpoint_paths(self.run_dir):  # --resume would have nothing to continue from
                raise OutputError(f"{e}; no checkpoint was kept: free space, then start again with --overwrite") from None
            raise OutputError(f"{e}; free space, then resume from the last good checkpoint with: "
                              f"{self.resume_command}") from None
        self.saved_step = self.position.step
        return path

    def restore(self) -> None:
        found = load_latest(self.run_dir, self.progress.warn)
        if found is None:  # never silently from step 0: the old run's metrics and run.json would lie
            raise UsageError(f"--resume: no usable checkpoint in {self.run_dir / CHECKPOINT_DIR} "
                             f"({'all damaged' if checkpoint_paths(self.run_dir) else 'none was written'}), "
                             "nothing to continue from; start again with --overwrite instead of --resume")
        path, state = found
        if state.get("starting_model", self.starting_model) != self.starting_model:
            raise UsageError("--resume refused: the starting model is not the one the run started from (its files "
                             "or the installed torch, open_clip or clipfit changed), and checkpoints hold only the "
                             "weights that train; start again with --overwrite")
        if self.is_main:
            drop_newer(self.run_dir, path)
            prune_checkpoints(self.run_dir, self.settings.keep_checkpoints)  # a kill may have cut a save's pruning short
        load_changing_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for method in self.methods.methods:
            method.load_state_dict(state["methods"].get(method.name, {}))
        self.position = Position(**state["position"])
        self.saved_step = self.position.step
        set_rng_state(state["rng"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.evaluator is not None:
            self.stopped_early = self.evaluator.load_state_dict(state.get("evaluations", {}))
        step = self.position.step
        if step > self.settings.total_steps:
            raise UsageError(f"--resume refused: the checkpoint is at step {step}, past the {self.settings.total_steps} "
                             "steps this command asks for (--max-steps)")
        if self.is_main:
            self.keep_metrics(state["position"].get("rows"))

    def keep_metrics(self, rows: int | None) -> None:
        """metrics.jsonl as it was when the checkpoint was written: its first `rows` rows. (By step
        alone, an epoch's validation row logged after the checkpoint of the epoch's last step, at the
        same step, would be kept and then logged again.) A checkpoint from before rows were counted
        keeps every row up to its step."""
        path = self.run_dir / METRICS_JSONL
        if rows is None:
            rows = sum(1 for row in read_jsonl(path) if row.get("step", 0) <= self.position.step)
        self.position.rows = rows
        truncate_jsonl(path, rows)

    # --- one step -------------------------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.settings.precision)

    def encoder_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """What the encoder takes for this batch: pixels and tokens, or locked towers' rows."""
        inputs = {"image": batch.get("image"), "text": batch["text"], **self.frozen.step_inputs(batch, self.device)}
        return (inputs["image"].to(self.device, non_blocking=True),
                inputs["text"].to(self.device, non_blocking=True))

    def step_inputs(self, window: list[dict], images: torch.Tensor, texts: torch.Tensor, image_raw: torch.Tensor,
                    text_raw: torch.Tensor, logit_scale: torch.Tensor) -> StepInputs:
        """The step's batch: every micro-batch of the window, rows in window order."""
        cached: list = []

        def teacher():
            if not cached:
                outputs = [self.frozen.teacher_features(batch) for batch in window]
                cached.append(tuple(None if rows[0] is None else torch.cat(rows) for rows in zip(*outputs)))
            return cached[0]

        captions = [batch.get("caption") for batch in window]
        groups = [batch.get("group") for batch in window] if self.settings.multi_positive else [None]
        # One draw per step over the whole batch: every pair of every micro-batch gets its own.
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + self.position.step)
        return StepInputs(
            images=images, texts=texts, indices=torch.cat([batch["index"] for batch in window]),
            image_raw=image_raw, text_raw=text_raw,
            image=nn.functional.normalize(image_raw, dim=-1), text=nn.functional.normalize(text_raw, dim=-1),
            logit_scale=logit_scale, generator=generator, step=self.position.step, teacher=teacher,
            captions=None if captions[0] is None else torch.cat(captions),
            gather=lambda t: gather_features(t, self.distributed),
            groups=None if groups[0] is None else torch.cat(groups),
        )

    def loss(self, step: StepInputs) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's weighted loss, and its parts as numbers for the log."""
        parts = self.methods.losses(step)
        total = self.methods.total(parts)
        if not torch.isfinite(total):
            bad = [name for name, value in parts.items() if not torch.isfinite(value)] or ["total"]
            raise NonFinite(", ".join(bad))
        values = {name: value.detach().float().item() for name, value in parts.items()}
        values["loss"] = total.detach().float().item()
        return total, values

    def backward(self, total: torch.Tensor) -> None:
        total = total.float()
        (self.scaler.scale(total) if self.scaler is not None else total).backward()

    def step_gradients(self, window: list[dict]) -> dict[str, float]:
        """Gradients of one optimiser step over the micro-batches in `window` (--grad-accum)."""
        if len(window) == 1:
            with self.autocast():
                images, texts = self.encoder_inputs(window[0])
                total, values = self.loss(self.step_inputs(window, images, texts, *self.encoder(images, texts)))
            self.backward(total)
            return values
        return self.accumulated_gradients(window)

    def accumulated_gradients(self, window: list[dict]) -> dict[str, float]:
        """Several micro-batches as ONE contrastive batch, the gradient of open_clip's --accum-freq.

        1. Encode every micro-batch without gradients (each forward's RNG state is kept).
        2. Compute the methods' loss once over the whole batch, on those embeddings as leaf
           tensors: every batch-level term sees all rows as negatives; backward stops at them.
        3. Re-run each micro-batch's forward with gradients, replaying its RNG state (same dropout),
           and backpropagate its rows' slice of the embeddings' gradient into the model.
        The model's gradient equals that of one batch of all rows (open_clip recomputes the loss per
        micro-batch with the other rows constant, which sums to the same); the cost is one extra
        forward per micro-batch and memory for one micro-batch's activations. Method parameters
        and the logit scale enter the loss once, so they get their gradient once.
        """
        inputs, states, encoded = [], [], []
        with torch.no_grad(), self.autocast():
            for batch in window:
                inputs.append(self.encoder_inputs(batch))
                states.append(torch_rng_state(self.device))
                encoded.append(self.encoder(*inputs[-1]))
        image_raw, text_raw = (torch.cat(rows).detach().requires_grad_() for rows in list(zip(*encoded))[:2])
        logit_scale = encoded[0][2].detach().requires_grad_()
        with self.autocast():
            images, texts = (torch.cat(rows) for rows in zip(*inputs))
            total, values = self.loss(self.step_inputs(window, images, texts, image_raw, text_raw, logit_scale))
        self.backward(total)
        after_loss = torch_rng_state(self.device)
        start = 0
        for j, (images, texts) in enumerate(inputs):
            rows = slice(start, start + len(images))
            start = rows.stop
            set_torch_rng_state(states[j], self.device)
            with self.autocast():
                live = self.encoder(images, texts)
            leaves = (image_raw, text_raw, logit_scale if j == 0 else None)  # the scale's gradient once
            pairs = [(out, leaf.grad if leaf is logit_scale else leaf.grad[rows])
                     for out, leaf in zip(live, leaves) if leaf is not None and leaf.grad is not None
                     and out.requires_grad]
            if pairs:
                torch.autograd.backward([out for out, _ in pairs], [grad.to(out.dtype) for out, grad in pairs])
        set_torch_rng_state(after_loss, self.device)
        return values

    def optimizer_step(self) -> None:
        average_gradients(self.methods.parameters(), self.distributed)  # DDP holds only the model's
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.settings.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():  # CLIP's logit-scale clamp at ln(100)
            base_logit_scale(self.model).clamp_(0, math.log(100))

    # --- the loop -------------------------------------------------------------------------
    def loader(self, epoch: int, start_batch: int) -> Loader:
        """One Loader for the whole run, so worker processes persist across epochs (`run` closes
        it); its sampler is moved to each epoch (items carry their epoch, see PairDataset). A
        stream gets a loader per epoch, closed when the epoch ends: workers copy the stream."""
        s = self.settings
        if isinstance(self.dataset, IterableDataset):
            self.dataset.move_to(epoch, start_batch)
            return Loader(self.dataset, batch_size=None, num_workers=s.workers, generator=self.loader_generator(),
                          worker_init_fn=ignore_stop_signals, pin_memory=self.device.type == "cuda")
        if self.data_loader is None:
            lengths = self.dataset.caption_tokens if getattr(self.dataset, "token_lengths", None) else None
            sampler = EpochBatches(len(self.dataset), s.batch_size, s.seed, epoch, start_batch, s.rank, s.world_size,
                                   lengths)
            self.data_loader = Loader(self.dataset, batch_sampler=sampler, num_workers=s.workers,
                                      generator=self.loader_generator(), worker_init_fn=ignore_stop_signals,
                                      pin_memory=self.device.type == "cuda", persistent_workers=s.workers > 0)
        self.data_loader.batch_sampler.move_to(epoch, start_batch)
        return self.data_loader

    @contextmanager
    def epoch_batches(self, epoch: int, start_batch: int):
        loader = self.loader(epoch, start_batch)
        try:
            yield iter(loader)
        finally:
            if loader is not self.data_loader:
                loader.close()

    def loader_generator(self) -> torch.Generator:
        # A DataLoader otherwise draws its worker seed from the global RNG each time it is iterated,
        # and a resumed run, which starts one more iteration, would drift from the uninterrupted one.
        return torch.Generator().manual_seed(self.settings.seed * 1_000_033)

    def run(self) -> Position:
        s = self.settings
        per_epoch = steps_per_epoch(len(self.dataset), s)
        self.model.train()
        freeze_batchnorm(self.model)
        for module in self.frozen.eval_modules:
            module.eval()
        try:
            with self.stop.installed():
                while self.position.step < s.total_steps and self.position.epoch < s.epochs and not self.stopped_early:
                    self.run_epoch(per_epoch)
                    if self.position.batch >= per_epoch * s.grad_accum:
                        self.end_epoch()
        finally:  # success, error or interrupt: the workers end here, not at interpreter exit
            self.close_loader()
        if self.saved_step != self.position.step:  # stopped mid-epoch by --max-steps: --resume continues here
            self.save()
        return self.position

    def close_loader(self) -> None:
        if self.data_loader is not None:
            self.data_loader.close()
            self.data_loader = None

    def run_epoch(self, per_epoch: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.epoch_batches(self.position.epoch, self.position.batch) as batches:
            self.run_batches(batches, per_epoch)

    def run_batches(self, batches, per_epoch: int) -> None:
        s = self.settings
        window: list[dict] = []  # the micro-batches of one optimiser step
        started = time.perf_counter()
        for batch in batches:
            if self.position.batch >= per_epoch * s.grad_accum:
                break
            self.position.batch += 1
            window.append(batch)
            if len(window) < s.grad_accum:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            try:
                values = self.step_gradients(window)
            except NonFinite as e:
                self.handle_non_finite(str(e))
                window.clear()
                continue
            pairs = sum(len(batch["index"]) for batch in window) * s.world_size
            window.clear()
            self.optimizer_step()
            self.optimizer.zero_grad(set_to_none=True)
            self.position.step += 1
            self.log_step(values, pairs, time.perf_counter() - started)
            if s.eval_every and self.position.step % s.eval_every == 0 and self.evaluate(self.position.epoch):
                return
            started = time.perf_counter()
            if s.save_every and self.position.step % s.save_every == 0:
                self.save()
            if self.stop:
                self.interrupt()
            if self.position.step >= s.total_steps:
                return

    def end_epoch(self) -> None:
        finished = self.position.epoch
        self.position.epoch += 1
        self.position.batch = 0
        if not self.settings.eval_every:
            self.evaluate(finished)
        self.save()
        if self.stop:
            self.interrupt()

    def evaluate(self, epoch: int, broadcast: bool = True) -> bool:
        """Measure the model now (on rank 0; every rank learns its verdict) and log the row; True when
        the evaluator says stop (--patience)."""
        if self.evaluator is None:
            return False
        measure = lambda: self.evaluator.evaluate(self.position.step, epoch)  # noqa: E731
        row, self.stopped_early = self.distributed.from_main(measure) if broadcast else measure()
        if row and self.is_main:
            self.record({"step": self.position.step, "epoch": epoch, **row})
        return self.stopped_early

    def handle_non_finite(self, terms: str) -> None:
        s = self.settings
        self.position.nan_skipped += 1
        where = f"step {self.position.step + 1}, term(s) {terms}"
        if s.nan_policy == "skip" and self.position.nan_skipped <= s.nan_limit:
            self.progress.warn(f"non-finite loss at {where}: step skipped ({self.position.nan_skipped}/{s.nan_limit})")
            return
        if s.nan_policy == "skip":
            raise self.training_failed(f"too many skipped steps ({s.nan_limit}, --nan-limit) at {where}")
        raise self.training_failed(f"non-finite loss at {where}", "or --nan-policy skip")

    def check_finite_weights(self) -> None:
        """Only trainable weights change, so only they can have turned non-finite."""
        bad = non_finite_tensors((name, p) for name, p in self.model.named_parameters() if p.requires_grad)
        if bad:
            raise self.training_failed(f"non-finite weights after step {self.position.step} ({len(bad)} tensor(s), "
                                       f"e.g. {bad[0]}): a gradient was NaN or infinite")

    def training_failed(self, what: str, also: str = "") -> TrainingError:
        """Where it broke, what was kept, and what to change."""
        kept = (f"the last good checkpoint is kept in {self.run_dir / CHECKPOINT_DIR}" if checkpoint_paths(self.run_dir)
                else "no checkpoint was written yet")
        return TrainingError(f"{what}; {kept}. Start again (new --out, or --overwrite) with a lower --lr, "
                             f"--precision fp32 or --grad-clip 1.0{' ' + also if also else ''}")

    def interrupt(self) -> None:
        self.save()
        name = signal.Signals(self.stop.signal).name
        raise Interrupted(f"stopped by {name} after step {self.position.step}; checkpoint saved. Resume with: "
                          f"{self.resume_command}")

    def log_step(self, values: dict[str, float], pairs: int, seconds: float) -> None:
        s, step = self.settings, self.position.step
        row = {"step": step, "epoch": self.position.epoch, "lr": self.optimizer.param_groups[0]["lr"],
               "pairs_per_s": pairs / max(seconds, 1e-9), **values}
        self.progress.step(row, s.total_steps)
        if self.is_main and (step % s.log_every == 0 or step == s.total_steps or step == 1):
            self.record(row)

    def record(self, row: dict[str, Any]) -> None:
        """The one place metrics rows are written: metrics.jsonl, and the --report-to trackers."""
        append_jsonl(self.run_dir / METRICS_JSONL, row)
        self.position.rows += 1
        if self.trackers:
            self.trackers.log(row)


class NonFinite(Exception):
    pass


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def changing_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: the trainable parameters and every buffer. The frozen
    weights are the starting model's, which --resume builds again (it refuses another --model,
    --pretrained or --seed), so a run with locked towers writes its heads, not the whole model."""
    kept = trainable_names(model) | {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in kept}


def load_changing_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A checkpoint's model tensors into `model`; a whole state dict (as earlier versions wrote) loads too."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    absent = sorted((set(missing) & trainable_names(model)) | set(unexpected))
    if absent:
        raise UsageError(f"--resume: the checkpoint does not fit this model (e.g. {absent[0]}); "
                         "start again with --overwrite")


def torch_rng_state(device: torch.device) -> tuple:
    """The torch RNG state a forward pass draws from (dropout): CPU, and the device's own."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_torch_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)

