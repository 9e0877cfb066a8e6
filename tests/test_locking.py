"""Locked towers with BatchNorm: activations survive, statistics stay fixed."""

import copy
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


def conv_weights(model):
    return [m.weight for m in model.visual.modules() if isinstance(m, nn.Conv2d) and m.weight.dim() == 4]


def test_a_convolutional_tower_trains_channels_last_with_the_same_outputs_and_gradients(tmp_path):
    loaded = timm_model(tmp_path)
    reference = copy.deepcopy(loaded.model)
    model = prepare_model(loaded, RefineConfig(), torch.device("cpu"))
    for m in (reference, model):  # as the loop trains: BatchNorm statistics fixed
        m.train()
        freeze_batchnorm(m)
    # a weight with one input channel per group or a 1x1 kernel is both layouts at once
    telling = [w for w in conv_weights(model) if w.shape[1] > 1 and w.shape[-1] > 1]
    assert telling and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                           for w in telling)
    images = torch.randn(4, 3, 32, 32)
    outputs = [m.encode_image(images) for m in (reference, model)]
    for out in outputs:
        out.square().sum().backward()
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    for a, b in zip(conv_weights(reference), conv_weights(model)):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_saved_channels_last_weights_load_as_the_trained_ones(tmp_path):
    from safetensors.torch import load_file

    from clipfit.models import save_state_dict

    model = prepare_model(timm_model(tmp_path), RefineConfig(), torch.device("cpu"))
    save_state_dict(model.state_dict(), tmp_path / "model.safetensors")
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())


def test_a_vit_keeps_its_layout(tiny_config):
    model = prepare_model(load_model(str(tiny_config), "none"), RefineConfig(), torch.device("cpu"))
    assert all(w.is_contiguous() for w in conv_weights(model))
