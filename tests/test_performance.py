"""Speed features keep results the same: cached images, persistent workers, bf16, gradient
checkpointing. How fast they are is measured in benchmarks/, never here."""

import json

import pytest
import torch

from clipfit.config import RefineConfig, validate
from clipfit.data.dataset import PairDataset
from clipfit.data.layouts import load_pairs
from clipfit.errors import UsageError
from clipfit.models import load_model
from conftest import run_main, tiny_refine_args, write_pairs


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(str(tiny_config), "none")


def test_preloaded_images_equal_decoded_ones_and_are_shared(pairs_dir, tiny):
    pairs = load_pairs(pairs_dir).pairs
    dataset = PairDataset(pairs, tiny.preprocess_val, tiny.tokenizer, seed=0, max_pixels=10**8)
    decoded = [dataset.image(i) for i in range(len(pairs))]
    dataset.preload(threads=2)
    assert dataset.pixels.is_shared()  # one copy for all DataLoader workers
    assert all(torch.equal(dataset.image(i), decoded[i]) for i in range(len(pairs)))


def test_augmentation_depends_on_item_not_on_rng_history(pairs_dir, tiny):
    dataset = PairDataset(load_pairs(pairs_dir).pairs, tiny.preprocess_train, tiny.tokenizer, seed=0,
                          max_pixels=10**8)
    first = dataset[(0, 3)]["image"]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(dataset[(0, 3)]["image"], first)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is left alone
    assert not torch.equal(dataset[(1, 3)]["image"], first)  # a new epoch draws a new crop


def test_cache_images_refuses_augmentation():
    with pytest.raises(UsageError, match="--cache-images"):
        validate(RefineConfig(cache_images=True, augment=True))


def test_cached_images_and_persistent_workers_train_the_same_weights(tmp_path, tiny_config):
    from safetensors.torch import load_file

    pairs = write_pairs(tmp_path / "pairs", n=16, captions_per_image=2)
    common = ["--epochs", "2", "--lr", "1e-3"]
    assert run_main(tiny_refine_args(pairs, tmp_path / "plain", tiny_config, *common)) == 0
    assert run_main(tiny_refine_args(pairs, tmp_path / "fast", tiny_config, *common,
                                     "--workers", "2", "--cache-images")) == 0
    plain, fast = load_file(str(tmp_path / "plain/model.safetensors")), load_file(str(tmp_path / "fast/model.safetensors"))
    assert all(torch.equal(plain[k], fast[k]) for k in plain)


def test_bf16_and_gradient_checkpointing_train_and_report_peak_memory(tmp_path, tiny_config, pairs_dir):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--precision", "bf16", "--grad-checkpointing",
                                     "--max-steps", "2", "--log-every", "1")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 2 and run["peak_memory"]["rss_mib"] > 10
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    from clipfit.losses import clip_loss
    from clipfit.parallel import PairEncoder

    def gradients(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        loaded = load_model(str(tiny_config), "none")
        model = loaded.model
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        images, texts = torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16))
        image, text, scale = PairEncoder(model)(images, texts)
        clip_loss(torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1),
                  scale).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
