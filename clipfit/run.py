"""The refine recipe: data → model → methods → loop → outputs.

Everything method-specific happens inside the methods; everything about the loop inside
clipfit.train. This module wires them together and writes the run folder.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfit.config import RefineConfig
from clipfit.data.check import CheckReport, check_pairset
from clipfit.data.images import DEFAULT_MAX_PIXELS
from clipfit.data.layouts import Pair, load_pairs
from clipfit.errors import DataError, UsageError
from clipfit.io import write_json, write_text
from clipfit.progress import printable
from clipfit.rundir import (EVAL_SAMPLE, LAST_MODEL, RUN_JSON, SKIPPED_TXT, RunFolder, check_free_space,
                            check_resumable, check_schedule, claim_run_dir, compare_with_saved, default_run_dir,
                            pairs_on_disk, recorded_pairs, resume_command)


@dataclass
class RunData:
    train: list[Pair]
    val: list[Pair]
    check: CheckReport
    data_hash: str
    stream: Any = None  # clipfit.data.shards.ShardSet for --layout webdataset; train is then a sample


def data_hash(pairs: list[Pair]) -> str:
    """Identity of a pair list: keys, captions and image contents (clipfit.cache.content_digest,
    as the feature cache's keys), so --resume accepts a copied or touched folder and refuses
    changed images, whatever their modification times say."""
    from clipfit.cache import content_digest
    from clipfit.data.images import stored_in

    digest = hashlib.sha256()
    for pair in pairs:  # a table row's key names its row; its content is its table file's
        try:
            digest.update(json.dumps([pair.key, list(pair.captions), content_digest(stored_in(pair.image))]).encode())
        except OSError as e:
            raise DataError(f"{printable(pair.image)}: vanished or became unreadable after the run checked it "
                            f"({e.strerror or e})") from None
    return digest.hexdigest()[:16]


def split_val(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    if fraction <= 0:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(pairs) * fraction))
    if n_val >= len(pairs):
        raise UsageError(f"--val-split {fraction} leaves no training pairs out of {len(pairs)}")
    val_ids = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in val_ids], [p for i, p in enumerate(pairs) if i in val_ids]


def load_data(pairs_path: str, config: RefineConfig, run_dir: Path, progress) -> RunData:
    if config.layout == "webdataset":
        return load_stream(pairs_path, run_dir)
    pairset = load_pairs(pairs_path, config.layout, config.csv_img_key, config.csv_caption_key,
                         config.image_column, config.caption_column)
    check = check_pairset(pairset, max_pixels=config.max_image_pixels, find_duplicates=False,
                          workers=max(1, config.workers))
    for warning in check.warnings:
        progress.warn(f"{warning.path}: {warning.reason}")
    if check.skipped:
        first = check.skipped[0]
        if config.strict:
            raise DataError(f"{first.path}: {first.reason} ({len(check.skipped)} bad item(s); "
                            "`clipfit data check` lists them; drop --strict to skip them)")
        progress.warn(f"skipping {len(check.skipped)} bad item(s), listed in {run_dir / SKIPPED_TXT}")
    if not check.usable:
        raise DataError(f"{pairs_path}: no usable pairs ({len(check.skipped)} bad item(s), e.g. "
                        f"{check.skipped[0].path}: {check.skipped[0].reason})" if check.skipped else f"{pairs_path}: no usable pairs")
    train, val = split_val(check.usable, config.val_split, config.seed)
    return RunData(train, val, check, data_hash(check.usable))


def write_skipped(run_dir: Path, check: CheckReport) -> None:
    """Written with run.json, not earlier: a run that fails while setting up leaves no run.json,
    so the corrected command may reuse the folder without --overwrite."""
    if check.skipped:
        write_text(run_dir / SKIPPED_TXT, "".join(f"{printable(p.path)}\t{printable(p.reason)}\n" for p in check.skipped))


def load_stream(pairs_path: str, run_dir: Path) -> RunData:
    """Shards are streamed, never listed or checked up front; the first pairs are copied to
    eval-sample/ to measure the model on before and after training."""
    from clipfit.data.shards import extract_sample, find_shards

    shards = find_shards(pairs_path)
    sample = extract_sample(shards, run_dir / EVAL_SAMPLE, limit=256)
    check = CheckReport(root=str(shards.root), layout="webdataset", usable=sample)
    return RunData(sample, [], check, shards.identity, stream=shards)


def make_dataset(data: RunData, config: RefineConfig, loaded, rank: int = 0, world_size: int = 1):
    from clipfit.data.dataset import PairDataset
    from clipfit.data.shards import ShardStream

    transform = loaded.preprocess_train if config.augment else loaded.preprocess_val
    if data.stream is not None:
        return ShardStream(data.stream, transform, loaded.tokenizer, config.seed, config.batch_size,
                           config.max_image_pixels, rank, world_size)
    dataset = PairDataset(data.train, transform, loaded.tokenizer, config.seed, config.max_image_pixels)
    if config.length_buckets:
        dataset.measure_lengths()
    return dataset


def prepare_pixels(setup, locked) -> None:
    """What the loader decodes: no pixels when the locked image tower's outputs are precomputed
    (steps never look at them); with --cache-images, every image once, up front."""
    dataset, config = setup.dataset, setup.config
    dataset.with_images = locked is None or "image" not in locked.parts
    if config.cache_images and dataset.with_images:
        dataset.preload(threads=max(1, config.workers))
        setup.progress.info(f"cached {len(dataset)} images in memory ({dataset.pixels.nbytes / 2**20:.0f} MiB)")


def environment() -> dict[str, Any]:
    from clipfit import installed_version

    versions = {package: installed_version(package)
                for package in ("clipfit", "torch", "torchvision", "open_clip_torch", "peft", "faiss-cpu", "safetensors")}
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def peak_memory(device) -> dict[str, float]:
    import resource

    import torch

    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20}
    if device.type == "cuda":
        peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def prepare_model(loaded, config: RefineConfig, device):
    """Move to device, lock towers or add LoRA adapters, as the flags say."""
    from clipfit import models

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
    if config.lora:
        targets = models.resolve_lora_targets(model, config.lora_targets)
        model = models.apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, targets)
    return model


VALIDATION_KEY = "retrieval:validation"  # the suite's name for the validation split: encoded once for both


def evaluate_split(model, pairs: list[Pair], loaded, device, batch_size: int,
                   max_pixels: int = DEFAULT_MAX_PIXELS, encoder=None, key: str = VALIDATION_KEY) -> dict[str, float]:
    """Validation yardsticks every method is judged by: CLIP loss, R@1 both ways, modality gap,
    on each image with its first caption. `key` names the pairs in `encoder`'s cache."""
    import torch

    from clipfit.eval.encode import encoder_for
    from clipfit.eval.metrics import modality_gap, paired_retrieval
    from clipfit.eval.retrieval import encode_pairs_all_captions, first_captions
    from clipfit.losses import clip_loss
    from clipfit.train import base_logit_scale

    encoder = encoder or encoder_for(loaded, model, device, batch_size, 0, "fp32")
    features = encode_pairs_all_captions(encoder, pairs, key, max_pixels)
    image, text = features.image, first_captions(features)
    retrieval = paired_retrieval(image, text, ks=(1,))
    with torch.no_grad():
        loss = clip_loss(image, text, base_logit_scale(model).exp().float().cpu()).item()
    return {"clip_loss": loss, "image_to_text_R@1": retrieval["image_to_text_R@1"],
            "text_to_image_R@1": retrieval["text_to_image_R@1"], "modality_gap": modality_gap(image, text)}


@dataclass
class Setup:
    """A run once its folder, data, model and methods are ready (see `set_up`)."""

    config: RefineConfig
    progress: Any
    dist: Any  # clipfit.parallel.Distributed
    device: Any
    run_dir: Path
    saved: dict | None  # run.json of the run being resumed
    data: RunData
    loaded: Any  # clipfit.models.LoadedModel
    model: Any
    composite: Any  # clipfit.methods.Composite
    dataset: Any
    settings: Any  # clipfit.train.LoopSettings
    info: dict  # run.json as it grows
    folder: RunFolder | None = None  # the locked run folder (rank 0 only)
    trackers: Any = None  # clipfit.trackers.Trackers (--report-to), rank 0 only


def refine(pairs_path: str, config: RefineConfig, argv: list[str], progress) -> dict[str, Any]:
    started = time.time()
    check_selection(config)
    setup = set_up(pairs_path, config, argv, progress)
    try:
        train_and_finish(setup, argv, started)
    finally:
        if setup.folder is not None:
            setup.folder.release()
    return setup.info


def train_and_finish(setup: Setup, argv: list[str], started: float) -> None:
    from clipfit.eval.suite import load_suite

    config = setup.config
    suite = load_suite(config.eval_zeroshot, config.eval_retrieval, setup.data.val, config.workers,
                       setup.progress.warn)
    teacher, locked = precompute_frozen(setup)
    prepare_methods(setup)
    trainer = make_trainer(setup, argv, teacher, locked, suite)
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
            "wall_seconds": time.time() - started, "train_seconds": train_seconds,
            "teacher_forward_passes": teacher.forward_passes if teacher else 0,
            "locked_towers": locked.facts if locked else None})
    setup.dist.stop()


