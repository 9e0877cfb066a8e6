import math

import torch

from clipfit.losses import clip_loss, info_nce


def test_clip_loss_matches_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = 2.0
    # logits = 2 * [[1, 0.6], [0, 0.8]]; rows: image->text, columns: text->image
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2)))
    row1 = -math.log(math.exp(1.6) / (math.exp(0) + math.exp(1.6)))
    col0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    col1 = -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    expected = 0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2)
    assert math.isclose(clip_loss(image, text, scale).item(), expected, rel_tol=1e-6)


def test_clip_loss_is_log_batch_size_for_identical_rows():
    features = torch.ones(4, 3) / math.sqrt(3)
    assert math.isclose(clip_loss(features, features, 10.0).item(), math.log(4), rel_tol=1e-6)


def test_info_nce_normalises_and_uses_inverse_temperature():
    a = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    b = torch.tensor([[2.0, 0.0], [0.0, 7.0]])
    # after normalisation both are the identity: logits = I / 0.5
    p = math.exp(2) / (math.exp(2) + 1)
    assert math.isclose(info_nce(a, b, 0.5).item(), -math.log(p), rel_tol=1e-6)
