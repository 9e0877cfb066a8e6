"""CLIP_benchmark's own evaluation code on one model and one data set; metrics as JSON on stdout.

Run by benchmarks/eval_speed.py in a process of its own, with clip_benchmark==1.6.2 importable
(a benchmark-only dependency: `pip install --no-deps --target DIR clip_benchmark==1.6.2` and
put DIR on PYTHONPATH; its other needs, scikit-learn and torchvision, are clipfit's too).

It does what `clip_benchmark eval` does for these tasks, without its CLI (whose built-in data
sets download): the model through clip_benchmark's open_clip loader, the zero-shot classifier
and logits through `zeroshot_classification.zero_shot_classifier` / `run_classification`,
retrieval through `zeroshot_retrieval.evaluate`. Its `accuracy()` helper fails under numpy 2
(float() of a one-element array), so top-1 is counted from its logits here; its mean per-class
recall is sklearn's balanced accuracy, as in its `evaluate()`.

Task `wds` is its CLI's own path for `--dataset wds/NAME --dataset_root DIR`, unchanged but for
that one helper: `build_dataset` (which calls `build_wds_dataset` and keeps the set's own class
names and templates), the DataLoader over `dataset.batched(batch_size)` its CLI makes, and
`zeroshot_classification.evaluate` / `zeroshot_retrieval.evaluate`, with `accuracy()` replaced by
the same arithmetic on a 0-d value.

    python benchmarks/clip_benchmark_eval.py SPEC.json
"""

from __future__ import annotations

import json
import sys

import torch


def load_model(spec: dict):
    """clip_benchmark's loader; the model is a clipfit run folder, which open_clip reads as `local-dir:`
    (config, preprocessing and weights), as `clip_benchmark eval --model local-dir:DIR` would."""
    from clip_benchmark.models.open_clip import load_open_clip

    return load_open_clip(f"local-dir:{spec['model']}", None, cache_dir=None, device="cpu")


class Captioned(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, captions = self.items[i]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), captions


def collate_captioned(batch):
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def zeroshot(spec: dict, model, transform, tokenizer) -> dict:
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from sklearn.metrics import balanced_accuracy_score
    from torchvision.datasets import ImageFolder

    data = ImageFolder(spec["root"], transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=spec["batch_size"], num_workers=spec["workers"])
    classifier = zero_shot_classifier(model, tokenizer, spec["classnames"], spec["templates"], "cpu", amp=False)
    logits, target = run_classification(model, classifier, loader, "cpu", amp=False)
    predicted = logits.argmax(dim=1)
    return {"acc1": (predicted == target).float().mean().item(),
            "mean_per_class_recall": float(balanced_accuracy_score(target.numpy(), predicted.numpy()))}


def retrieval(spec: dict, model, transform, tokenizer) -> dict:
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate

    loader = torch.utils.data.DataLoader(Captioned(spec["items"], transform), batch_size=spec["batch_size"],
                                         num_workers=spec["workers"], collate_fn=collate_captioned)
    return evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])


def numpy2_accuracy(output, target, topk=(1,)):
    """clip_benchmark's accuracy(), with .item() where it calls float() on a one-element array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def wds(spec: dict, model, transform, tokenizer) -> dict:
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    zeroshot_classification.accuracy = numpy2_accuracy
    task = spec["wds_task"]
    dataset = build_dataset(spec["dataset"], root=spec["root"], transform=transform, split="test", task=task)
    loader = torch.utils.data.DataLoader(dataset.batched(spec["batch_size"]), batch_size=None, shuffle=False,
                                         num_workers=spec["workers"])
    if task == "zeroshot_retrieval":
        return zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    metrics = zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classes, dataset.templates, "cpu",
                                               amp=False)
    return {**metrics, "templates": dataset.templates, "classnames": dataset.classes}


TASKS = {"zeroshot": zeroshot, "retrieval": retrieval, "wds": wds}


def main() -> None:
    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    model, transform, tokenizer = load_model(spec)
    model.eval()
    print(json.dumps(TASKS[spec["task"]](spec, model, transform, tokenizer)))


if __name__ == "__main__":
    main()
