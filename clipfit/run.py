"""The refine recipe: data → model → methods → loop → outputs.

Everything method-specific happens inside the methods; everything about the loop inside
clipfit.train. This module wires them together: set up, model, methods, loop settings, trainer,
measure, finish. The run folder and run.json are clipfit.rundir's, the data clipfit.data.training's,
the validation yardsticks clipfit.eval.split's, the feature cache clipfit.cache's.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from clipfit import models
from clipfit.best import TrainingEvaluations
from clipfit.cache import FeatureCache, cache_key, resolve_cache_dir, start_identity, starting_model_identity
from clipfit.config import RefineConfig
from clipfit.data.training import RunData, load_data, make_dataset, same_data
from clipfit.distributed import Distributed, local_device, start_distributed
from clipfit.errors import UsageError
from clipfit.eval.encode import Encoder, encoder_for
from clipfit.eval.retrieval import encode_pairs_all_captions
from clipfit.eval.split import class_facts, eval_key, eval_pairs, evaluate_classes, evaluate_split, split_classes
from clipfit.eval.suite import Suite, deltas, evaluate_suite, gate, load_suite, set_names
from clipfit.frozen.prepare import FrozenInputs, FrozenPlan, prepare_frozen
from clipfit.frozen.measure import FrozenRows
from clipfit.frozen.rows import RowStore
from clipfit.methods import Composite, build_methods, parse_weights
from clipfit.methods.base import MethodContext, RunContext
from clipfit.parallel import build_encoder, unused_parameters
from clipfit.progress import Progress, activate
from clipfit.report import write_report
from clipfit.report_gallery import ranking_facts, sample_indices
from clipfit.rundir import (LAST_MODEL, RunFolder, check_free_space, check_resumable, check_schedule, claim_run_dir,
                            compare_with_saved, default_run_dir, environment, pairs_on_disk, recorded_pairs,
                            resume_command, write_run_json, write_skipped)
from clipfit.selection import Rule, check_metric, metric_value, record, selectable_metrics
from clipfit.trackers import Trackers, parse_report_to
from clipfit.train import LoopSettings, Trainer, build_optimizer, lr_factor, steps_per_epoch


def peak_memory(device: torch.device) -> dict[str, float]:
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20}
    if device.type == "cuda":
        peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def prepare_model(loaded: models.LoadedModel, config: RefineConfig, device: torch.device) -> nn.Module:
    """Move to device, lock towers or add LoRA adapters, as the flags say."""
    model = loaded.model.to(device)
    if config.lock_image:
        # freeze_bn_stats would swap timm's BatchNormAct2d for a FrozenBatchNorm2d without its
        # activation, which silently breaks EfficientNet-style towers; the loop keeps every
        # BatchNorm in eval mode instead (clipfit.train.freeze_batchnorm).
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if config.lock_text:
        model.lock_text_tower(unlocked_layers=0)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    models.use_channels_last(model, device)
    if config.lora:
        targets = models.resolve_lora_targets(model, config.lora_targets)
        model = models.apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, targets)
    return model


@dataclass
class Setup:
    """A run once its folder, data, model and methods are ready (see `set_up`)."""

    config: RefineConfig
    progress: Progress
    dist: Distributed
    device: torch.device
    run_dir: Path
    saved: dict | None  # run.json of the run being resumed
    data: RunData
    loaded: models.LoadedModel
    model: nn.Module  # on the device, with its towers locked or LoRA adapters added
    composite: Composite
    dataset: Dataset  # clipfit.data.dataset.PairDataset, or a ShardStream for --layout webdataset
    settings: LoopSettings
    info: dict  # run.json as it grows
    folder: RunFolder | None = None  # the locked run folder (rank 0 only)
    trackers: Trackers | None = None  # --report-to, rank 0 only
    frozen_rows: FrozenRows | None = None  # the frozen parts' outputs every measurement of the run shares


def refine(pairs_path: str, config: RefineConfig, argv: list[str], progress: Progress) -> dict[str, Any]:
    started = time.time()
    check_selection(config, labelled=config.layout in ("auto", "classes"))  # a folder of classes, perhaps
    setup = set_up(pairs_path, config, argv, progress)
    try:
        train_and_finish(setup, argv, started)
    finally:
        if setup.folder is not None:
            setup.folder.release()
    return setup.info


def train_and_finish(setup: Setup, argv: list[str], started: float) -> None:
    config = setup.config
    suite = load_suite(config.eval_zeroshot, config.eval_retrieval, setup.data.val, config.workers,
                       setup.progress.warn)
    frozen = precompute_frozen(setup)
    prepare_methods(setup)
    trainer = make_trainer(setup, argv, frozen, suite)
    measure_before(setup, suite)
    if trainer.evaluator is not None and setup.dist.is_main:
        trainer.evaluator.begin(setup.info["before"])
        trainer.stopped_early = trainer.evaluator.should_stop()
    train_started = time.time()
    with setup.progress:
        trainer.run()
    train_seconds = time.time() - train_started
    if setup.dist.is_main:
        finish(setup, trainer, suite, {
            "wall_seconds": time.time() - started, "train_seconds": train_seconds, **frozen.facts()})
    setup.dist.stop()


def claim_folder(config: RefineConfig, pairs_path: str, warn) -> RunFolder:
    """The run folder, checked and locked (see clipfit.rundir for what is refused and why)."""
    out = Path(config.out) if config.out else default_run_dir(config.method)
    return claim_run_dir(out, config.resume, config.overwrite, protected_paths(config, pairs_path), warn)


def protected_paths(config: RefineConfig, pairs_path: str) -> dict[str, Path]:
    """What --out may not be, contain or lie inside: PAIRS, the cache folder, a --model folder."""
    protected = {"the cache folder": resolve_cache_dir(config.cache_dir)}
    if Path(config.model).is_dir():  # a run folder to start from: replacing it would delete the start
        protected["the --model folder"] = Path(config.model)
    pairs = pairs_on_disk(pairs_path)
    if pairs is not None:
        protected["PAIRS"] = pairs
    return protected


def set_up(pairs_path: str, config: RefineConfig, argv: list[str], progress) -> Setup:
    """Methods, device, process group, run folder, data, model and dataset; run.json written.
    Until then a failure puts back the run that --overwrite was replacing."""
    composite = build_methods(config.method, config.method_options(), method_run(config),
                              parse_weights(config.weight))
    device = models.resolve_device(config.device)
    dist = start_distributed(device)  # under torchrun: rank 0 prepares the folder and the data, and writes
    progress = activate(progress if dist.is_main else Progress(silent=True))
    folder = claim_folder(config, pairs_path, progress.warn) if dist.is_main else None
    try:
        return set_up_in(folder, pairs_path, config, argv, progress, composite, device, dist)
    except BaseException:
        if folder is not None:
            folder.abandon()
        raise


def set_up_in(folder: RunFolder | None, pairs_path: str, config: RefineConfig, argv: list[str], progress: Progress,
              composite: Composite, device: torch.device, dist: Distributed) -> Setup:
    run_dir = dist.from_main(lambda: folder.path)
    saved = compare_with_saved(run_dir, config, pairs_path) if config.resume else None
    data = dist.from_main(lambda: load_data(pairs_path, config, run_dir, progress))
    check_selection(config, data.classes is not None, len(data.classes.names) if data.classes else None)
    check_resumable(saved, saved is None or same_data(saved.get("data_hash"), data), dist.world_size, pairs_path)
    device = local_device(device, dist)
    seed_everything(config.seed)  # random weights (--pretrained none) are drawn from the seed
    loaded = models.load_model(config.model, config.pretrained)
    seed_everything(config.seed)  # LoRA's adapters and the run's draws: from the seed, whatever building drew
    model = prepare_model(loaded, config, device)
    composite.restrict(model, progress.info)
    counts = models.count_parameters(model)
    if counts["trainable"] == 0:
        raise UsageError("nothing to train: every parameter is frozen (check --lock-image/--lock-text)")
    check_free_space(run_dir, counts["total"] * 4, counts["trainable"] * 4, config.keep_checkpoints)
    dataset = make_dataset(data, config, loaded, dist.rank, dist.world_size)
    settings = loop_settings(config, len(dataset), dist)
    check_schedule(saved, config, settings.total_steps)
    info = {
        "clipfit": "run", "run_dir": str(run_dir), "pairs": recorded_pairs(pairs_path), "config": config.to_dict(),
        "resolved": {"lr": config.resolved_lr(), "device": str(device), "total_steps": settings.total_steps,
                     "world_size": dist.world_size,
                     "train_pairs": len(dataset), "val_pairs": len(data.val), "layout": data.check.layout,
                     "classes": data.classes.to_json() if data.classes else None,
                     "weights": composite.weights, "parameters": counts},
        "model": models.describe(loaded), "start": start_identity(config.model, config.pretrained, config.seed),
        "data_hash": data.data_hash, "skipped": len(data.check.skipped),
        "environment": environment(), "argv": argv,
    }
    trackers = start_trackers(config, run_dir) if dist.is_main else None  # a failed login: nothing written yet
    if dist.is_main:
        write_skipped(run_dir, data.check)
    if not config.resume and dist.is_main:
        write_run_json(run_dir, info)
        folder.commit()  # the new run is in place: the one it replaces goes
    return Setup(config, progress, dist, device, run_dir, saved, data, loaded, model, composite, dataset, settings,
                 info, folder, trackers, measurement_rows(model, loaded, config, device, progress))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def start_trackers(config: RefineConfig, run_dir: Path) -> Trackers | None:
    names = parse_report_to(config.report_to)
    return Trackers.start(names, run_dir, config.to_dict()) if names else None


def loop_settings(config: RefineConfig, n_items: int, dist: Distributed) -> LoopSettings:
    settings = LoopSettings(
        epochs=config.epochs, total_steps=0, grad_accum=config.grad_accum, batch_size=config.batch_size,
        seed=config.seed, precision=config.precision, grad_clip=config.grad_clip, nan_policy=config.nan_policy,
        nan_limit=config.nan_limit, save_every=config.save_every, keep_checkpoints=config.keep_checkpoints,
        log_every=config.log_every, workers=config.workers, rank=dist.rank, world_size=dist.world_size,
        eval_every=config.eval_every, multi_positive=config.multi_positive,
    )
    total = config.epochs * steps_per_epoch(n_items, settings)
    settings.total_steps = min(total, config.max_steps) if config.max_steps else total
    return settings


def precompute_frozen(setup: Setup) -> FrozenInputs:
    """The run's frozen work (clipfit.frozen.prepare): locked towers' and the teacher's outputs once
    per training item, wherever the input is the same every epoch (never for a stream: it has no
    stable per-pair index to key rows by), and the pixels the loop reads."""
    c, stream = setup.config, setup.data.stream is not None
    plan = FrozenPlan(teacher_towers=setup.composite.teacher_towers,
                      cacheable=frozenset() if c.no_precompute or stream else cacheable_towers(c),
                      preload_images=c.cache_images and not stream, batch_size=c.batch_size, workers=c.workers,
                      device=setup.device, precision=c.precision)
    store = row_store(setup.config, setup.device, setup.loaded, setup.progress)
    return prepare_frozen(setup.model, setup.dataset, plan, store, setup.dist, setup.progress.info)


def row_store(c: RefineConfig, device: torch.device, loaded: models.LoadedModel, progress: Progress) -> RowStore:
    """Precomputed rows live in the feature cache, keyed by the starting model and the settings
    that change their numbers, so they stay on disk and later runs on the same pairs reuse them."""
    return RowStore(FeatureCache(resolve_cache_dir(c.cache_dir), log=progress.info, warn=progress.warn),
                    starting_model_identity(c.model, c.pretrained, c.seed),
                    {"precision": c.precision, "device": device.type, "max_pixels": c.max_image_pixels,
                     "preprocess": loaded.preprocess_cfg, "context_length": loaded.context_length})


def measurement_rows(model: nn.Module, loaded: models.LoadedModel, c: RefineConfig, device: torch.device,
                     progress: Progress) -> FrozenRows | None:
    """What every measurement of `model` shares: its frozen parts' outputs per evaluation item,
    kept in the feature cache (clipfit.frozen.measure); None with --no-precompute (whole towers
    every time)."""
    return None if c.no_precompute else FrozenRows.of(model, row_store(c, device, loaded, progress))


def cacheable_towers(config: RefineConfig) -> frozenset[str]:
    """Towers whose input is the same every epoch: captions always, images unless augmented."""
    return frozenset({"text"} | (set() if config.augment else {"image"}))


def method_run(config: RefineConfig) -> RunContext:
    """What the methods are told about the run (their own settings are their options)."""
    return RunContext(seed=config.seed, batch_size=config.batch_size, grad_accum=config.grad_accum,
                      workers=config.workers, max_image_pixels=config.max_image_pixels, lora=config.lora,
                      resuming=config.resume, model=config.model, pretrained=config.pretrained,
                      multi_positive=config.multi_positive)


def prepare_methods(setup: Setup) -> None:
    ctx = MethodContext(model=setup.model, loaded=setup.loaded, pairs=setup.data.train,
                        device=setup.device, run_dir=setup.run_dir, cache_dir=resolve_cache_dir(setup.config.cache_dir),
                        log=setup.progress.info, dist=setup.dist, warn=setup.progress.warn)
    for method in setup.composite.methods:
        method.prepare(ctx)
    for param in setup.composite.parameters():
        param.data = param.data.to(setup.device)


def check_selection(config: RefineConfig, labelled: bool, classes: int | None = None) -> None:
    """--select-best names a metric this run will measure: checked before the run folder is made and,
    for the classifier's metrics of a folder of classes (`classes` of them), again once the data is read."""
    if config.select_best:
        has_validation = config.val_split > 0
        sets = set_names(config.eval_zeroshot, config.eval_retrieval, has_validation)
        check_metric(config.select_best, selectable_metrics(has_validation, *sets, labelled=labelled, classes=classes))


