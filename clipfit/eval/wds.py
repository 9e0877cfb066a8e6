"""CLIP_benchmark's WebDataset layout (`wds/NAME`), streamed from its shards.

    DIR/dataset_type.txt                          classification (default), multilabel or retrieval
    DIR/classnames.txt                            one class name a line (classification, multilabel)
    DIR/zeroshot_classification_templates.txt     one template a line, {c} for the class name
    DIR/{test,train}/nshards.txt                  how many shards the split has
    DIR/{test,train}/0.tar, 1.tar, ...            KEY.webp|png|jpg|jpeg with KEY.cls (an integer),
                                                  KEY.npy (multilabel: one 0/1 entry per class) or
                                                  KEY.txt (retrieval: one caption a line)

DIR is a local folder, or `hf-hub:ORG/NAME` for a dataset repository on the Hugging Face hub
(CLIP_benchmark publishes its sets as hf-hub:clip-benchmark/wds_NAME), fetched into
huggingface_hub's cache: the split's shards and the text files, nothing else. With
HF_HUB_OFFLINE=1 only that cache is read; without network, one line and exit 4, at once.

Everything is read as CLIP_benchmark 1.6.2's build_wds_dataset reads it: its class names and
templates are the stripped lines of the two files (when the folder lacks one, CLIP_benchmark's
own data files stand in, clipfit.eval.catalog), images are decoded by PIL and converted to RGB,
a retrieval image's captions are its text's lines. DataLoader workers decode and preprocess
(each worker its own shards, or every worker's share of each shard when there are fewer shards
than workers), so memory holds a few batches of pixels and the embeddings, never the set. The
embeddings of a model with fixed weights go into the feature cache (kind `eval-wds`), keyed by
the model and the shards' content: a second evaluation reads no shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from clipfit.errors import DataError, UsageError
from clipfit.eval.catalog import Found, benchmark_classnames, benchmark_templates, is_wds, wds_hub
from clipfit.hub import HUB_PREFIX, dataset_snapshot, first_line

KINDS = ("classification", "multilabel", "retrieval")
IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference
TARGET_MEMBER = {"classification": "cls", "multilabel": "npy", "retrieval": "txt"}
CLASSNAMES_TXT = "classnames.txt"
TEMPLATES_TXT = "zeroshot_classification_templates.txt"
CACHE_FORMAT = 1
ORDER_SHIFT = 32  # a sample's order: its shard's number above, its position in the shard below


@dataclass
class WdsSet:
    """One split of a set in CLIP_benchmark's WebDataset layout, not yet read."""

    name: str  # wds/NAME, CLIP_benchmark's dataset name (the JSON's `dataset`)
    location: str  # as the user gave it: a folder or hf-hub:ORG/NAME
    root: Path  # the local folder (for the hub: the snapshot in huggingface_hub's cache)
    split: str
    kind: str  # one of KINDS
    shards: tuple[Path, ...]
    classes: list[str] | None = None
    templates: list[str] | None = None
    sources: dict[str, str] = field(default_factory=dict)
    groups = None  # the classifier's rows are the classes (clipfit.eval.zeroshot)

    @property
    def class_count(self) -> int:
        return len(self.classes or ())

    @property
    def key(self) -> str:
        """The set's name in an Encoder's cache."""
        return f"{self.name}:{self.split}:{self.identity}"

    @cached_property
    def identity(self) -> str:
        """Changes when any shard of the split changes (names, sizes, contents)."""
        from clipfit.cache import content_digest

        digest = hashlib.sha256(self.split.encode())
        for shard in self.shards:
            digest.update(json.dumps([shard.name, shard.stat().st_size, content_digest(shard)]).encode())
        return digest.hexdigest()[:16]

    def features(self, encoder) -> tuple[Tensor, Tensor]:
        """(normalised image embeddings, labels or multi-hot targets) through `encoder`."""
        if self.kind == "retrieval":
            raise UsageError(f"{self.name} ({self.location}) is a retrieval set: evaluate it with `clipfit eval retrieval`")
        tensors = encoded(encoder, self)
        return tensors["image"], tensors["target"]

    def pair_features(self, encoder):
        """Images and every caption, as clipfit.eval.retrieval.PairFeatures."""
        from clipfit.eval.retrieval import PairFeatures

        if self.kind != "retrieval":
            raise UsageError(f"{self.name} ({self.location}) is a {self.kind} set, not a retrieval set: "
                             "evaluate it with `clipfit eval zeroshot`")
        tensors = encoded(encoder, self)
        return PairFeatures(tensors["image"], tensors["text"], tensors["text_image"])


# --- finding and reading the layout --------------------------------------------------------------

