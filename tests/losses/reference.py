"""Float64 references written from the papers' formulas, independent of pml_margins.

Angles are computed with ``acos`` directly and each target logit is written the
way the paper states it, so these share no code path with the library (which
uses trigonometric identities and Chebyshev polynomials).
"""

from __future__ import annotations

import math

import torch


def normalized_cosine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """cos(theta_ij) for x (B, D) and class weights w (D, C)."""
    x = x / x.norm(dim=1, keepdim=True)
    w = w / w.norm(dim=0, keepdim=True)
    return x @ w


def class_cosine(x: torch.Tensor, w: torch.Tensor, sub_centers: int = 1) -> torch.Tensor:
    """cos(theta_ij) per class: the largest over its sub-centres (columns j*K .. j*K + K-1).

    Sub-center ArcFace (Deng et al., ECCV 2020, Eq. 2): the class logit is the
    maximum of the cosines to the class's K sub-centres.
    """
    c = normalized_cosine(x, w)
    if sub_centers == 1:
        return c
    return c.reshape(c.shape[0], -1, sub_centers).amax(dim=2)


def _theta(c: torch.Tensor) -> torch.Tensor:
    return torch.acos(c.clamp(-1, 1))


def target_softmax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """-log( e^{t_i} / (e^{t_i} + sum_{j != y_i} e^{z_ij}) ), per sample."""
    others = logits.clone()
    others[torch.arange(len(labels)), labels] = -math.inf
    denom = torch.logsumexp(torch.cat([others, target[:, None]], dim=1), dim=1)
    return denom - target


def sphereface_psi(c: torch.Tensor, m: int) -> torch.Tensor:
    """(-1)^k cos(m theta) - 2k on [k pi/m, (k+1) pi/m] (SphereFace, Eq. 7)."""
    theta = _theta(c)
    k = torch.clamp(torch.floor(theta * m / math.pi), max=m - 1)
    return (-1) ** k * torch.cos(m * theta) - 2 * k


def arcface_cos(c: torch.Tensor, m: float, easy_margin: bool = False) -> torch.Tensor:
    """cos(theta + m); beyond theta + m > pi: cos(theta) - m sin(m)."""
    theta = _theta(c)
    with_margin = torch.cos(theta + m)
    if easy_margin:
        return torch.where(c > 0, with_margin, c)
    return torch.where(theta + m <= math.pi, with_margin, c - m * math.sin(m))


