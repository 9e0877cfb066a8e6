"""--grad-accum N: N micro-batches are trained as one batch, and each pair gets its own random draws.

The equality tests build a real run (tiny random model, generated pairs, every method's own
preparation) and compare one step over a batch of 8 with the same 8 pairs as 4 micro-batches of 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import repeat_captions, run_main, tiny_refine_args, write_pairs
from clipfit.config import RefineConfig, validate
from clipfit.io import read_jsonl
from clipfit.progress import Progress


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("accum") / "pairs", n=16, size=24, captions_per_image=2)


@pytest.fixture(scope="module")
def repeated_pairs(tmp_path_factory) -> Path:
    """Three first captions over 16 pairs: every batch of 8 has positives (multi-positive targets)."""
    return repeat_captions(write_pairs(tmp_path_factory.mktemp("accum-repeated") / "pairs", n=16, size=24), kinds=3)


def trainer_for(pairs: Path, tiny_config: Path, out: Path, method: str, **settings):
    from clipfit import run

    config = RefineConfig(method=method, model=str(tiny_config), pretrained="none", out=str(out), batch_size=2,
                          grad_accum=4, workers=0, lr=1e-3, cache_dir=str(out.parent / "cache"), **settings)
    validate(config)
    setup = run.set_up(str(pairs), config, [], Progress(silent=True))
    frozen = run.precompute_frozen(setup)
    run.prepare_methods(setup)
    trainer = run.make_trainer(setup, [], frozen, suite=None)
    trainer.model.train()
    return trainer


def trainable(trainer) -> dict[str, torch.Tensor]:
    named = dict(trainer.model.named_parameters())
    named.update({f"method.{i}": p for i, p in enumerate(trainer.methods.parameters())})
    return {name: p for name, p in named.items() if p.requires_grad}


def gradients_of(trainer, window: list[dict]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    trainer.optimizer.zero_grad(set_to_none=True)
    values = trainer.step_gradients(window)
    grads = {name: p.grad.clone() for name, p in trainable(trainer).items() if p.grad is not None}
    return values, grads


def one_batch(window: list[dict]) -> dict:
    return {key: torch.cat([batch[key] for batch in window]) for key in window[0]}


CASES = {
    "contrastive": ("contrastive", {}),
    "contrastive-locked-image": ("contrastive", {"lock_image": True}),
    "refine": ("refine", {"weight": ["clip=0.5"]}),
    "lite-shuffle-learned-prior": ("lite", {"lite_negatives": "shuffle", "lite_critic": "learned",
                                            "lite_prior_weight": 0.2}),
    "lite": ("lite", {}),
    "ping": ("ping", {"ping_k": 2}),
    "dclip": ("dclip", {"dclip_teacher_epochs": 1}),
}


@pytest.mark.parametrize("data", ["pairs", "repeated_pairs"])
@pytest.mark.parametrize("case", list(CASES))
def test_four_micro_batches_give_the_loss_and_gradient_of_one_batch(case, data, request, tiny_config, tmp_path):
    method, settings = CASES[case]
    trainer = trainer_for(request.getfixturevalue(data), tiny_config, tmp_path / "run", method, **settings)
    window = [batch for _, batch in zip(range(4), trainer.loader(0, 0))]
    assert [len(b["index"]) for b in window] == [2, 2, 2, 2]
    if data == "repeated_pairs":  # positives across micro-batches: the targets span the whole step
        groups, micro_batch = one_batch(window)["group"], torch.arange(8) // 2
        assert ((groups[:, None] == groups[None, :]) & (micro_batch[:, None] != micro_batch[None, :])).any()

    whole_values, whole = gradients_of(trainer, [one_batch(window)])
    accumulated_values, accumulated = gradients_of(trainer, window)

    assert accumulated_values.keys() == whole_values.keys()
    for term, value in whole_values.items():
        assert accumulated_values[term] == pytest.approx(value, rel=1e-5, abs=1e-6), term
    assert whole and accumulated.keys() == whole.keys()
    for name, grad in whole.items():
        assert grad.abs().sum() > 0 or case == "contrastive-locked-image", name
        # float32 sums in another order: tolerance relative to the tensor's largest entry
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()) + 1e-8,
                                   msg=lambda m: f"{name}: {m}")


def test_accumulated_run_logs_and_trains_what_one_batch_does(pairs, tiny_config, tmp_path):
    """As a user: --batch-size 8 against --batch-size 2 --grad-accum 4, one refine step with its
    contrastive term on; the logged loss parts and the saved weights agree."""
    common = ("--method", "refine", "--weight", "clip=1", "--max-steps", "1", "--log-every", "1", "--lr", "1e-3")
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    assert run_main(tiny_refine_args(pairs, whole, tiny_config, *common, "--batch-size", "8")) == 0
    assert run_main(tiny_refine_args(pairs, accumulated, tiny_config, *common, "--batch-size", "2",
                                     "--grad-accum", "4")) == 0
    rows = [read_jsonl(run / "metrics.jsonl")[0] for run in (whole, accumulated)]
    for term in ("loss", "rafa", "hycd", "clip"):
        assert rows[1][term] == pytest.approx(rows[0][term], rel=1e-5), term
    left, right = load_file(whole / "model.safetensors"), load_file(accumulated / "model.safetensors")
    # AdamW's first step moves each weight by about lr·sign(gradient): a gradient that differed (other
    # negatives) would move many weights 2e-3 apart; float noise on near-zero gradients moves a few by far less.
    moved = max(float((right[name] - left[name]).abs().max()) for name in left)
    assert moved < 1e-4, moved


def test_every_pair_of_an_accumulated_step_gets_its_own_rafa_reference(pairs, tiny_config, tmp_path, monkeypatch):
    from clipfit.methods.refine import Refine

    drawn: list[torch.Tensor] = []
    original = Refine.random_reference
    monkeypatch.setattr(Refine, "random_reference",
                        lambda self, shape, generator: drawn.append(original(self, shape, generator)) or drawn[-1])
    assert run_main(tiny_refine_args(pairs, tmp_path / "run", tiny_config, "--method", "refine", "--batch-size", "4",
                                     "--grad-accum", "2", "--max-steps", "2")) == 0
    rows = torch.cat(drawn)
    assert len(rows) == 2 * 8  # 2 steps of 8 pairs
    assert len(torch.unique(rows, dim=0)) == len(rows), "two pairs shared a random reference"


def test_shuffled_lite_negatives_come_from_the_whole_accumulated_batch(pairs, tiny_config, tmp_path, monkeypatch):
    from clipfit import losses

    sizes: list[int] = []
    original = losses.derangement
    monkeypatch.setattr(losses, "derangement", lambda n, generator=None: sizes.append(n) or original(n, generator))
    assert run_main(tiny_refine_args(pairs, tmp_path / "run", tiny_config, "--method", "lite", "--lite-negatives",
                                     "shuffle", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "2")) == 0
    assert sizes == [8, 8]
