"""RaFA, HyCD, CLIP-Lite and prior-matching losses against values computed by hand (plain Python)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipfit.losses import derangement, hycd_loss, lite_loss, prior_matching_loss, rafa_loss

IMAGE = [[1.0, 0.0, 2.0, -1.0], [0.5, 1.5, 0.0, 0.0], [-1.0, 1.0, 1.0, 0.5]]
TEXT = [[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, -0.5, 0.5], [2.0, 0.0, 0.0, 1.0]]
TEACHER_IMAGE = [[1.0, 0.5, 1.0, 0.0], [0.0, 1.0, 0.5, -0.5], [-0.5, 0.0, 1.0, 1.0]]
TEACHER_TEXT = [[0.5, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0]]


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def cosine(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def transpose(m):
    return [list(c) for c in zip(*m)]


def softplus(x):
    return math.log1p(math.exp(x))


# --- RaFA -------------------------------------------------------------------------------------

def test_rafa_is_mean_squared_distance_to_the_shared_reference():
    z = [[0.5, -0.5, 1.0, 0.0], [0.0, 2.0, -1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    squares = lambda f: sum((f[i][k] - z[i][k]) ** 2 for i in range(3) for k in range(4))  # noqa: E731
    expected = squares(IMAGE) / 12 + squares(TEXT) / 12
    assert rafa_loss(t(IMAGE), t(TEXT), t(z)).item() == pytest.approx(expected, rel=1e-12)


def test_rafa_is_zero_when_the_reference_is_the_features():
    features = t(IMAGE)
    assert rafa_loss(features, features.clone(), features.clone()).item() == 0.0


def test_rafa_gradient_points_each_feature_at_the_reference():
    image = t(IMAGE).requires_grad_()
    z = torch.zeros(3, 4, dtype=torch.float64)
    rafa_loss(image, t(TEXT), z).backward()
    assert torch.allclose(image.grad, 2 * t(IMAGE) / 12)  # d/df of Σ f²/(B·d)


# --- HyCD -------------------------------------------------------------------------------------

def kl_rows(q, p):
    return sum(qij * math.log(qij / pij) for qi, pi in zip(q, p) for qij, pij in zip(qi, pi) if qij > 0) / len(q)


def hycd_by_hand(image, text, teacher_image, teacher_text, alpha, temperature, scale=1.0):
    s = [[scale * dot(a, b) for b in text] for a in image]
    g = [[scale * dot(a, b) for b in teacher_text] for a in teacher_image]

    def one_direction(s, g):
        p = [softmax([x / temperature for x in row]) for row in s]
        soft = [softmax([x / temperature for x in row]) for row in g]
        q = [[alpha * (i == j) + (1 - alpha) * soft[i][j] for j in range(len(row))] for i, row in enumerate(soft)]
        return temperature**2 * kl_rows(q, p)

    return 0.5 * (one_direction(s, g) + one_direction(transpose(s), transpose(g)))


@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.0, 2.0), (0.3, 0.5), (1.0, 1.0)])
def test_hycd_raw_dot_matches_hand_computation(alpha, temperature):
    got = hycd_loss(t(IMAGE), t(TEXT), t(TEACHER_IMAGE), t(TEACHER_TEXT), alpha=alpha, temperature=temperature)
    expected = hycd_by_hand(IMAGE, TEXT, TEACHER_IMAGE, TEACHER_TEXT, alpha, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_hycd_with_alpha_one_is_t_squared_cross_entropy_against_identity(temperature):
    s = t(IMAGE) @ t(TEXT).T
    labels = torch.arange(3)
    ce = 0.5 * (F.cross_entropy(s / temperature, labels) + F.cross_entropy(s.T / temperature, labels))
    got = hycd_loss(t(IMAGE), t(TEXT), t(TEACHER_IMAGE), t(TEACHER_TEXT), alpha=1.0, temperature=temperature)
    assert got.item() == pytest.approx(temperature**2 * ce.item(), rel=1e-10)


def test_hycd_with_alpha_zero_and_student_equal_to_teacher_is_zero():
    got = hycd_loss(t(IMAGE), t(TEXT), t(IMAGE), t(TEXT), alpha=0.0)
    assert abs(got.item()) < 1e-12


def test_hycd_scaled_cos_uses_normalised_features_and_the_scale():
    scale = 10.0
    unit = lambda rows: [[x / math.sqrt(dot(r, r)) for x in r] for r in rows]  # noqa: E731
    expected = hycd_by_hand(unit(IMAGE), unit(TEXT), unit(TEACHER_IMAGE), unit(TEACHER_TEXT), 0.5, 1.0, scale)
    got = hycd_loss(t(IMAGE), t(TEXT), t(TEACHER_IMAGE), t(TEACHER_TEXT), logits="scaled-cos",
                    logit_scale=torch.tensor(scale, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_hycd_sends_no_gradient_into_the_teacher():
    teacher_image, teacher_text = t(TEACHER_IMAGE).requires_grad_(), t(TEACHER_TEXT).requires_grad_()
    image = t(IMAGE).requires_grad_()
    hycd_loss(image, t(TEXT), teacher_image, teacher_text).backward()
    assert image.grad is not None and teacher_image.grad is None and teacher_text.grad is None


def test_hycd_rejects_unknown_logits_and_missing_scale():
    with pytest.raises(ValueError, match="logits"):
        hycd_loss(t(IMAGE), t(TEXT), t(IMAGE), t(TEXT), logits="cos")
    with pytest.raises(ValueError, match="logit_scale"):
        hycd_loss(t(IMAGE), t(TEXT), t(IMAGE), t(TEXT), logits="scaled-cos")


# --- CLIP-Lite --------------------------------------------------------------------------------

def test_lite_roll_matches_hand_computation():
    scale = 5.0
    positive = [scale * cosine(IMAGE[i], TEXT[i]) for i in range(3)]
    negative = [scale * cosine(IMAGE[i], TEXT[(i + 1) % 3]) for i in range(3)]
    expected = sum(softplus(-p) for p in positive) / 3 + sum(softplus(n) for n in negative) / 3
    assert lite_loss(t(IMAGE), t(TEXT), scale).item() == pytest.approx(expected, rel=1e-10)


def test_lite_with_perfectly_separated_critic_approaches_zero():
    # Three unit vectors 120° apart: positives have cos 1, every rolled negative cos -1/2.
    angles = [0, 2 * math.pi / 3, 4 * math.pi / 3]
    features = torch.tensor([[math.cos(a), math.sin(a), 0.0, 0.0] for a in angles], dtype=torch.float64)
    loss = lite_loss(features, features.clone(), 100.0).item()
    assert 0 < loss < 1e-20
    assert loss == pytest.approx(softplus(-100) + softplus(-50), rel=1e-6)


def test_lite_shuffle_uses_a_seeded_derangement():
    image, text = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    first = lite_loss(image, text, 3.0, "shuffle", torch.Generator().manual_seed(7))
    again = lite_loss(image, text, 3.0, "shuffle", torch.Generator().manual_seed(7))
    permutation = derangement(6, torch.Generator().manual_seed(7))
    cos = F.cosine_similarity(image, text, dim=-1)
    cos_negative = F.cosine_similarity(image, text[permutation], dim=-1)
    expected = F.softplus(-3.0 * cos).mean() + F.softplus(3.0 * cos_negative).mean()
    assert first.item() == again.item() == pytest.approx(expected.item(), rel=1e-12)


def test_derangement_has_no_fixed_point_and_is_a_permutation():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 17):
        for _ in range(20):
            p = derangement(n, generator)
            assert sorted(p.tolist()) == list(range(n))
            assert all(p[i] != i for i in range(n))


def test_lite_with_two_pairs_shuffle_equals_roll():
    image, text = t(IMAGE[:2]), t(TEXT[:2])
    assert lite_loss(image, text, 2.0, "shuffle", torch.Generator().manual_seed(3)).item() == \
        pytest.approx(lite_loss(image, text, 2.0).item(), rel=1e-12)


def test_lite_needs_two_pairs_and_a_known_negative_rule():
    with pytest.raises(ValueError, match="at least 2"):
        lite_loss(t(IMAGE[:1]), t(TEXT[:1]), 1.0)
    with pytest.raises(ValueError, match="negatives"):
        lite_loss(t(IMAGE), t(TEXT), 1.0, negatives="hard")


def test_prior_matching_is_the_discriminator_binary_cross_entropy():
    prior_logits, feature_logits = [0.3, -1.2, 2.0], [1.5, -0.4, 0.0]
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -(sum(math.log(sigmoid(a)) for a in prior_logits) / 3
                 + sum(math.log(1 - sigmoid(a)) for a in feature_logits) / 3)
    got = prior_matching_loss(t(prior_logits), t(feature_logits))
    assert got.item() == pytest.approx(expected, rel=1e-12)