def claim_folder(config: RefineConfig, pairs_path: str, warn) -> RunFolder:
    """The run folder, checked and locked (see clipfit.rundir for what is refused and why)."""
    out = Path(config.out) if config.out else default_run_dir(config.method)
    protected = {"the cache folder": cache_dir(config)}
    if Path(config.model).is_dir():  # a run folder to start from: replacing it would delete the start
        protected["the --model folder"] = Path(config.model)
    pairs = pairs_on_disk(pairs_path)
    if pairs is not None:
        protected["PAIRS"] = pairs
    return claim_run_dir(out, config.resume, config.overwrite, protected, warn)


def set_up(pairs_path: str, config: RefineConfig, argv: list[str], progress) -> Setup:
    """Methods, device, process group, run folder, data, model and dataset; run.json written.
    Until then a failure puts back the run that --overwrite was replacing."""
    from clipfit import models
    from clipfit.methods import build_methods, parse_weights
    from clipfit.parallel import start_distributed
    from clipfit.progress import Progress, activate

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


def set_up_in(folder: RunFolder | None, pairs_path: str, config: RefineConfig, argv: list[str], progress,
              composite, device, dist) -> Setup:
    import torch

    from clipfit import models
    from clipfit.parallel import local_device

    run_dir = dist.from_main(lambda: folder.path)
    saved = compare_with_saved(run_dir, config, pairs_path) if config.resume else None
    data = dist.from_main(lambda: load_data(pairs_path, config, run_dir, progress))
    check_resumable(saved, saved is None or same_data(saved.get("data_hash"), data), dist.world_size, pairs_path)
    device = local_device(device, dist)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    loaded = models.load_model(config.model, config.pretrained)
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
                     "weights": composite.weights, "parameters": counts},
        "model": models.describe(loaded), "data_hash": data.data_hash, "skipped": len(data.check.skipped),
        "environment": environment(), "argv": argv,
    }
    trackers = start_trackers(config, run_dir) if dist.is_main else None  # a failed login: nothing written yet
    if dist.is_main:
        write_skipped(run_dir, data.check)
    if not config.resume and dist.is_main:
        write_json(run_dir / RUN_JSON, info)
        folder.commit()  # the new run is in place: the one it replaces goes
    return Setup(config, progress, dist, device, run_dir, saved, data, loaded, model, composite, dataset, settings,
                 info, folder, trackers)


