"""--recipe paper: each method's authors' training settings, flags still winning; the optimiser knobs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_main, tiny_refine_args
from clipfit.config import build_config
from clipfit.errors import UsageError
from clipfit.train import build_optimizer, lr_factor


def test_paper_recipe_sets_the_authors_settings_and_nothing_else():
    refine = build_config({}, set(), {"method": "refine", "recipe": "paper"})
    assert (refine.lr, refine.weight_decay, refine.adam_beta2, refine.adam_eps, refine.decay_all) == \
        (1e-6, 0.1, 0.999, 1e-8, True)
    assert (refine.batch_size, refine.epochs, refine.schedule, refine.hycd_logits) == (512, 1, "constant", "raw-dot")
    untouched = build_config({}, set(), {"method": "refine"})
    assert (refine.lock_image, refine.precision, refine.seed) == (untouched.lock_image, untouched.precision,
                                                                   untouched.seed)
    dclip = build_config({}, set(), {"method": "dclip", "recipe": "paper"})
    assert (dclip.schedule, dclip.grad_accum, dclip.grad_clip, dclip.weight_decay, dclip.dclip_vision) == \
        ("linear", 4, 0.5, 0.01, "proj")
    lite = build_config({}, set(), {"method": "lite", "recipe": "paper"})
    assert (lite.lite_critic, lite.lite_prior_weight, lite.batch_size) == ("heads", 0.1, 256)
    # the authors' targets are one-hot whatever repeats; clipfit's default is multi-positive
    assert [c.multi_positive for c in (refine, dclip, lite, untouched)] == [False, False, False, True]


def test_flags_given_win_over_the_recipe_and_combinations_have_none():
    config = build_config({"batch_size": 8, "lr": 1e-3}, {"batch_size", "lr"}, {"method": "refine", "recipe": "paper"})
    assert (config.batch_size, config.lr, config.adam_beta2) == (8, 1e-3, 0.999)
    for method in ("refine+lite", "ping", "contrastive"):
        with pytest.raises(UsageError, match="no paper recipe"):
            build_config({}, set(), {"method": method, "recipe": "paper"})


def test_decay_all_and_torch_betas_reach_the_optimiser():
    weight, bias = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    grouped = build_optimizer([("w", weight), ("b", bias)], 1e-3, 0.1)
    assert sorted(g["weight_decay"] for g in grouped.param_groups) == [0.0, 0.1]
    plain = build_optimizer([("w", weight), ("b", bias)], 1e-3, 0.1, (0.9, 0.999), 1e-8, decay_all=True)
    assert [(g["weight_decay"], g["betas"], g["eps"], len(g["params"])) for g in plain.param_groups] == \
        [(0.1, (0.9, 0.999), 1e-8, 2)]


def test_the_fused_optimiser_steps_as_torch_plain_adamw_does():
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
    twin = [torch.nn.Parameter(p.detach().clone()) for p in (weight, bias)]
    start = weight.detach().clone()
    ours = build_optimizer([("w", weight), ("b", bias)], 1e-2, 0.1)
    plain = torch.optim.AdamW([{"params": [twin[1]], "weight_decay": 0.0}, {"params": [twin[0]], "weight_decay": 0.1}],
                              lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    assert all(g["fused"] for g in ours.param_groups)
    for _ in range(3):
        for p in (weight, bias, *twin):
            p.grad = torch.ones_like(p) * p.detach().sum().sign()
        ours.step()
        plain.step()
    assert torch.allclose(weight, twin[0], atol=1e-7) and torch.allclose(bias, twin[1], atol=1e-7)
    assert (weight - start).abs().min() > 1e-3  # every weight moved: the comparison is not of untouched tensors


def test_linear_schedule_warms_up_then_falls_to_zero_at_the_last_step():
    assert [lr_factor(s, 2, 6, "linear") for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_cli_recipe_paper_records_its_settings(pairs_dir, tiny_config, tmp_path):
    out = tmp_path / "run"
    assert run_main(tiny_refine_args(pairs_dir, out, tiny_config, "--method", "refine", "--recipe", "paper",
                                     "--max-steps", "1")) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["recipe"], config["lr"], config["adam_beta2"], config["decay_all"], config["batch_size"]) == \
        ("paper", 1e-6, 0.999, True, 8)  # tiny_refine_args' --batch-size 8 wins
    state = torch.load(next((out / "checkpoints").glob("*.pt")), weights_only=True)
    assert [(g["betas"], g["eps"], g["weight_decay"]) for g in state["optimizer"]["param_groups"]] == \
        [((0.9, 0.999), 1e-8, 0.1)]
