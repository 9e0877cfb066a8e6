"""A run's training data: the pairs loaded and checked, the validation split, their identity
(what --resume compares) and the dataset the loop reads."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from clipfit.cache import content_digest
from clipfit.config import RefineConfig
from clipfit.data.check import CheckReport, check_pairset
from clipfit.data.classes import stratified_split
from clipfit.data.dataset import PairDataset
from clipfit.data.images import stored_in
from clipfit.data.pairs import ClassSet, Pair
from clipfit.data.layouts import load_pairs
from clipfit.data.shards import ShardSet, ShardStream, extract_sample, find_shards
from clipfit.errors import DataError, UsageError
from clipfit.progress import Progress, printable
from clipfit.rundir import EVAL_SAMPLE, SKIPPED_TXT

if TYPE_CHECKING:  # the data room does not depend on the model room at run time
    from clipfit.models import LoadedModel

STREAM_SAMPLE = 256  # pairs of a stream copied to eval-sample/ for the before/after measurements


@dataclass
class RunData:
    train: list[Pair]
    val: list[Pair]
    check: CheckReport
    data_hash: str
    stream: ShardSet | None = None  # --layout webdataset; train is then a sample

    @property
    def classes(self) -> ClassSet | None:
        """A labelled folder's classes (--layout classes), which each pair's `label` indexes."""
        return self.check.classes


def data_hash(pairs: list[Pair]) -> str:
    """Identity of a pair list: keys, captions and image contents (clipfit.cache.content_digest,
    as the feature cache's keys), so --resume accepts a copied or touched folder and refuses
    changed images, whatever their modification times say."""
    digest = hashlib.sha256()
    for pair in pairs:  # a table row's key names its row; its content is its table file's
        try:
            digest.update(json.dumps([pair.key, list(pair.captions), content_digest(stored_in(pair.image))]).encode())
        except OSError as e:
            raise DataError(f"{printable(pair.image)}: vanished or became unreadable after the run checked it "
                            f"({e.strerror or e})") from None
    return digest.hexdigest()[:16]


def stat_data_hash(pairs: list[Pair]) -> str:
    """clipfit 0.1.0's data_hash (keys, captions, image sizes and modification times), so a run it
    started can still be resumed."""
    digest = hashlib.sha256()
    for pair in pairs:
        stat = pair.image.stat()
        digest.update(json.dumps([pair.key, list(pair.captions), stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()[:16]


def same_data(saved_hash: str | None, data: RunData) -> bool:
    """Whether `data` is the data of the run that recorded `saved_hash` (either hash's version)."""
    if saved_hash == data.data_hash:
        return True
    return data.stream is None and saved_hash == stat_data_hash(data.check.usable)


def split_val(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(training, validation) pairs; a labelled folder's split is stratified: about `fraction` of
    every class with two or more images is held out (clipfit.data.classes.stratified_split)."""
    if fraction <= 0:
        return pairs, []
    if pairs[0].label is not None:
        kept, held = stratified_split([pair.label for pair in pairs], fraction, seed)
        return [pairs[i] for i in kept], [pairs[i] for i in held]
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(pairs) * fraction))
    if n_val >= len(pairs):
        raise UsageError(f"--val-split {fraction} leaves no training pairs out of {len(pairs)}")
    val_ids = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in val_ids], [p for i, p in enumerate(pairs) if i in val_ids]


def load_data(pairs_path: str, config: RefineConfig, run_dir: Path, progress: Progress) -> RunData:
    """PAIRS loaded and checked (bad items skipped, or refused with --strict) and split."""
    if config.layout == "webdataset":
        return load_stream(pairs_path, run_dir)
    pairset = load_pairs(pairs_path, config.layout, config.csv_img_key, config.csv_caption_key,
                         config.image_column, config.caption_column, config.classnames, config.templates)
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


def load_stream(pairs_path: str, run_dir: Path) -> RunData:
    """Shards are streamed, never listed or checked up front; the first pairs are copied to
    eval-sample/ to measure the model on before and after training."""
    shards = find_shards(pairs_path)
    sample = extract_sample(shards, run_dir / EVAL_SAMPLE, limit=STREAM_SAMPLE)
    check = CheckReport(root=str(shards.root), layout="webdataset", usable=sample)
    return RunData(sample, [], check, shards.identity, stream=shards)


def make_dataset(data: RunData, config: RefineConfig, loaded: LoadedModel, rank: int = 0,
                 world_size: int = 1) -> Dataset:
    """What the loop reads: the training pairs (or the stream) through the model's transform and tokenizer."""
    transform = loaded.preprocess_train if config.augment else loaded.preprocess_val
    if data.stream is not None:
        return ShardStream(data.stream, transform, loaded.tokenizer, config.seed, config.batch_size,
                           config.max_image_pixels, rank, world_size)
    dataset = PairDataset(data.train, transform, loaded.tokenizer, config.seed, config.max_image_pixels)
    if config.length_buckets:
        dataset.measure_lengths()
    return dataset