def make_evaluator(setup: Setup, suite: Suite | None) -> TrainingEvaluations | None:
    """Measurements during training, with the before/after code; none when there is nothing to measure."""
    c = setup.config
    if not (setup.data.val or suite):
        return None
    rule = Rule(c.select_best, c.max_zeroshot_drop) if c.select_best else None
    label = f"the model during training (run folder {setup.run_dir}, --eval-every)"
    return TrainingEvaluations(lambda: measure(setup, suite, label), setup.model, rule, c.patience, bool(setup.data.val))


def make_trainer(setup: Setup, argv: list[str], frozen: FrozenInputs, suite) -> Trainer:
    config, model = setup.config, setup.model
    named = list(model.named_parameters()) + [(f"method.{i}", p) for i, p in enumerate(setup.composite.parameters())]
    optimizer = build_optimizer(named, config.resolved_lr(), config.weight_decay, (config.adam_beta1, config.adam_beta2),
                                config.adam_eps, config.decay_all)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, setup.settings.total_steps, config.schedule))
    # after prepare_methods: a method's choices there (refine's --hycd-logits auto) decide what it reads
    unused = unused_parameters(model, setup.composite.outputs_read, config.grad_accum)
    trainer = Trainer(model=model, methods=setup.composite, dataset=frozen.dataset, settings=setup.settings,
                      device=setup.device, run_dir=setup.run_dir, optimizer=optimizer, scheduler=scheduler,
                      frozen=frozen, progress=setup.progress, resume_command=resume_command(argv),
                      evaluator=make_evaluator(setup, suite),
                      scaler=torch.amp.GradScaler("cuda") if config.precision == "fp16" else None,
                      encoder=build_encoder(model, config.compile, setup.dist, setup.device, frozen.rests, bool(unused)),
                      is_main=setup.dist.is_main, trackers=setup.trackers,
                      starting_model=cache_key(starting_model_identity(config.model, config.pretrained, config.seed)))
    setup.progress.plan(setup.settings.epochs, steps_per_epoch(len(frozen.dataset), setup.settings))
    if config.resume:
        trainer.restore()
    setup.progress.info(f"training {config.method} on {len(frozen.dataset)} pairs for {setup.settings.total_steps} "
                        f"steps" + (f" (resumed at step {trainer.position.step})" if config.resume else ""))
    return trainer