def start_trackers(config: RefineConfig, run_dir: Path):
    from clipfit.trackers import Trackers, parse_report_to

    names = parse_report_to(config.report_to)
    return Trackers.start(names, run_dir, config.to_dict()) if names else None


def stat_data_hash(pairs: list[Pair]) -> str:
    """clipfit 0.1.0's data_hash (keys, captions, image sizes and modification times), so a run it
    started can still be resumed."""
    digest = hashlib.sha256()
    for pair in pairs:
        stat = pair.image.stat()
        digest.update(json.dumps([pair.key, list(pair.captions), stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()[:16]


def same_data(saved_hash: str | None, data: RunData) -> bool:
    if saved_hash == data.data_hash:
        return True
    return data.stream is None and saved_hash == stat_data_hash(data.check.usable)


def loop_settings(config: RefineConfig, n_items: int, dist):
    from clipfit.train import LoopSettings, steps_per_epoch

    settings = LoopSettings(
        epochs=config.epochs, total_steps=0, grad_accum=config.grad_accum, batch_size=config.batch_size,
        seed=config.seed, precision=config.precision, grad_clip=config.grad_clip, nan_policy=config.nan_policy,
        nan_limit=config.nan_limit, save_every=config.save_every, keep_checkpoints=config.keep_checkpoints,
        log_every=config.log_every, workers=config.workers, rank=dist.rank, world_size=dist.world_size,
        eval_every=config.eval_every,
    )
    total = config.epochs * steps_per_epoch(n_items, settings)
    settings.total_steps = min(total, config.max_steps) if config.max_steps else total
    return settings


def precompute_frozen(setup: Setup):
    """The frozen teacher's outputs and the locked towers' outputs, once per training item,
    wherever the input is the same every epoch (no augmentation for images; never for streams)."""
    from clipfit.teacher import FrozenTeacher
    from clipfit.towers import precompute_locked
    from clipfit.train import Trainer

    config, progress = setup.config, setup.progress
    autocast = Trainer.autocast_for(setup.device, config.precision)
    teacher = FrozenTeacher(setup.model, setup.device, autocast) if setup.composite.needs_teacher else None
    if setup.data.stream is not None:  # a stream has no stable per-pair index to key rows by
        return teacher, None
    if config.no_precompute:
        prepare_pixels(setup, None)
        return teacher, None
    store = row_store(setup)
    locked = precompute_locked(setup.model, setup.dataset, cacheable_towers(config), config.batch_size,
                               config.workers, setup.device, autocast, setup.dist, store)
    if locked is not None:
        progress.info(f"locked {' and '.join(locked.parts)} tower: frozen outputs of every training item ready "
                      f"({locked.seconds:.1f} s, {locked.facts['mib']:.1f} MiB)")
    prepare_pixels(setup, locked)  # before the teacher, which reads --cache-images' pixels
    if teacher is not None and not config.augment:
        progress.info("encoding the training pairs once with the frozen teacher")
        teacher.precompute(setup.dataset, config.batch_size, config.workers, locked, setup.dist, store)
    return teacher, locked


def row_store(setup: Setup):
    """Precomputed rows live in the feature cache, keyed by the starting model and the settings
    that change their numbers, so they stay on disk and later runs on the same pairs reuse them."""
    from clipfit.cache import FeatureCache, starting_model_identity
    from clipfit.precompute import RowStore

    c = setup.config
    return RowStore(FeatureCache(cache_dir(c), log=setup.progress.info, warn=setup.progress.warn),
                    starting_model_identity(c.model, c.pretrained, c.seed),
                    {"precision": c.precision, "device": setup.device.type, "max_pixels": c.max_image_pixels,
                     "preprocess": setup.loaded.preprocess_cfg, "context_length": setup.loaded.context_length})


def cacheable_towers(config: RefineConfig) -> set[str]:
    """Towers whose input is the same every epoch: captions always, images unless augmented."""
    return {"text"} | (set() if config.augment else {"image"})


def method_run(config: RefineConfig):
    """What the methods are told about the run (their own settings are their options)."""
    from clipfit.methods.base import RunContext

    return RunContext(seed=config.seed, batch_size=config.batch_size, grad_accum=config.grad_accum,
                      workers=config.workers, max_image_pixels=config.max_image_pixels, lora=config.lora,
                      resuming=config.resume, model=config.model, pretrained=config.pretrained)


def prepare_methods(setup: Setup) -> None:
    from clipfit.methods.base import MethodContext

    ctx = MethodContext(model=setup.model, loaded=setup.loaded, pairs=setup.data.train,
                        device=setup.device, run_dir=setup.run_dir, cache_dir=cache_dir(setup.config),
                        log=setup.progress.info, dist=setup.dist, warn=setup.progress.warn)
    for method in setup.composite.methods:
        method.prepare(ctx)
    for param in setup.composite.parameters():
        param.data = param.data.to(setup.device)


def check_selection(config: RefineConfig) -> None:
    """--select-best names a metric this run will measure: checked before the run folder is made."""
    from clipfit.eval.suite import set_names
    from clipfit.selection import check_metric, selectable_metrics

    if config.select_best:
        has_validation = config.val_split > 0
        sets = set_names(config.eval_zeroshot, config.eval_retrieval, has_validation)
        check_metric(config.select_best, selectable_metrics(has_validation, *sets))


def make_evaluator(setup: Setup, suite):
    """Measurements during training, with the before/after code; none when there is nothing to measure."""
    from clipfit.best import TrainingEvaluations
    from clipfit.selection import Rule

    c = setup.config
    if not (setup.data.val or suite):
        return None
    rule = Rule(c.select_best, c.max_zeroshot_drop) if c.select_best else None
    label = f"the model during training (run folder {setup.run_dir}, --eval-every)"
    return TrainingEvaluations(lambda: measure(setup, suite, label), setup.model, rule, c.patience, bool(setup.data.val))


def make_trainer(setup: Setup, argv: list[str], teacher, locked, suite):
    import torch

    from clipfit.parallel import build_encoder
    from clipfit.towers import frozen_parts
    from clipfit.train import Trainer, build_optimizer, lr_factor, steps_per_epoch

    config, model = setup.config, setup.model
    named = list(model.named_parameters()) + [(f"method.{i}", p) for i, p in enumerate(setup.composite.parameters())]
    optimizer = build_optimizer(named, config.resolved_lr(), config.weight_decay, (config.adam_beta1, config.adam_beta2),
                                config.adam_eps, config.decay_all)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, setup.settings.total_steps, config.schedule))

    rests = {tower: part.rest for tower, part in locked.parts.items()} if locked else {}
    trainer = Trainer(model=model, methods=setup.composite, dataset=setup.dataset, settings=setup.settings,
                      device=setup.device, run_dir=setup.run_dir, optimizer=optimizer, scheduler=scheduler,
                      teacher=teacher, progress=setup.progress, resume_command=resume_command(argv),
                      evaluator=make_evaluator(setup, suite),
                      scaler=torch.amp.GradScaler("cuda") if config.precision == "fp16" else None,
                      encoder=build_encoder(model, config.compile, setup.dist, setup.device, rests),
                      is_main=setup.dist.is_main, locked=locked, trackers=setup.trackers,
                      frozen_modules=[m for part in frozen_parts(model).values() for m in part.modules])
    setup.progress.plan(setup.settings.epochs, steps_per_epoch(len(setup.dataset), setup.settings))
    if config.resume:
        trainer.restore()
    setup.progress.info(f"training {config.method} on {len(setup.dataset)} pairs for {setup.settings.total_steps} "
                        f"steps" + (f" (resumed at step {trainer.position.step})" if config.resume else ""))
    return trainer


def eval_pairs(data: RunData) -> tuple[list[Pair], str]:
    return (data.val, "validation") if data.val else (data.train[:256], "training subset")


def measure(setup: Setup, suite, label: str, encoder=None) -> dict[str, float]:
    return measure_model(setup.model, setup.loaded, setup.data, setup.config, setup.device, suite, label, encoder)


def measure_model(model, loaded, data: RunData, c: RefineConfig, device, suite, label: str,
                  encoder=None) -> dict[str, float]:
    """Yardsticks and suite through one encoder, so the validation pairs are encoded once: before,
    during (--eval-every) and after training, and for each `clipfit interpolate` α. `label` names
    the model measured in errors."""
    from clipfit.eval.suite import evaluate_suite

    encoder = encoder or run_encoder(model, loaded, c, device, label)
    pairs, key = eval_pairs(data)[0], eval_key(data)
    results = evaluate_split(model, pairs, loaded, device, c.batch_size, c.max_image_pixels, encoder, key)
    results.update(evaluate_suite(suite, encoder, c.max_image_pixels))
    return results


def run_encoder(model, loaded, c: RefineConfig, device, label: str, starting: bool = False, progress=None):
    """The `starting` model's zero-shot classifiers come from (and go to) the feature cache, keyed
    by the model it was loaded as; a trained model's are computed afresh."""
    from clipfit.cache import FeatureCache, starting_model_identity
    from clipfit.eval.encode import encoder_for

    cache = FeatureCache(cache_dir(c), log=progress.info, warn=progress.warn) if starting else None
    return encoder_for(loaded, model, device, c.batch_size, c.workers, c.precision, label=label,
                       identity=starting_model_identity(c.model, c.pretrained, c.seed) if starting else None,
                       feature_cache=cache)


def eval_key(data: RunData) -> str:
    """The evaluation pairs' name in an Encoder's cache."""
    return VALIDATION_KEY if data.val else eval_pairs(data)[1]


def gallery_facts(setup: Setup, encoder) -> dict:
    """The report gallery's retrieval facts, from the evaluation pairs' features in `encoder`
    (encoded once per Encoder, so after a measurement through it they cost nothing)."""
    from clipfit.eval.retrieval import encode_pairs_all_captions
    from clipfit.report_gallery import ranking_facts, sample_indices

    pairs = eval_pairs(setup.data)[0]
    features = encode_pairs_all_captions(encoder, pairs, eval_key(setup.data), setup.config.max_image_pixels)
    return ranking_facts(features, sample_indices(len(pairs), setup.config.seed))


def measure_before(setup: Setup, suite) -> None:
    """The starting model's numbers (kept from the first start when resuming)."""
    if not setup.dist.is_main:
        return
    saved = setup.saved
    if saved and saved.get("before"):
        setup.info["before"], setup.info["gallery_before"] = saved["before"], saved.get("gallery_before")
    else:
        c = setup.config
        encoder = run_encoder(setup.model, setup.loaded, c, setup.device,
                              f"the starting model {c.model} ({c.pretrained}), measured before training",
                              starting=True, progress=setup.progress)
        setup.info["before"] = measure(setup, suite, "", encoder)
        setup.info["gallery_before"] = gallery_facts(setup, encoder)
    write_json(setup.run_dir / RUN_JSON, setup.info)


def finish(setup: Setup, trainer, suite, timings: dict) -> None:
    """Measure after, save the model and the methods' artefacts, write run.json and the report."""
    from clipfit import models
    from clipfit.eval.suite import deltas, gate
    from clipfit.report import write_report

    info, config = setup.info, setup.config
    after = measure_last(setup, trainer, suite)
    if config.select_best:
        after = keep_best(setup, trainer.evaluator, trainer.stopped_early, after)
    # of the weights saved as model.safetensors; the split alone, a few seconds next to the suite
    gallery_after = gallery_facts(setup, run_encoder(setup.model, setup.loaded, config, setup.device,
                                                     f"the trained model (run folder {setup.run_dir})"))
    info.update({"delta": deltas(info["before"], after), "gate": gate(config.fail_on_zeroshot_drop, info["before"], after)})
    models.save_model(setup.loaded, setup.model, setup.run_dir)
    for method in setup.composite.methods:
        method.save(setup.run_dir)
    info.update({
        "after": after, "gallery_after": gallery_after, "eval_split": eval_pairs(setup.data)[1], **timings,
        "steps": trainer.position.step, "peak_memory": peak_memory(setup.device),
        "nan_skipped_steps": trainer.position.nan_skipped,
        "methods": {m.name: m.report() for m in setup.composite.methods},
    })
    write_json(setup.run_dir / RUN_JSON, info)
    write_report(setup.run_dir, info, eval_pairs(setup.data)[0], config.max_image_pixels)
    if setup.trackers:  # a run that fails earlier leaves its trackers to their own exit hooks
        setup.trackers.finish(setup.run_dir, after)
        setup.trackers.close()


def measure_last(setup: Setup, trainer, suite) -> dict[str, float]:
    """The last step's numbers: from the evaluations when they measured it, else measured now."""
    evaluations = trainer.evaluator
    if evaluations is None:
        return measure(setup, suite, f"the trained model (run folder {setup.run_dir}), measured after training")
    trainer.evaluate(trainer.position.epoch, broadcast=False)  # a no-op when this step was measured
    return evaluations.history[-1]["metrics"]


LAST_FILE = LAST_MODEL


def keep_best(setup: Setup, evaluations, stopped_early: bool, last: dict[str, float]) -> dict[str, float]:
    """--select-best: the last weights go to last.safetensors and the chosen step's into the model,
    which finish() then saves as model.safetensors. Returns the chosen step's numbers."""
    from clipfit import models
    from clipfit.selection import metric_value, record

    c, info = setup.config, setup.info
    choice = evaluations.choice()
    models.save_state_dict(models.merged_copy(setup.model).state_dict(), setup.run_dir / LAST_FILE,
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


def cache_dir(config: RefineConfig) -> Path:
    from clipfit.cache import default_cache_dir

    return Path(config.cache_dir) if config.cache_dir else default_cache_dir()
