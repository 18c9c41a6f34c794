r"""Circle loss (Sun et al., CVPR 2020, arXiv:2002.10857) as pure functions.

For one anchor with positive similarities :math:`s_p^i` and negative
similarities :math:`s_n^j`:

.. math::
    L = \log\Big(1 + \sum_j e^{\gamma\alpha_n^j (s_n^j - \Delta_n)}
                     \sum_i e^{-\gamma\alpha_p^i (s_p^i - \Delta_p)}\Big)
      = \operatorname{softplus}\big(\operatorname{LSE}_j\,\ell_n^j
                                     + \operatorname{LSE}_i\,\ell_p^i\big)

with :math:`\alpha_p = [O_p - s_p]_+`, :math:`\alpha_n = [s_n - O_n]_+` treated
as constants (detached, as in the paper), :math:`O_p = 1+m`, :math:`O_n = -m`,
:math:`\Delta_p = 1-m`, :math:`\Delta_n = m`. :math:`\ell_p` and :math:`\ell_n`
are the *pair logits* below. Every reduction is a log-sum-exp followed by a
softplus, evaluated in at least float32 with autocast disabled, so nothing
overflows at :math:`\gamma = 256` or far beyond. A set with no positive or no
negative pair contributes exactly 0 with zero (not NaN) gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pml_margins.functional.margin_softmax import compute_dtype

__all__ = [
    "circle_loss_dense",
    "circle_loss_pairs",
    "circle_loss_whole",
    "circle_negative_logits",
    "circle_positive_logits",
    "segment_logsumexp",
]


def circle_positive_logits(s_p: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    r""":math:`\ell_p = -\gamma\,[O_p - s_p]_+\,(s_p - \Delta_p)`, :math:`\alpha_p` detached."""
    alpha = torch.relu((1 + m) - s_p.detach())
    return -gamma * alpha * (s_p - (1 - m))


def circle_negative_logits(s_n: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    r""":math:`\ell_n = \gamma\,[s_n - O_n]_+\,(s_n - \Delta_n)`, :math:`\alpha_n` detached."""
    alpha = torch.relu(s_n.detach() + m)
    return gamma * alpha * (s_n - m)


def segment_logsumexp(
    values: torch.Tensor, segments: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Log-sum-exp of ``values`` grouped by ``segments`` (any order, duplicates allowed).

    Args:
        values: 1-D floating tensor.
        segments: 1-D integer tensor of the same length, in ``[0, num_segments)``.
        num_segments: number of output segments.

    Returns:
        ``(lse, present)``: ``lse[k] = log sum_{i: segments_i = k} exp(values_i)`` (0 for
        an empty segment, with zero gradient) and the boolean mask of non-empty segments.

    The per-segment maximum (a scatter ``amax``, detached) is subtracted before
    the exponential, so the result is exact for any magnitude of ``values``.
    """
    shift = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    shift = shift.scatter_reduce(0, segments, values.detach(), reduce="amax")
    present = torch.isfinite(shift)
    shift = torch.where(present, shift, torch.zeros_like(shift))
    exps = torch.exp(values - shift[segments])
    sums = torch.zeros_like(shift).index_add(0, segments, exps)
    sums = torch.where(present, sums, torch.ones_like(sums))
    return torch.log(sums) + shift, present