def measure(setup: Setup, suite: Suite | None, label: str, encoder: Encoder | None = None) -> dict[str, float]:
    return measure_model(setup.model, setup.loaded, setup.data, setup.config, setup.device, suite, label, encoder,
                         setup.frozen_rows)


def measure_model(model: nn.Module, loaded: models.LoadedModel, data: RunData, c: RefineConfig, device: torch.device,
                  suite: Suite | None, label: str, encoder: Encoder | None = None,
                  frozen: FrozenRows | None = None) -> dict[str, float]:
    """Yardsticks and suite through one encoder, so the validation pairs are encoded once: before,
    during (--eval-every) and after training, and for each `clipfit interpolate` α. `label` names
    the model measured in errors; `frozen` holds what every measurement of the model shares."""
    encoder = encoder or run_encoder(model, loaded, c, device, label, frozen=frozen)
    pairs, key = eval_pairs(data)[0], eval_key(data)
    results = evaluate_split(model, pairs, loaded, device, c.batch_size, c.max_image_pixels, encoder, key,
                             c.multi_positive)
    results.update(evaluate_classes(encoder, split_classes(data, c.max_image_pixels)))
    results.update(evaluate_suite(suite, encoder, c.max_image_pixels))
    return results


def run_encoder(model: nn.Module, loaded: models.LoadedModel, c: RefineConfig, device: torch.device, label: str,
                starting: bool = False, progress: Progress | None = None, frozen: FrozenRows | None = None) -> Encoder:
    """The `starting` model's zero-shot classifiers come from (and go to) the feature cache, keyed
    by the model it was loaded as; a trained model's are computed afresh."""
    cache = FeatureCache(resolve_cache_dir(c.cache_dir), log=progress.info, warn=progress.warn) if starting else None
    return encoder_for(loaded, model, device, c.batch_size, c.workers, c.precision, label=label,
                       identity=starting_model_identity(c.model, c.pretrained, c.seed) if starting else None,
                       feature_cache=cache, frozen=frozen)


