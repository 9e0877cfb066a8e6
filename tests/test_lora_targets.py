import pytest
from torch import nn

from clipfit.errors import UsageError
from clipfit.models import apply_lora, load_model, resolve_lora_targets


class BertLikeLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value, self.dense = (nn.Linear(4, 4) for _ in range(4))


def test_auto_targets_follow_the_model(tiny_config):
    tiny = load_model(str(tiny_config), "none").model
    assert resolve_lora_targets(tiny, "auto") == ["attn", "c_fc", "c_proj"]
    assert resolve_lora_targets(nn.Sequential(BertLikeLayer()), "auto") == ["query", "key", "value"]
    assert resolve_lora_targets(tiny, " c_fc, attn ") == ["c_fc", "attn"]


def test_targets_matching_nothing_name_what_the_model_has(tiny_config):
    tiny = load_model(str(tiny_config), "none").model
    with pytest.raises(UsageError, match="match no module.*c_fc.*c_proj"):
        apply_lora(tiny, 4, 8, 0.0, ["query"])
    with pytest.raises(UsageError, match="--lora-targets auto match no module"):
        apply_lora(nn.Sequential(nn.Conv2d(1, 1, 1)), 4, 8, 0.0, resolve_lora_targets(nn.Sequential(nn.Conv2d(1, 1, 1)), "auto"))
