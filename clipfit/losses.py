"""Loss functions: pure, tensor in, scalar out, each with its formula.

Conventions: B is the batch size, rows of `image_features` and `text_features` are matched
pairs (row i of one goes with row i of the other). Unless a docstring says otherwise the
features are expected L2-normalised.

Multi-positive targets: a loss that uses the other rows of the batch as negatives takes an
optional `positives`, P (B×B bool, symmetric, True on the diagonal): P_ij says rows i and j are
positives of each other (same class, or the same caption). Row i's target is then uniform over
its positives, T = P / rowsum(P), instead of the one-hot y_i = i, and a positive is never a
negative. `positives=None` means P = I and runs exactly the one-hot computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
              positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021), as in open_clip's ClipLoss, with
    multi-positive targets.

    S = s · I Tᵀ with s = logit_scale (already exponentiated), then
    L = ½ [ CE(S, T) + CE(Sᵀ, Tᵀ) ],  T = P / rowsum(P)  (P = I: the one-hot y_i = i),
    where CE(X, T) = −(1/B) Σ_i Σ_j T_ij log softmax(X_i)_j.
    """
    logits = logit_scale * image_features @ text_features.T
    return symmetric_cross_entropy(logits, positives)


def symmetric_cross_entropy(logits: Tensor, positives: Tensor | None = None) -> Tensor:
    """½ [ CE(X, T) + CE(Xᵀ, T') ] with T = P / rowsum(P) and T' = Pᵀ / rowsum(Pᵀ) (T' = T for a
    symmetric P); `positives=None` is the one-hot y_i = i, computed with class indices."""
    if positives is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    positives = positives.to(logits.device)  # e.g. DCLIP's stage 1 builds P on the CPU
    if logits.dtype in (torch.float16, torch.bfloat16):  # under autocast: they would round 1/3 to 0.334
        logits = logits.float()
    forward, backward = (uniform_targets(p, logits.dtype) for p in (positives, positives.T))
    return 0.5 * (F.cross_entropy(logits, forward) + F.cross_entropy(logits.T, backward))