def gallery_facts(setup: Setup, encoder: Encoder) -> dict:
    """The report gallery's retrieval facts, from the evaluation pairs' features in `encoder`
    (encoded once per Encoder, so after a measurement through it they cost nothing)."""
    pairs = eval_pairs(setup.data)[0]
    features = encode_pairs_all_captions(encoder, pairs, eval_key(setup.data), setup.config.max_image_pixels)
    return ranking_facts(features, sample_indices(len(pairs), setup.config.seed))


def classes_facts(setup: Setup, encoder: Encoder) -> dict | None:
    """A folder of classes: the report's confusion matrix and per-class top-1 (clipfit.eval.split.class_facts)."""
    return class_facts(encoder, split_classes(setup.data, setup.config.max_image_pixels))


def measure_before(setup: Setup, suite: Suite | None) -> None:
    """The starting model's numbers (kept from the first start when resuming)."""
    if not setup.dist.is_main:
        return
    saved = setup.saved
    if saved and saved.get("before"):
        before, gallery_before, classes_before = saved["before"], saved.get("gallery_before"), saved.get("classes_before")
    else:
        c = setup.config
        encoder = run_encoder(setup.model, setup.loaded, c, setup.device,
                              f"the starting model {c.model} ({c.pretrained}), measured before training",
                              starting=True, progress=setup.progress, frozen=setup.frozen_rows)
        before, gallery_before = measure(setup, suite, "", encoder), gallery_facts(setup, encoder)
        classes_before = classes_facts(setup, encoder)
    write_run_json(setup.run_dir, setup.info, before=before, gallery_before=gallery_before, classes_before=classes_before)