def _masked_row_logsumexp(
    logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise log-sum-exp over ``mask`` entries; 0 (zero gradient) for empty rows."""
    masked = logits.masked_fill(~mask, float("-inf"))
    shift = masked.detach().amax(dim=1)
    present = torch.isfinite(shift)
    shift = torch.where(present, shift, torch.zeros_like(shift))
    sums = torch.exp(masked - shift.unsqueeze(1)).sum(dim=1)
    sums = torch.where(present, sums, torch.ones_like(sums))
    return torch.log(sums) + shift, present


def circle_loss_dense(
    sim: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    m: float,
    gamma: float,
) -> torch.Tensor:
    r"""Per-anchor Circle loss on a dense similarity matrix.

    Args:
        sim: ``(B, R)`` cosine similarities, row ``a`` holding anchor ``a``'s pairs.
        pos_mask: ``(B, R)`` bool, the positive pairs.
        neg_mask: ``(B, R)`` bool, the negative pairs (disjoint from ``pos_mask``).
        m: relaxation margin.
        gamma: scale.

    Returns:
        ``(B,)`` losses in ``compute_dtype(sim.dtype)``: :math:`\operatorname{softplus}
        (\operatorname{LSE}\ell_n + \operatorname{LSE}\ell_p)` per row, 0 where the row
        has no positive or no negative.
    """
    with torch.autocast(device_type=sim.device.type, enabled=False):
        sim = sim.to(compute_dtype(sim.dtype))
        # One pass for both kinds: with v = 1 - s for positives and v = s for negatives,
        # l_p = gamma [O_p - s]_+ (Delta_p - s) and l_n = gamma [s - O_n]_+ (s - Delta_n)
        # both read gamma [v + m]_+ (v - m).
        v = torch.where(pos_mask, 1 - sim, sim)
        logits = torch.relu(v.detach() + m).mul_(gamma) * (v - m)
        lse_p, has_p = _masked_row_logsumexp(logits, pos_mask)
        lse_n, has_n = _masked_row_logsumexp(logits, neg_mask)
        valid = has_p & has_n
        return torch.where(valid, F.softplus(lse_p + lse_n), torch.zeros_like(lse_p))


def circle_loss_pairs(
    s_p: torch.Tensor,
    pos_anchors: torch.Tensor,
    s_n: torch.Tensor,
    neg_anchors: torch.Tensor,
    num_anchors: int,
    m: float,
    gamma: float,
) -> torch.Tensor:
    r"""Per-anchor Circle loss from lists of pair similarities.

    Args:
        s_p: 1-D similarities of the positive pairs.
        pos_anchors: anchor index of each positive pair, in ``[0, num_anchors)``.
        s_n: 1-D similarities of the negative pairs.
        neg_anchors: anchor index of each negative pair.
        num_anchors: number of anchors ``B`` (length of the output).
        m: relaxation margin.
        gamma: scale.

    Returns:
        ``(B,)`` losses, 0 (zero gradient) for anchors without a positive or without
        a negative pair. Every listed pair counts, duplicates included: deduplicate
        first to follow PML's set semantics.
    """
    dtype = compute_dtype(torch.promote_types(s_p.dtype, s_n.dtype))
    with torch.autocast(device_type=s_p.device.type, enabled=False):
        lse_p, has_p = segment_logsumexp(
            circle_positive_logits(s_p.to(dtype), m, gamma), pos_anchors, num_anchors
        )
        lse_n, has_n = segment_logsumexp(
            circle_negative_logits(s_n.to(dtype), m, gamma), neg_anchors, num_anchors
        )
        valid = has_p & has_n
        return torch.where(valid, F.softplus(lse_p + lse_n), torch.zeros_like(lse_p))


def circle_loss_whole(s_p: torch.Tensor, s_n: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    r"""Whole-set Circle loss: one log-sum over all positive and all negative pairs.

    .. math::
        L = \operatorname{softplus}\big(\operatorname{LSE}_{j\in\mathcal N}\ell_n^j
                                       + \operatorname{LSE}_{i\in\mathcal P}\ell_p^i\big)

    This is the paper's Eq. 4 applied to the whole batch, as in the seed
    implementation (which takes each unordered pair of the batch once).

    Args:
        s_p: similarities of all positive pairs (any shape).
        s_n: similarities of all negative pairs (any shape).
        m: relaxation margin.
        gamma: scale.

    Returns:
        A 0-dim tensor; 0 with zero gradients when either set is empty.
    """
    dtype = compute_dtype(torch.promote_types(s_p.dtype, s_n.dtype))
    with torch.autocast(device_type=s_p.device.type, enabled=False):
        s_p, s_n = s_p.to(dtype).reshape(-1), s_n.to(dtype).reshape(-1)
        if s_p.numel() == 0 or s_n.numel() == 0:
            return (s_p.sum() + s_n.sum()) * 0
        lse_p = torch.logsumexp(circle_positive_logits(s_p, m, gamma), dim=0)
        lse_n = torch.logsumexp(circle_negative_logits(s_n, m, gamma), dim=0)
        return F.softplus(lse_p + lse_n)