def open_wds(name: str, location: str | None = None, split: str = "test") -> WdsSet:
    """The set `name` (wds/NAME) at `location`: a folder, hf-hub:ORG/NAME, or by default the copy
    CLIP_benchmark publishes on the hub."""
    if not is_wds(name):
        raise UsageError(f"{name!r} is not a wds/NAME set")
    location = str(location or wds_hub(name))
    root = hub_snapshot(location, split) if location.startswith(HUB_PREFIX) else Path(location)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    kind = read_text(root / "dataset_type.txt", "classification").strip().lower()
    if kind not in KINDS:
        raise DataError(f"{root / 'dataset_type.txt'}: {kind!r} is not a dataset type ({', '.join(KINDS)})")
    data = WdsSet(name, location, root, split, kind, find_shards(root, split))
    if kind != "retrieval":
        classes = own_lines(root / CLASSNAMES_TXT) or benchmark_classnames(name)
        if classes is None:
            raise DataError(f"{root}: no {CLASSNAMES_TXT}, and CLIP_benchmark has no class names for {name}")
        templates = own_lines(root / TEMPLATES_TXT) or benchmark_templates(name)
        data.classes, data.templates = classes.items, templates.items
        data.sources = {"classnames": classes.source, "templates": templates.source}
    return data


def read_text(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if default is None:
            raise DataError(f"{path}: not found (CLIP_benchmark's WebDataset layout needs it)") from None
        return default
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None


def own_lines(path: Path) -> Found | None:
    """A set's own class names or templates: its file's lines, stripped (CLIP_benchmark's reading)."""
    if not path.is_file():
        return None
    return Found([line.strip() for line in read_text(path).splitlines()], str(path))


def find_shards(root: Path, split: str) -> tuple[Path, ...]:
    text = read_text(root / split / "nshards.txt").strip()
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"{root / split / 'nshards.txt'}: {text!r} is not a number of shards")
    shards = tuple(root / split / f"{number}.tar" for number in range(int(text)))
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: not found ({split}/nshards.txt says {len(shards)} shards)")
    return shards


def hub_snapshot(location: str, split: str) -> Path:
    """The hub dataset's text files and `split` shards in huggingface_hub's cache, fetched if need be."""
    return dataset_snapshot(location, ["*.txt", f"{split}/*"], wds_hub("wds/cars"))


def sample_count(shards: tuple[Path, ...]) -> int:
    """How many samples the shards hold (tar headers only), for the progress bar."""
    keys = 0
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                keys += len({member.name.split("/")[-1].split(".")[0] for member in tar if member.isfile()})
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{shard}: not a readable tar file ({e})") from None
    return keys


# --- streaming ----------------------------------------------------------------------------------

class ShardSamples(IterableDataset):
    """Batches of preprocessed images with their targets and order, from this worker's share.

    A batch is {"image": (B, 3, H, W), "order": (B,), "target": labels, 0/1 rows or caption lists}."""

    def __init__(self, shards: tuple[Path, ...], kind: str, preprocess, batch_size: int):
        self.shards, self.kind, self.preprocess, self.batch_size = shards, kind, preprocess, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batch: list = []
        for order, shard, sample in self.mine(worker, workers):
            batch.append((order, *self.decode(shard, sample)))
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)

    def mine(self, worker: int, workers: int) -> Iterator[tuple[int, Path, dict]]:
        """This worker's samples: whole shards while there are enough, else every workers-th sample."""
        split_shards = len(self.shards) >= workers
        seen = 0
        for number, shard in enumerate(self.shards):
            if split_shards and number % workers != worker:
                continue
            for position, sample in enumerate(tar_samples(shard)):
                if split_shards or seen % workers == worker:
                    yield (number << ORDER_SHIFT) + position, shard, sample
                seen += 1

    def decode(self, shard: Path, sample: dict) -> tuple[Tensor, object]:
        where = f"{shard} (sample {sample['__key__']})"
        member = next((m for m in IMAGE_MEMBERS if m in sample), None)
        target = TARGET_MEMBER[self.kind]
        if member is None or target not in sample:
            lacks = f"image member ({', '.join(IMAGE_MEMBERS)})" if member is None else f".{target} member"
            raise DataError(f"{where}: no {lacks}, which every {self.kind} sample has")
        return self.preprocess(decode_image(sample[member], where)), parse_target(self.kind, sample[target], where)

    def collate(self, batch: list) -> dict:
        targets = [target for _, _, target in batch]
        return {"image": torch.stack([image for _, image, _ in batch]),
                "order": torch.tensor([order for order, _, _ in batch], dtype=torch.long),
                "target": targets if self.kind == "retrieval" else torch.stack(targets)}


