"""The one training loop. It knows models, batches, optimisers and checkpoints; what the
loss is comes from the methods (clipfit.methods.Composite)."""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import IterableDataset

from clipfit.checkpoint import checkpoint_paths, load_latest, rng_state, save_checkpoint, set_rng_state
from clipfit.data.dataset import EpochBatches, batches_per_epoch
from clipfit.data.workers import Loader, ignore_stop_signals
from clipfit.errors import Interrupted, OutputError, TrainingError, UsageError
from clipfit.io import append_jsonl, truncate_jsonl
from clipfit.methods.base import StepInputs
from clipfit.parallel import Distributed, PairEncoder, average_gradients, gather_features
from clipfit.rundir import CHECKPOINT_DIR, METRICS_JSONL

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Position:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already consumed
    nan_skipped: int = 0


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


def no_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: biases, norms, gains and the logit scale get no weight decay."""
    return param.ndim < 2 or "bias" in name or "logit_scale" in name or ".ln" in name or "norm" in name


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float):
    trainable = [(n, p) for n, p in named_params if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in trainable if not no_decay(n, p)], "weight_decay": weight_decay},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
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
    methods: Any  # clipfit.methods.Composite
    dataset: Any
    settings: LoopSettings
    device: torch.device
    run_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: Any
    teacher: Callable[[dict], tuple[torch.Tensor, torch.Tensor]] | None
    progress: Any  # clipfit.progress.Progress
    resume_command: str = ""
    position: Position = field(default_factory=Position)
    stop: StopFlag = field(default_factory=StopFlag)
    on_epoch_end: Callable[[int], dict] | None = None
    scaler: Any = None
    is_main: bool = True
    encoder: nn.Module | None = None  # both towers in one forward (clipfit.parallel.PairEncoder)
    locked: Any = None  # clipfit.towers.LockedInputs: precomputed inputs of the encoder's cached towers
    frozen_modules: list[nn.Module] = field(default_factory=list)  # kept in eval mode while training
    trackers: Any = None  # clipfit.trackers.Trackers (--report-to), rank 0 only
    data_loader: Loader | None = field(default=None, init=False, repr=False)
    saved_step: int | None = field(default=None, init=False)  # step of the newest checkpoint

    @property
    def distributed(self) -> Distributed:
        return Distributed(self.settings.rank, self.settings.world_size)

    def __post_init__(self):
        if self.encoder is None:
            self.encoder = PairEncoder(self.model)

    # --- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": {k: v for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "methods": {m.name: m.state_dict() for m in self.methods.methods},
            "position": vars(self.position).copy(),
            "rng": rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
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
        _path, state = found
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for method in self.methods.methods:
            method.load_state_dict(state["methods"].get(method.name, {}))
        self.position = Position(**state["position"])
        self.saved_step = self.position.step
        set_rng_state(state["rng"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        step = self.position.step
        if step > self.settings.total_steps:
            raise UsageError(f"--resume refused: the checkpoint is at step {step}, past the {self.settings.total_steps} "
                             "steps this command asks for (--max-steps)")
        truncate_jsonl(self.run_dir / METRICS_JSONL, lambda row: row.get("step", 0) <= step)

    # --- one step -------------------------------------------------------------------------
    @staticmethod
    def autocast_for(device: torch.device, precision: str) -> Callable:
        dtype = AUTOCAST[precision]
        return lambda: torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    def autocast(self):
        return self.autocast_for(self.device, self.settings.precision)()

    def step_inputs(self, batch: dict) -> StepInputs:
        inputs = {"image": batch.get("image"), "text": batch["text"]}
        if self.locked is not None:
            inputs.update(self.locked.step_inputs(batch, self.device))
        images = inputs["image"].to(self.device, non_blocking=True)
        texts = inputs["text"].to(self.device, non_blocking=True)
        image_raw, text_raw, logit_scale = self.encoder(images, texts)
        cached: list = []

        def teacher():
            if not cached:
                cached.append(self.teacher(batch))
            return cached[0]

        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + self.position.step)
        return StepInputs(
            images=images, texts=texts, indices=batch["index"], image_raw=image_raw, text_raw=text_raw,
            image=nn.functional.normalize(image_raw, dim=-1), text=nn.functional.normalize(text_raw, dim=-1),
            logit_scale=logit_scale, generator=generator, step=self.position.step, teacher=teacher,
            captions=batch.get("caption"), gather=lambda t: gather_features(t, self.distributed),
        )

    def micro_step(self, batch: dict) -> dict[str, float]:
        with self.autocast():
            parts = self.methods.losses(self.step_inputs(batch))
            total = self.methods.total(parts)
        if not torch.isfinite(total):
            bad = [name for name, value in parts.items() if not torch.isfinite(value)] or ["total"]
            raise NonFinite(", ".join(bad))
        scaled = total.float() / self.settings.grad_accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        values = {name: value.detach().float().item() for name, value in parts.items()}
        values["loss"] = total.detach().float().item()
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
        for module in self.frozen_modules:
            module.eval()
        try:
            with self.stop.installed():
                while self.position.step < s.total_steps and self.position.epoch < s.epochs:
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
        accumulated: list[dict[str, float]] = []
        started = time.perf_counter()
        for batch in batches:
            if self.position.batch >= per_epoch * s.grad_accum:
                break
            self.position.batch += 1
            try:
                accumulated.append(self.micro_step(batch))
            except NonFinite as e:
                self.handle_non_finite(str(e))
                accumulated.clear()
                self.optimizer.zero_grad(set_to_none=True)
                continue
            if len(accumulated) < s.grad_accum:
                continue
            self.optimizer_step()
            self.optimizer.zero_grad(set_to_none=True)
            self.position.step += 1
            self.log_step(accumulated, len(batch["index"]) * s.grad_accum * s.world_size, time.perf_counter() - started)
            accumulated.clear()
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
        summary = self.on_epoch_end(finished) if self.on_epoch_end else {}
        if summary and self.is_main:
            self.record({"step": self.position.step, "epoch": finished, **summary})
        self.save()
        if self.stop:
            self.interrupt()

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
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
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

    def log_step(self, micro: list[dict[str, float]], pairs: int, seconds: float) -> None:
        s, step = self.settings, self.position.step
        values = {k: sum(m[k] for m in micro) / len(micro) for k in micro[0]}
        row = {"step": step, "epoch": self.position.epoch, "lr": self.optimizer.param_groups[0]["lr"],
               "pairs_per_s": pairs / max(seconds, 1e-9), **values}
        self.progress.step(row, s.total_steps)
        if self.is_main and (step % s.log_every == 0 or step == s.total_steps or step == 1):
            self.record(row)

    def record(self, row: dict[str, Any]) -> None:
        """The one place metrics rows are written: metrics.jsonl, and the --report-to trackers."""
        append_jsonl(self.run_dir / METRICS_JSONL, row)
        if self.trackers:
            self.trackers.log(row)


class NonFinite(Exception):
    pass


def base_logit_scale(model: nn.Module) -> torch.Tensor:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)  # DistributedDataParallel
    return inner.logit_scale
