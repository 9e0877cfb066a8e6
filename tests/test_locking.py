"""Locked towers with BatchNorm: activations survive, statistics stay fixed."""

import json

import torch
from torch import nn

from clipfit.config import RefineConfig
from clipfit.models import evaluating, load_model
from clipfit.run import prepare_model
from clipfit.train import freeze_batchnorm

TIMM_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                   "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def timm_model(tmp_path):
    path = tmp_path / "timm-tiny-test.json"
    path.write_text(json.dumps(TIMM_TINY))
    return load_model(str(path), "none")


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_locking_a_timm_tower_keeps_its_activations(tmp_path):
    loaded = timm_model(tmp_path)
    images = torch.randn(4, 3, 32, 32)
    with evaluating(loaded.model):
        reference = loaded.model.encode_image(images)
    model = prepare_model(loaded, RefineConfig(lock_image=True), torch.device("cpu"))
    with evaluating(model):
        locked = model.encode_image(images)
    assert torch.allclose(locked, reference, atol=1e-5)  # same network, now frozen
    assert batchnorms(model) and not any(p.requires_grad for p in model.visual.trunk.parameters())


def test_evaluating_restores_each_module_mode(tmp_path):
    model = timm_model(tmp_path).model
    model.train()
    freeze_batchnorm(model)
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert model.training and all(not bn.training for bn in batchnorms(model))
    running = [bn.running_mean.clone() for bn in batchnorms(model)]
    model.encode_image(torch.randn(4, 3, 32, 32) * 5)
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(running, batchnorms(model)))