def tar_samples(shard: Path) -> Iterator[dict]:
    """The samples of one shard as webdataset groups them (members sharing a key), raw bytes."""
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import tarfile_samples

    try:
        yield from tarfile_samples([{"url": str(shard)}], handler=reraise_exception)
    except (tarfile.TarError, OSError, ValueError) as e:
        raise DataError(f"{shard}: not a readable tar file ({first_line(e)})") from None


def decode_image(data: bytes, where: str):
    """PIL's full decode and RGB conversion, as CLIP_benchmark's WebDataset decoder does it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with io.BytesIO(data) as stream:
            image = Image.open(stream)
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable image ({first_line(e)})") from None


def parse_target(kind: str, data: bytes, where: str):
    import numpy as np

    try:
        if kind == "classification":
            return torch.tensor(int(data))
        if kind == "multilabel":
            return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)).to(torch.uint8)
        return data.decode("utf-8").splitlines()
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{where}: its .{TARGET_MEMBER[kind]} member is not a {kind} target ({first_line(e)})") from None


# --- encoding, once per model and shards --------------------------------------------------------

def encoded(encoder, data: WdsSet) -> dict[str, Tensor]:
    """The set's embeddings and targets through `encoder`: once per Encoder, and for a model with
    fixed weights once per feature cache."""
    memo = ("wds", data.identity)
    if memo not in encoder.cache:
        cache, identity = getattr(encoder, "feature_cache", None), getattr(encoder, "identity", None)
        if cache is None or identity is None:
            encoder.cache[memo] = stream_features(encoder, data)
        else:
            key = {"kind": "eval-wds", "format": CACHE_FORMAT, "model": identity, "shards": data.identity,
                   "dataset_type": data.kind, "precision": encoder.precision, "device": encoder.device.type}
            encoder.cache[memo] = cache.get_or_build(key, lambda: stream_features(encoder, data),
                                                     float_dtype=torch.float32)
    return encoder.cache[memo]


def stream_features(encoder, data: WdsSet) -> dict[str, Tensor]:
    """Every image of the split through the encoder's image tower as its shards stream past
    (and, for retrieval, every caption through its text tower), in the shards' order."""
    from clipfit.features import ordered_loader

    orders, targets = [], []

    def images(loader) -> Iterator[Tensor]:
        for batch in loader:
            orders.append(batch["order"])
            targets.append(batch["target"])
            yield batch["image"]

    stream = ShardSamples(data.shards, data.kind, encoder.preprocess, encoder.batch_size)
    with ordered_loader(stream, None, encoder.workers) as loader:
        image = encoder.image_stream(images(loader), f"images of {data.name}", sample_count(data.shards))
    order = torch.cat(orders).argsort()
    if data.kind != "retrieval":
        return {"image": image[order], "target": torch.cat(targets)[order]}
    captions = [caption_list for batch in targets for caption_list in batch]
    captions = [captions[i] for i in order.tolist()]
    text_image = torch.tensor([i for i, lines in enumerate(captions) for _ in lines], dtype=torch.long)
    text = encoder.texts([line for lines in captions for line in lines], "captions")
    return {"image": image[order], "text": text, "text_image": text_image}


# --- writing the layout -------------------------------------------------------------------------

def write_wds(root: Path, samples, kind: str = "classification", classes: list[str] | None = None,
              templates: list[str] | None = None, split: str = "test", per_shard: int = 10_000) -> int:
    """A split in the layout CLIP_benchmark's convert_dataset writes, with webdataset's ShardWriter:
    `samples` yields (image file bytes, extension, target), the target an int (classification), a
    0/1 array (multilabel) or a list of captions (retrieval). Returns the number of shards."""
    import numpy as np
    from webdataset import ShardWriter

    (root / split).mkdir(parents=True, exist_ok=True)
    for name, lines in ((CLASSNAMES_TXT, classes), (TEMPLATES_TXT, templates)):
        if lines:
            (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if kind != "classification":
        (root / "dataset_type.txt").write_text(kind + "\n", encoding="utf-8")
    writer = ShardWriter(str(root / split / "%d.tar"), maxcount=per_shard, verbose=0)
    for index, (image, extension, target) in enumerate(samples):
        if kind == "retrieval":
            target = "\n".join(caption.replace("\n", r"\n") for caption in target)
        elif kind == "multilabel":
            target = np.asarray(target)
        writer.write({"__key__": f"s{index:07d}", extension: image, TARGET_MEMBER[kind]: target})
    shards = writer.shard
    writer.close()
    (root / split / "nshards.txt").write_text(f"{shards}\n", encoding="utf-8")
    return shards
