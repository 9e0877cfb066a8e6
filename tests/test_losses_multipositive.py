"""Multi-positive targets (issue 23): every in-batch loss against values computed by hand (plain
Python) for a batch whose rows repeat a class or caption, and the one-hot computation, bit for bit,
when nothing repeats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipfit.losses import (clip_loss, dclip_loss_parts, derangement, first_negatives, hycd_loss, info_nce, lite_loss,
                            ping_loss, positives_of, symmetric_cross_entropy)

IMAGE = [[1.0, 0.0, 2.0], [0.5, 1.5, 0.0], [-1.0, 1.0, 1.0], [0.0, 0.5, -1.0]]
TEXT = [[0.0, 1.0, 1.0], [1.0, 1.0, -0.5], [2.0, 0.0, 0.0], [0.5, -1.0, 1.0]]
TEACHER_IMAGE = [[1.0, 0.5, 1.0], [0.0, 1.0, 0.5], [-0.5, 0.0, 1.0], [1.0, 1.0, 0.0]]
TEACHER_TEXT = [[0.5, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 1.0], [0.0, 0.0, 1.0]]
GROUPS = [7, 3, 7, 5]  # rows 0 and 2 share a caption (or class): positives of each other
POSITIVE = lambda i, j: GROUPS[i] == GROUPS[j]  # noqa: E731


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def positives():
    return positives_of(torch.tensor(GROUPS))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(v):
    return [x / math.sqrt(dot(v, v)) for x in v]


def log_softmax(row, kept=None):
    kept = kept or [True] * len(row)
    total = math.log(sum(math.exp(x) for x, k in zip(row, kept) if k))
    return [x - total for x in row]


def softmax(row):
    return [math.exp(x) for x in log_softmax(row)]


def transpose(m):
    return [list(c) for c in zip(*m)]


def targets_of(n):
    """Row i: 1/|positives of i| on each positive, 0 elsewhere."""
    return [[(1 / sum(POSITIVE(i, k) for k in range(n))) if POSITIVE(i, j) else 0.0 for j in range(n)]
            for i in range(n)]


def soft_cross_entropy(logits, targets):
    return sum(-sum(q * lp for q, lp in zip(target, log_softmax(row))) for row, target in zip(logits, targets)) / len(logits)


def symmetric_soft_infonce(a, b, scale):
    s = [[scale * dot(ai, bj) for bj in b] for ai in a]
    targets = targets_of(len(a))  # P is symmetric: the text side's targets are the same rows
    return 0.5 * (soft_cross_entropy(s, targets) + soft_cross_entropy(transpose(s), targets))


def softplus(x):
    return math.log1p(math.exp(x))


def test_positives_of_marks_rows_of_one_group_and_is_none_without_repeats():
    assert positives_of(torch.tensor([4, 1, 9])) is None  # P = I: the losses take their one-hot path
    assert positives().tolist() == [[POSITIVE(i, j) for j in range(4)] for i in range(4)]


def test_clip_loss_targets_are_uniform_over_each_rows_positives():
    image, text = [unit(r) for r in IMAGE], [unit(r) for r in TEXT]
    expected = symmetric_soft_infonce(image, text, 2.5)
    got = clip_loss(t(image), t(text), 2.5, positives())
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert clip_loss(t(image), t(text), 2.5).item() != pytest.approx(expected, rel=1e-3)  # one-hot differs


def test_clip_loss_pulls_an_image_towards_its_positives_caption_where_one_hot_pushes_it_away():
    """Rows 0 and 1 of one class with different captions (two templates): with image features
    e_0..e_3, S = s·textᵀ, so text[j][i] carries s·∂L/∂S_ij. One-hot targets raise L with S_01
    (text 1 is a negative of image 0); multi-positive ones lower it."""
    image = torch.eye(4, dtype=torch.float64)
    text = torch.full((4, 4), 0.1, dtype=torch.float64).fill_diagonal_(0.5)
    same_class = positives_of(torch.tensor([0, 0, 1, 2]))
    slopes = []
    for p in (None, same_class):
        leaf = text.clone().requires_grad_()
        clip_loss(image, leaf, 2.0, p).backward()
        slopes.append(float(leaf.grad[1, 0]))
    one_hot, multi = slopes
    assert one_hot > 0 > multi


def test_exact_duplicate_captions_get_the_same_model_gradient_either_way():
    """Rows 0 and 1 share a caption, so a text tower gives them one embedding: their logits are equal
    and the softmax losses' gradient, summed over the two rows (what reaches the tower's weights),
    is the same with one-hot and multi-positive targets (docs/methods.md says so)."""
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.randn(5, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    text[1] = text[0]
    same = positives_of(torch.tensor([0, 0, 1, 2, 3]))
    terms = {"clip": lambda i, x, p: clip_loss(F.normalize(i, dim=-1), F.normalize(x, dim=-1), 5.0, p),
             "hycd": lambda i, x, p: hycd_loss(i, x, i.detach() + 0.3, x.detach() - 0.2, positives=p),
             "dclip con": lambda i, x, p: info_nce(i, x, 0.1, positives=p)}
    for name, loss in terms.items():
        grads = []
        for p in (None, same):
            leaves = image.clone().requires_grad_(), text.clone().requires_grad_()
            loss(*leaves, p).backward()
            tower = leaves[1].grad.clone()
            tower[0] += tower[1]
            grads.append((leaves[0].grad, tower[[0, 2, 3, 4]]))
        for one_hot, multi in zip(*grads):
            torch.testing.assert_close(multi, one_hot, rtol=1e-10, atol=1e-12, msg=name)


def test_info_nce_and_dclip_contrastive_term_use_the_same_targets():
    tau = 0.5
    expected = symmetric_soft_infonce([unit(r) for r in IMAGE], [unit(r) for r in TEXT], 1 / tau)
    assert info_nce(t(IMAGE), t(TEXT), tau, positives=positives()).item() == pytest.approx(expected, rel=1e-12)
    parts = dclip_loss_parts(t(IMAGE), t(TEXT), t(TEACHER_IMAGE), t(TEACHER_TEXT), tau, positives())
    assert parts["con"].item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        info_nce(t(IMAGE), t(TEXT), tau, ignore=torch.zeros(4, 4, dtype=torch.bool), positives=positives())


def kl_rows(q_rows, logits):
    return sum(sum(q * (math.log(q) - lp) for q, lp in zip(q_row, log_softmax(row)) if q > 0)
               for q_row, row in zip(q_rows, logits)) / len(logits)


@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.3, 2.0)])
def test_hycd_hard_part_is_alpha_times_the_uniform_targets(alpha, temperature):
    s = [[dot(a, b) / temperature for b in TEXT] for a in IMAGE]
    g = [[dot(a, b) / temperature for b in TEACHER_TEXT] for a in TEACHER_IMAGE]
    hard = targets_of(4)

    def direction(student, teacher):
        q = [[alpha * h + (1 - alpha) * p for h, p in zip(hard_row, softmax(row))] for hard_row, row in zip(hard, teacher)]
        return temperature ** 2 * kl_rows(q, student)

    expected = 0.5 * (direction(s, g) + direction(transpose(s), transpose(g)))
    got = hycd_loss(t(IMAGE), t(TEXT), t(TEACHER_IMAGE), t(TEACHER_TEXT), alpha=alpha, temperature=temperature,
                    positives=positives())
    assert got.item() == pytest.approx(expected, rel=1e-12)


def critic(i, j, scale):
    return scale * dot(unit(IMAGE[i]), unit(TEXT[j]))


def lite_by_hand(partners, scale):
    """partners[i]: row i's negative caption, or None (no negative term for that row)."""
    positive = sum(softplus(-critic(i, i, scale)) for i in range(4)) / 4
    negatives = [softplus(critic(i, j, scale)) for i, j in enumerate(partners) if j is not None]
    return positive + (sum(negatives) / len(negatives) if negatives else 0.0)