def elastic_arc_cos(c: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """ElasticFace-Arc: cos(theta_i + m_i), m_i per row; beyond pi, for m_i in [0, pi]:
    cos(theta_i) - m_i sin(m_i) (ArcFace's rule; other draws keep the paper's cosine)."""
    theta = _theta(c)
    m = margins.to(c.dtype)
    keep = (theta + m <= math.pi) | (m > math.pi)
    return torch.where(keep, torch.cos(theta + m), c - m * torch.sin(m))


def curricular_non_target(c: torch.Tensor, cy: torch.Tensor, m: float, t: float) -> torch.Tensor:
    """CurricularFace's N(t, cos_j): cos_j where cos_j <= cos(theta_y + m) (no fallback, as the
    paper's code compares), else cos_j (t + cos_j); the mask carries no gradient."""
    bound = torch.cos(_theta(cy.detach()) + m)
    hard = c.detach() > bound[:, None]
    return torch.where(hard, c * (t + c), c)


def combined_cos(c: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """cos(m1 theta + m2) - m3, made monotone beyond pi as documented."""
    if m1 == 1:
        return arcface_cos(c, m2) - m3
    phi = m1 * _theta(c) + m2
    k = torch.floor(phi / math.pi)
    if float(m1).is_integer() and m2 == 0:
        k = k.clamp(max=m1 - 1)
    return (-1) ** k * torch.cos(phi) - 2 * k - m3


def adaface_cos(x: torch.Tensor, c: torch.Tensor, hp: dict) -> torch.Tensor:
    """AdaFace (Eqs. 7 and 10) at the step's statistics ``batch_mean``, ``batch_std``.

    With the authors' clips: the norm to [0.001, 100] (no gradient), the target cosine
    to [-1 + eps, 1 - eps] and the angle theta + g_angle to [eps, pi - eps].
    """
    m, h, eps = hp["margin"], hp["h"], hp["eps"]
    norm = x.detach().norm(dim=1).clamp(0.001, 100)
    z = torch.clamp(h * (norm - hp["batch_mean"]) / (hp["batch_std"] + eps), -1, 1)
    g_angle, g_add = -m * z, m * z + m
    theta = torch.acos(c.clamp(-1 + eps, 1 - eps))
    return torch.cos(torch.clamp(theta + g_angle, eps, math.pi - eps)) - g_add


def reference_per_sample(
    kind: str,
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    **hp: float,
) -> torch.Tensor:
    """Per-sample loss of each family, in float64."""
    x, w = x.double(), w.double()
    rows = torch.arange(len(labels))
    if kind == "softmax":
        logits = x @ w + (bias.double() if bias is not None else 0)
        return target_softmax_cross_entropy(logits, labels, logits[rows, labels])
    c = class_cosine(x, w, int(hp.get("sub_centers", 1)))
    cy = c[rows, labels]
    if kind == "sphereface":
        fixed = 1.0 if hp.get("scale") is None else hp["scale"]  # PML's scale: s |x|
        scale = fixed * x.norm(dim=1) if hp.get("feature_norm", True) else fixed
        lam = hp.get("lambda_", 0.0)
        target = (lam * cy + sphereface_psi(cy, int(hp["margin"]))) / (1 + lam)
        scale_col = scale[:, None] if isinstance(scale, torch.Tensor) else scale
        return target_softmax_cross_entropy(c * scale_col, labels, target * scale)
    s = hp["scale"]
    if kind == "magface":  # Eqs. 4-5 of the paper, the norm clipped to [l_a, u_a]
        a = x.norm(dim=1).clamp(hp["l_a"], hp["u_a"])
        m = (hp["u_m"] - hp["l_m"]) / (hp["u_a"] - hp["l_a"]) * (a - hp["l_a"]) + hp["l_m"]
        target = elastic_arc_cos(cy, m)
        if hp.get("easy_margin"):  # the official MagLinear's default
            target = torch.where(cy > 0, torch.cos(_theta(cy) + m), cy)
        ce = target_softmax_cross_entropy(s * c, labels, s * target)
        return ce + hp["lambda_g"] * (1 / a + a / hp["u_a"] ** 2)
    if kind == "curricular":  # ArcFace's target, N(t, cos_j) at the step's t
        others = curricular_non_target(c, cy, hp["margin"], hp["t"])
        return target_softmax_cross_entropy(s * others, labels, s * arcface_cos(cy, hp["margin"]))
    if kind in ("nsl", "adacos"):  # AdaCos: NSL at the scale the step used
        target = cy
    elif kind == "cosface":
        target = cy - hp["margin"]
    elif kind in ("arcface", "subcenter"):
        target = arcface_cos(cy, hp["margin"], bool(hp.get("easy_margin", False)))
    elif kind == "elastic_arc":
        target = elastic_arc_cos(cy, hp["margins"])
    elif kind == "elastic_cos":
        target = cy - hp["margins"].to(cy.dtype)
    elif kind == "combined":
        target = combined_cos(cy, hp["m1"], hp["m2"], hp["m3"])
    elif kind == "adaface":
        target = adaface_cos(x, cy, hp)
    else:
        raise KeyError(kind)
    return target_softmax_cross_entropy(s * c, labels, s * target)


def miner_weights(indices_tuple: tuple[torch.Tensor, ...] | None, batch: int) -> torch.Tensor:
    """PML's rule: weight = (times a sample appears in the tuple) / (max count)."""
    if indices_tuple is None or all(len(t) == 0 for t in indices_tuple):
        return torch.ones(batch, dtype=torch.float64)
    counts = torch.zeros(batch, dtype=torch.float64)
    for t in indices_tuple:
        for i in t.tolist():
            counts[i] += 1
    return counts / counts.max()


def half_ulps(value: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest ``|value - exact|`` in units in the last place of ``value``'s (half)
    dtype at ``|exact|``: its normal spacing there, the subnormal spacing below the
    smallest normal, and at least that at 2^-8 of the largest ``|exact|`` (float32
    arithmetic's noise, ~2^-24 of the terms, lies below). One rounding of an exact value
    is 0.5."""
    info = torch.finfo(value.dtype)
    floor = exact.abs().max() * 2.0**-8
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(floor)))) * info.eps
    spacing = spacing.clamp_min(info.smallest_normal * info.eps)
    return float(((value.double() - exact).abs() / spacing).max())