def finish(setup: Setup, trainer: Trainer, suite: Suite | None, timings: dict) -> None:
    """Measure after, save the model and the methods' artefacts, write the report, then run.json: a
    run killed before that is resumed, one whose run.json has its after numbers is whole (clipfit sweep
    skips it)."""
    info, config = setup.info, setup.config
    after = measure_last(setup, trainer, suite)
    if config.select_best:
        after = keep_best(setup, trainer.evaluator, trainer.stopped_early, after)
    # of the weights saved as model.safetensors; the split alone, a few seconds next to the suite
    encoder = run_encoder(setup.model, setup.loaded, config, setup.device, f"the trained model (run folder {setup.run_dir})",
                          frozen=setup.frozen_rows)
    gallery_after, classes_after = gallery_facts(setup, encoder), classes_facts(setup, encoder)
    info.update({"delta": deltas(info["before"], after), "gate": gate(config.fail_on_zeroshot_drop, info["before"], after)})
    models.save_model(setup.loaded, setup.model, setup.run_dir)
    for method in setup.composite.methods:
        method.save(setup.run_dir)
    info.update({
        "after": after, "gallery_after": gallery_after, "classes_after": classes_after,
        "eval_split": eval_pairs(setup.data)[1], **timings,
        "steps": trainer.position.step, "peak_memory": peak_memory(setup.device),
        "nan_skipped_steps": trainer.position.nan_skipped,
        "measurement_rows": setup.frozen_rows.facts() if setup.frozen_rows else None,
        "methods": {m.name: m.report() for m in setup.composite.methods},
    })
    write_report(setup.run_dir, info, eval_pairs(setup.data)[0], config.max_image_pixels)
    write_run_json(setup.run_dir, info)  # last: a run.json with `after` means the folder is complete
    if setup.trackers:  # a run that fails earlier leaves its trackers to their own exit hooks
        setup.trackers.finish(setup.run_dir, after)
        setup.trackers.close()