def test_lite_roll_takes_the_next_row_that_is_not_a_positive():
    groups = torch.tensor([7, 3, 3, 5])  # rows 1 and 2 are positives
    # the roll gives 0 -> 1, 1 -> 2, 2 -> 3, 3 -> 0; row 1's next is its positive, so it walks on to 3
    expected = lite_by_hand([1, 3, 3, 0], 2.0)
    got = lite_loss(t(IMAGE), t(TEXT), 2.0, positives=positives_of(groups))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_lite_row_without_a_negative_adds_no_negative_term():
    groups = torch.tensor([1, 1, 1, 2])  # rows 0-2 walk to row 3; row 3 rolls to row 0
    assert lite_loss(t(IMAGE), t(TEXT), 2.0, positives=positives_of(groups)).item() == \
        pytest.approx(lite_by_hand([3, 3, 3, 0], 2.0), rel=1e-12)
    everyone = positives_of(torch.tensor([1, 1, 1, 1]))  # one caption for the whole batch: no negative at all
    assert lite_loss(t(IMAGE), t(TEXT), 2.0, positives=everyone).item() == \
        pytest.approx(lite_by_hand([None] * 4, 2.0), rel=1e-12)


def test_lite_shuffle_walks_on_from_the_drawn_partner():
    drawn = derangement(4, torch.Generator().manual_seed(5)).tolist()
    partners = []
    for i in range(4):  # the rule by hand: from drawn[i] forward through the batch, the first non-positive
        walk = [(drawn[i] + k) % 4 for k in range(4)]
        partners.append(next((j for j in walk if not POSITIVE(i, j)), None))
    got = lite_loss(t(IMAGE), t(TEXT), 2.0, "shuffle", torch.Generator().manual_seed(5), positives=positives())
    assert got.item() == pytest.approx(lite_by_hand(partners, 2.0), rel=1e-12)
    assert all(j is not None and not POSITIVE(i, j) for i, j in enumerate(partners))