def uniform_targets(positives: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """T = P / rowsum(P): each row's target spread evenly over its positives."""
    weights = positives.to(dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def info_nce(a: Tensor, b: Tensor, temperature: float, ignore: Tensor | None = None,
             positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between rows of a and b at a fixed temperature τ.

    L = ½ [ CE(â b̂ᵀ / τ, T) + CE(b̂ âᵀ / τ, Tᵀ) ] with â, b̂ the L2-normalised rows and
    T = P / rowsum(P) (P = I: y_i = i); see `clip_loss`.
    `ignore` (B×B bool, symmetric, False on the diagonal) drops pairs (i, j) from both softmaxes:
    logits −∞, so they count as neither positive nor negative. Give `ignore` or `positives`, not both.
    """
    if ignore is not None and positives is not None:
        raise ValueError("info_nce: ignore and positives together would put target mass on ignored pairs")
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    if ignore is not None:
        logits = logits.masked_fill(ignore.to(logits.device), float("-inf"))
    return symmetric_cross_entropy(logits, positives)


def same_group(groups: Tensor) -> Tensor:
    """B×B bool: rows i, j whose ids are equal (the diagonal included)."""
    return groups[:, None] == groups[None, :]


def positives_of(groups: Tensor) -> Tensor | None:
    """P (B×B bool) of rows sharing a group id, or None when no two rows share one (P = I: the
    losses then run their one-hot computation, bit for bit)."""
    positives = same_group(groups)
    return positives if int(positives.sum()) > len(groups) else None


def same_item(ids: Tensor) -> Tensor:
    """B×B bool: rows i ≠ j whose ids are equal (the same item, e.g. the same neighbour)."""
    return off_diagonal(same_group(ids))


def off_diagonal(mask: Tensor) -> Tensor:
    """`mask` with its diagonal cleared."""
    return mask & ~torch.eye(len(mask), dtype=torch.bool, device=mask.device)


def rafa_loss(image_features: Tensor, text_features: Tensor, reference: Tensor) -> Tensor:
    """CLIP-Refine's random feature alignment (RaFA, Yamaguchi et al. 2025).

    With z_i the reference drawn by the caller (z_i ~ N(0, σ²I), one per pair, shared by the
    image and its caption), on UNNORMALISED features f_v, f_t of shape (B, d):
        L = 1/(B·d) Σ_i ‖f_v,i − z_i‖² + 1/(B·d) Σ_i ‖f_t,i − z_i‖²
    i.e. mse(f_v, z) + mse(f_t, z) with mean reduction, as in the authors' code.
    """
    reference = reference.to(image_features.device, image_features.dtype)
    return F.mse_loss(image_features, reference) + F.mse_loss(text_features, reference)


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float, temperature: float,
                   positives: Tensor | None = None) -> Tensor:
    """T² · KL(Q ‖ softmax(S/T)) row-wise, batch-mean, with Q = α·P̃ + (1−α)·softmax(G/T) and
    P̃ = P / rowsum(P) the uniform targets over each row's positives (P = I when None)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    if positives is None:
        hard = torch.eye(student_logits.shape[0], device=student_logits.device, dtype=log_p.dtype)
    else:
        hard = uniform_targets(positives.to(student_logits.device), log_p.dtype)
    target = alpha * hard + (1 - alpha) * F.softmax(teacher_logits.to(log_p.dtype) / temperature, dim=1)
    return F.kl_div(log_p, target, reduction="batchmean") * temperature**2


def hycd_loss(image_features: Tensor, text_features: Tensor, teacher_image_features: Tensor,
              teacher_text_features: Tensor, alpha: float = 0.5, temperature: float = 1.0,
              logits: str = "raw-dot", logit_scale: Tensor | float | None = None,
              positives: Tensor | None = None) -> Tensor:
    """CLIP-Refine's hybrid contrastive-distillation (HyCD, Yamaguchi et al. 2025).

    logits="raw-dot" (the authors'): S = f_v f_tᵀ and G = g_v g_tᵀ on UNNORMALISED student (f)
    and frozen-teacher (g) features, no logit scale. logits="scaled-cos": S = s·f̂_v f̂_tᵀ and
    G = s·ĝ_v ĝ_tᵀ on L2-normalised features with s = logit_scale (exponentiated).
    Target Q = α·P̃ + (1−α)·softmax(G/T) row-wise, P̃ = P / rowsum(P) (the authors' α·I when
    P = I, `positives=None`), then
        L = ½ [ T²·KL(Q ‖ softmax(S/T)) + T²·KL(Qᵀ-side ‖ softmax(Sᵀ/T)) ]
    where the second term uses Sᵀ, Gᵀ and Pᵀ (text→image), and KL(Q‖R) = (1/B) Σ_i Σ_j Q_ij log(Q_ij / R_ij).
    The teacher logits are a target: no gradient flows into them.
    """
    if logits == "scaled-cos":
        if logit_scale is None:
            raise ValueError("hycd_loss(logits='scaled-cos') needs logit_scale")
        image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        teacher_image_features = F.normalize(teacher_image_features, dim=-1)
        teacher_text_features = F.normalize(teacher_text_features, dim=-1)
    elif logits == "raw-dot":
        logit_scale = 1.0
    else:
        raise ValueError(f"hycd_loss: logits must be 'raw-dot' or 'scaled-cos', not {logits!r}")
    student = logit_scale * image_features @ text_features.T
    teacher = (logit_scale * teacher_image_features @ teacher_text_features.T).detach()
    transposed = None if positives is None else positives.T
    return 0.5 * (soft_target_kl(student, teacher, alpha, temperature, positives)
                  + soft_target_kl(student.T, teacher.T, alpha, temperature, transposed))


def jsd_bound(positive_scores: Tensor, negative_scores: Tensor) -> Tensor:
    """Negated Jensen-Shannon MI estimator of Deep InfoMax (Hjelm et al. 2019):
        L = mean softplus(−T_pos) + mean softplus(T_neg),
    the binary cross-entropy of a critic telling positives (label 1) from negatives (label 0).
    """
    return F.softplus(-positive_scores).mean() + F.softplus(negative_scores).mean()


def derangement(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling, n ≥ 2)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items (got {n})")
    while True:
        permutation = torch.randperm(n, generator=generator)
        if not (permutation == torch.arange(n)).any():
            return permutation


def lite_loss(image_features: Tensor, text_features: Tensor, scale: Tensor | float, negatives: str = "roll",
              generator: torch.Generator | None = None, positives: Tensor | None = None) -> Tensor:
    """CLIP-Lite's JSD lower bound on image-text mutual information with one negative per pair
    (Shrivastava et al. 2023).

    Critic T(x, y) = s·cos(f_v(x), f_t(y)) (features are L2-normalised here), s = `scale`.
    The negative caption of image i is y_π(i), π the roll i ↦ (i+1) mod B (`negatives="roll"`,
    the authors') or a random derangement drawn from `generator` (`"shuffle"`). Then
        L = (1/B) Σ_i softplus(−T(x_i, y_i)) + (1/|N|) Σ_{i∈N} softplus(T(x_i, y_π'(i))).
    With `positives` P, a negative is never a positive: π'(i) is the first j ∉ P_i in the walk
    π(i), π(i)+1, π(i)+2, … (mod B) through the batch, and N the rows that have such a j (a row
    whose whole batch is its positives adds no negative term; no such row: the term is 0).
    Without P, π' = π and N is every row.
    """
    batch = image_features.shape[0]
    if batch < 2:
        raise ValueError(f"lite_loss needs at least 2 pairs to form a negative (got {batch})")
    image, text = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    if negatives == "roll":
        partner = torch.roll(torch.arange(batch), -1)
    elif negatives == "shuffle":
        partner = derangement(batch, generator)
    else:
        raise ValueError(f"lite_loss: negatives must be 'roll' or 'shuffle', not {negatives!r}")
    positive = scale * (image * text).sum(-1)
    if positives is None:
        negative = scale * (image * text[partner.to(text.device)]).sum(-1)
        return jsd_bound(positive, negative)
    partner, has_negative = first_negatives(partner, positives.cpu())
    rows, partner = has_negative.nonzero().squeeze(1).to(text.device), partner[has_negative].to(text.device)
    negative = scale * (image[rows] * text[partner]).sum(-1)
    negative_term = F.softplus(negative).mean() if len(rows) else positive.new_zeros(())
    return F.softplus(-positive).mean() + negative_term


def first_negatives(start: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """For each row i, the first j in start_i, start_i+1, … (mod B) with P_ij False, and whether
    there is one (B-vectors; where there is none, the first entry is start_i, unused)."""
    batch = len(start)
    walk = (start[:, None] + torch.arange(batch)[None, :]) % batch  # row i: the batch from start_i on
    allowed = ~positives.gather(1, walk)
    first = allowed.to(torch.uint8).argmax(dim=1)  # the first True (argmax returns the first maximum)
    return walk.gather(1, first[:, None]).squeeze(1), allowed.any(dim=1)


def prior_matching_loss(prior_logits: Tensor, feature_logits: Tensor) -> Tensor:
    """Deep InfoMax prior matching as in CLIP-Lite's code: a discriminator D = σ(logit) scores
    samples u ~ U[0,1)^d (label 1) against the model's features (label 0):
        L = −[ mean log D(u) + mean log(1 − D(f)) ] = mean softplus(−a_u) + mean softplus(a_f),
    written with logits a for numerical stability (identical values).
    """
    return jsd_bound(prior_logits, feature_logits)


def ping_loss(image_projection: Tensor, text_projection: Tensor, image_target: Tensor, text_target: Tensor,
              temperature: float, image_target_ids: Tensor | None = None,
              text_target_ids: Tensor | None = None, positives: Tensor | None = None) -> Tensor:
    """One neighbour-guidance term of CLIP-PING (our reconstruction of Thwal et al. 2024).

    With InfoNCE(a, b; M) the symmetric in-batch loss of `info_nce` at temperature τ, ignoring the
    pairs in M:
        L = ½ [ InfoNCE(image_projection, image_target; M_I) + InfoNCE(text_projection, text_target; M_T) ]
    Row i of each target is the frozen-bank embedding of pair i's neighbour. M_I = {(i, j): i ≠ j,
    image_target_ids_i = image_target_ids_j}: two pairs whose neighbour is the same item have the
    same target, which is not a negative of either (likewise M_T; no ids, nothing ignored). With
    `positives` P, M_I and M_T also hold every (i, j), i ≠ j, with P_ij: the neighbour of a
    positive is not a negative either. The method calls it twice:
        L_NN  = ping_loss(h_I(f_v), h_T(f_t), u_NN_I(i), w_NN_T(i), τ)   (intra-modal neighbours)
        L_XNN = ping_loss(x_I(f_v), x_T(f_t), w_NN_T(i), u_NN_I(i), τ)   (cross-modal neighbours)
    where f_v, f_t are the student's normalised embeddings, h_·, x_· learnable linear heads, u the
    frozen image bank and w the frozen text bank. Targets are constants: no gradient reaches them.
    """
    image_ignore = ignored_pairs(image_target_ids, positives)
    text_ignore = ignored_pairs(text_target_ids, positives)
    return 0.5 * (info_nce(image_projection, image_target.detach(), temperature, image_ignore)
                  + info_nce(text_projection, text_target.detach(), temperature, text_ignore))


def ignored_pairs(ids: Tensor | None, positives: Tensor | None) -> Tensor | None:
    """Off-diagonal (i, j) with the same id or P_ij; None when neither is given."""
    ignore = same_item(ids) if ids is not None else None
    if positives is None:
        return ignore
    extra = off_diagonal(positives)
    return extra if ignore is None else ignore | extra.to(ignore.device)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine distance of matched rows: L = (1/B) Σ_i (1 − cos(a_i, b_i)); inputs need not be normalised."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def dclip_loss_parts(student_image: Tensor, student_text: Tensor, teacher_image: Tensor, frozen_text: Tensor,
                     temperature: float = 0.05, positives: Tensor | None = None) -> dict[str, Tensor]:
    """The three unweighted terms of DCLIP's student loss (Csizmadia et al., arXiv 2505.21549):

    img = (1/B) Σ_i (1 − cos(s_img,i, t_img,i))     (towards the cross-modal teacher's image embedding)
    txt = (1/B) Σ_i (1 − cos(s_txt,i, g_txt,i))     (stay near the frozen model's text embedding)
    con = info_nce(s_img, s_txt, τ; P)                (symmetric InfoNCE at a fixed temperature,
                                                       targets uniform over the positives P)

    Inputs may be unnormalised; every term normalises.
    """
    return {
        "img": cosine_distance(student_image, teacher_image),
        "txt": cosine_distance(student_text, frozen_text),
        "con": info_nce(student_image, student_text, temperature, positives=positives),
    }


def dclip_loss(student_image: Tensor, student_text: Tensor, teacher_image: Tensor, frozen_text: Tensor,
               temperature: float = 0.05, weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
               positives: Tensor | None = None) -> Tensor:
    """DCLIP's student loss L = w_img·img + w_txt·txt + w_con·con, the terms of `dclip_loss_parts`."""
    parts = dclip_loss_parts(student_image, student_text, teacher_image, frozen_text, temperature, positives)
    return sum(w * parts[name] for w, name in zip(weights, ("img", "txt", "con")))
