"""LoRA merging: the merged model computes what the trained adapter model computes.

peft 0.21 adds the out_proj delta of an nn.MultiheadAttention adapter twice, in merge() and
also in the unmerged forward (which merges and unmerges around every call; peft PR #3774).
Training and merging agree, so the saved model is the trained one; the canary below notices
when peft changes this.
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from clipfit import models

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


@pytest.fixture
def lora_model(tiny_config):
    arch = models.register_config_file(tiny_config)
    torch.manual_seed(0)
    model = open_clip.create_model(arch).eval()
    wrapped = models.apply_lora(model, RANK, ALPHA, 0.0, list(models.DEFAULT_LORA_TARGETS))
    generator = torch.Generator().manual_seed(1)
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make every check trivial
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return wrapped.eval()


def sample_inputs():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(3, 3, 32, 32, generator=generator), torch.randint(1, 400, (3, 16), generator=generator)


def encode(model, images, texts):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def lora_delta(layer) -> torch.Tensor:
    return SCALE * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def first_attention(model):
    return models.base_model(model).visual.transformer.resblocks[0].attn


def test_merged_copy_computes_what_the_adapter_model_computes(lora_model):
    images, texts = sample_inputs()
    image, text = encode(lora_model, images, texts)
    merged = models.merged_copy(lora_model).eval()
    merged_image, merged_text = encode(merged, images, texts)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert torch.allclose(merged_image, image, atol=1e-5) and torch.allclose(merged_text, text, atol=1e-5)
    base_image, _ = encode(models.base_model(copy_without_adapters(lora_model)), images, texts)
    assert not torch.allclose(base_image, image, atol=1e-3), "the adapters should matter"


def copy_without_adapters(model):
    plain = copy.deepcopy(model)
    for name, param in plain.named_parameters():
        if "lora_B" in name:
            param.data.zero_()
    return plain


def test_merged_copy_leaves_the_trained_wrapper_intact(lora_model):
    images, texts = sample_inputs()
    before = encode(lora_model, images, texts)
    models.merged_copy(lora_model)
    after = encode(lora_model, images, texts)
    assert hasattr(lora_model, "merge_and_unload")
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_linear_and_in_proj_deltas_are_merged_once(lora_model):
    mlp = models.base_model(lora_model).visual.transformer.resblocks[0].mlp.c_fc
    attention = first_attention(lora_model)
    expected_fc = mlp.base_layer.weight + lora_delta(mlp)
    expected_in = attention.base_layer.in_proj_weight + lora_delta(attention)
    merged = models.merged_copy(lora_model)
    merged_block = merged.visual.transformer.resblocks[0]
    assert torch.allclose(merged_block.mlp.c_fc.weight, expected_fc, atol=1e-6)
    assert torch.allclose(merged_block.attn.in_proj_weight, expected_in, atol=1e-6)


@pytest.mark.xfail(strict=True, reason="peft 0.21 applies the MultiheadAttention out_proj delta twice "
                                        "(merge and forward alike); if this passes, peft fixed it: "
                                        "drop this marker and the note in clipfit.models.merged_copy")
def test_multihead_attention_out_proj_delta_is_applied_once(lora_model):
    out_proj = first_attention(lora_model).base_layer.out_proj
    expected = out_proj.base_layer.weight + lora_delta(out_proj)
    merged = models.merged_copy(lora_model)
    assert torch.allclose(merged.visual.transformer.resblocks[0].attn.out_proj.weight, expected, atol=1e-6)