def measure_last(setup: Setup, trainer: Trainer, suite: Suite | None) -> dict[str, float]:
    """The last step's numbers: from the evaluations when they measured it, else measured now."""
    evaluations = trainer.evaluator
    if evaluations is None:
        return measure(setup, suite, f"the trained model (run folder {setup.run_dir}), measured after training")
    trainer.evaluate(trainer.position.epoch, broadcast=False)  # a no-op when this step was measured
    return evaluations.history[-1]["metrics"]


def keep_best(setup: Setup, evaluations: TrainingEvaluations, stopped_early: bool,
              last: dict[str, float]) -> dict[str, float]:
    """--select-best: the last weights go to last.safetensors and the chosen step's into the model,
    which finish() then saves as model.safetensors. Returns the chosen step's numbers."""
    c, info = setup.config, setup.info
    choice = evaluations.choice()
    models.save_state_dict(models.merged_copy(setup.model).state_dict(), setup.run_dir / LAST_MODEL,
                           {"format": "pt", "arch": setup.loaded.arch})
    chosen = evaluations.history[-1 if choice.index is None else choice.index]  # none eligible: the last stays
    if chosen is not evaluations.history[-1]:
        evaluations.load_best_into(setup.model)
    info["last"] = last
    info["selection"] = {
        **record(choice, evaluations.rule), "start_score": metric_value(info["before"], c.select_best),
        "patience": c.patience, "eval_every": c.eval_every, "chosen_step": chosen["step"],
        "last_step": evaluations.history[-1]["step"], "stopped_early": stopped_early,
        "steps": [h["step"] for h in evaluations.history],
    }
    setup.progress.info(f"--select-best {c.select_best}: kept {choice.reason(evaluations.rule)}")
    return chosen["metrics"]