def test_first_negatives_is_never_a_positive():
    groups = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(0))
    same = groups[:, None] == groups[None, :]
    partner, has = first_negatives(torch.randperm(12, generator=torch.Generator().manual_seed(1)), same)
    assert has.all() and not same[torch.arange(12), partner].any()


def test_ping_ignores_the_positives_of_a_row_in_both_directions():
    image_proj = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]]
    text_proj = [[0.0, 1.0], [1.0, 1.0], [3.0, -1.0]]
    image_target = [[1.0, 0.2], [0.0, 1.0], [-1.0, 1.0]]
    text_target = [[0.5, 0.5], [2.0, -1.0], [0.0, -1.0]]
    tau, groups = 0.5, [4, 8, 4]  # rows 0 and 2 are positives: neither is the other's negative

    def by_hand(a, b):
        a, b = [unit(r) for r in a], [unit(r) for r in b]
        s = [[dot(ai, bj) / tau for bj in b] for ai in a]
        kept = [[i == j or groups[i] != groups[j] for j in range(3)] for i in range(3)]
        rows = sum(-log_softmax(s[i], kept[i])[i] for i in range(3)) / 3
        cols = sum(-log_softmax(transpose(s)[i], kept[i])[i] for i in range(3)) / 3
        return 0.5 * (rows + cols)

    expected = 0.5 * (by_hand(image_proj, image_target) + by_hand(text_proj, text_target))
    got = ping_loss(t(image_proj), t(text_proj), t(image_target), t(text_target), tau,
                    positives=positives_of(torch.tensor(groups)))
    assert got.item() == pytest.approx(expected, rel=1e-12)


LOSSES = {
    "clip": lambda a, b, c, d, p: clip_loss(a, b, 3.0, p),
    "info_nce": lambda a, b, c, d, p: info_nce(a, b, 0.1, positives=p),
    "hycd": lambda a, b, c, d, p: hycd_loss(a, b, c, d, positives=p),
    "lite": lambda a, b, c, d, p: lite_loss(a, b, 2.0, positives=p),
    "lite-shuffle": lambda a, b, c, d, p: lite_loss(a, b, 2.0, "shuffle", torch.Generator().manual_seed(3), positives=p),
    "ping": lambda a, b, c, d, p: ping_loss(a, b, c, d, 0.07, positives=p),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_identity_positives_give_the_one_hot_loss_and_gradient(name):
    """P = I written out is the one-hot target: the soft computation agrees with the one-hot one (to
    float rounding; with no repeats StepInputs.positives() gives None, the one-hot code itself)."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(6, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    results = []
    for p in (None, torch.eye(6, dtype=torch.bool)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        loss = LOSSES[name](*leaves, p)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves[:2]]))
    (one_hot, grads), (soft, soft_grads) = results
    assert soft.item() == pytest.approx(one_hot.item(), rel=1e-12)
    for g, s in zip(grads, soft_grads):
        torch.testing.assert_close(s, g, rtol=1e-10, atol=1e-12)


def test_half_precision_logits_get_exact_targets():
    """Under autocast the logits are bf16, where 1/3 is 0.334: the targets are built in float32 and
    the loss is that of the same logits in float32."""
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    three = positives_of(torch.tensor([0, 0, 0, 1, 2, 3]))
    got = symmetric_cross_entropy(logits, three)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(symmetric_cross_entropy(logits.float(), three).item(), rel=1e-6)
