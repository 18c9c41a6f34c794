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

from typing import Any

import torch

from pml_margins.function_transforms import values_under_transforms
from pml_margins.functional.autograd_switch import backward_once, plain_autograd_needed
from pml_margins.functional.margin_softmax import compute_dtype, exp_in_place
from pml_margins.functional.saved_inputs import outside_inference, save_inputs
from pml_margins.validation import (
    CHECKED_BY_CALLER,
    caller_checked,
    check_bool,
    check_circle_margin,
    check_class_labels,
    check_function_result,
    check_logit_scale,
    check_number_or_tensor,
    check_pair_masks,
    check_similarities,
    check_size,
    function_value_checks,
)

__all__ = [
    "circle_loss_dense",
    "circle_loss_dense_negatives",
    "circle_loss_masked",
    "circle_loss_pairs",
    "circle_loss_whole",
    "circle_negative_logits",
    "circle_positive_logits",
    "segment_logsumexp",
]


def circle_positive_logits(s_p: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    r""":math:`\ell_p = -\gamma\,[O_p - s_p]_+\,(s_p - \Delta_p)`, :math:`\alpha_p` detached."""
    m, gamma = _hyperparameters(m, gamma)
    alpha = torch.relu((1 + m) - s_p.detach())
    return -gamma * alpha * (s_p - (1 - m))


def circle_negative_logits(s_n: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    r""":math:`\ell_n = \gamma\,[s_n - O_n]_+\,(s_n - \Delta_n)`, :math:`\alpha_n` detached."""
    m, gamma = _hyperparameters(m, gamma)
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
        an empty segment, ``-inf`` for one of ``-inf`` values only, both with zero
        gradients) and the boolean mask of non-empty segments.

    The per-segment maximum (a scatter ``amax``, detached) is subtracted before
    the exponential, so the result is exact for any magnitude of ``values``.
    """
    if not caller_checked():
        checks = function_value_checks()
        num_segments = check_size(num_segments, "num_segments")
        check_similarities(values, "values", 1, checks, minus_inf=True)  # logits: -inf is log 0
        _check_anchors(segments, "segments", values, "values", num_segments, "num_segments", checks)
        checks.run()
    segments = outside_inference(segments.long())  # (autograd saves an index)
    shift = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    shift = shift.scatter_reduce(0, segments, values.detach(), reduce="amax")
    present = torch.zeros_like(shift).index_add(0, segments, torch.ones_like(values)) > 0
    shift = torch.where(shift == float("-inf"), 0.0, shift)  # empty, or only -inf (NaN stays)
    exps = torch.exp(values - shift[segments])
    sums = torch.zeros_like(shift).index_add(0, segments, exps)
    some = sums != 0  # a segment of -inf only sums to 0: log 0, with zero gradients
    lse = torch.log(torch.where(some, sums, 1.0)) + shift
    return torch.where(some | ~present, lse, float("-inf")), present


def _gamma(gamma: float) -> float:
    """Circle's scale, checked as the losses check it: a finite number > 0 (a NaN or
    negative one gave numbers), at most a logit scale's bound."""
    return check_logit_scale(gamma, "gamma")


def _margin(m: float) -> float:
    """Circle's relaxation margin, checked as the losses check it: a finite number (a NaN
    gave a NaN loss), ``|m| <= 1000``."""
    return check_circle_margin(m, "m")


def _hyperparameters(m: Any, gamma: Any) -> tuple[Any, Any]:
    """``m`` and ``gamma`` of the pair-logit functions: numbers checked as :func:`_margin`
    and :func:`_gamma` do, tensors kept (:func:`check_number_or_tensor`)."""
    return (
        check_number_or_tensor(m, check_circle_margin, "m"),
        check_number_or_tensor(gamma, check_logit_scale, "gamma"),
    )


def _check_anchors(
    anchors: object,
    name: str,
    values: torch.Tensor,
    values_name: str,
    bound: int,
    bound_name: str,
    checks: Any,
) -> None:
    """One integer index per value in ``[0, bound)`` (``checks``: the values read later)."""
    if isinstance(anchors, torch.Tensor) and anchors.ndim == 1 and len(anchors) != len(values):
        raise ValueError(f"{name} has length {len(anchors)} but {values_name} has {len(values)}")
    check_class_labels(anchors, len(values), bound, name, checks, bound_name)


def _length(values: object) -> int:
    """``len`` of a 1-D tensor, else 0 (its checks then say what is wrong)."""
    return len(values) if isinstance(values, torch.Tensor) and values.ndim == 1 else 0


def _check_matrix(sim: object, masks: dict[str, object]) -> None:
    """The checks of the matrix functions (a loss calling them has checked its input):
    ``(B, R)`` finite similarities, boolean masks of that shape, disjoint."""
    if caller_checked():
        return
    checks = function_value_checks()
    sim = check_similarities(sim, "sim", 2, checks)
    check_pair_masks(masks, tuple(sim.shape), checks)
    checks.run()


#: what the dense Circle functions' backward suggests under ``create_graph=True``
_CIRCLE_REMEDY = (
    "run CircleLoss under pml_margins.autograd_only(), or call circle_loss_pairs directly"
)


def _checked(losses: torch.Tensor) -> torch.Tensor:
    """``losses``, refused (``ValueError``) where they are not finite: similarities far
    outside the cosines' [-1, 1] overflow the pair logits (finite input, no NaN/Inf
    loss). Nothing read when CircleLoss (cosine similarities, checked) calls."""
    check_function_result(losses, _overflow_error)
    return losses


def _overflow_error() -> ValueError:
    return ValueError(
        "the Circle loss is not finite: similarities far outside the cosines' [-1, 1] "
        "overflowed its pair logits gamma * alpha * (s - Delta); pass cosine similarities"
    )


def _softplus(z: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 + e^z)`, exact for every ``z`` (``F.softplus`` returns ``z`` itself
    above its threshold of 20, 2e-9 short of the value, whose gradient is then 1 instead of
    the hand-written backward's :math:`\sigma(z)`)."""
    return torch.logaddexp(z, torch.zeros_like(z))


class _DenseCircle(torch.autograd.Function):
    r"""Per-row Circle loss on a dense matrix with a hand-written backward.

    Forward: :math:`v = 1 - s` (positives) or :math:`s` (negatives), so that both
    pair kinds read :math:`\ell = \gamma[v + m]_+(v - m)` (one pass for both);
    then a row-wise log-sum-exp per kind and a softplus. Backward uses the
    detached :math:`\alpha` (:math:`\partial\ell/\partial v = \gamma[v + m]_+`) and
    the normalized exponentials saved by the forward: a few passes over the
    matrix instead of autograd's replay of every element-wise op.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sim: torch.Tensor,
        pos_mask: torch.Tensor,
        neg_mask: torch.Tensor,
        m: float,
        gamma: float,
    ) -> torch.Tensor:
        v = torch.where(pos_mask, 1 - sim, sim)
        slope = torch.relu(v + m).mul_(gamma)  # gamma * alpha = d l / d v
        logits = v.sub_(m).mul_(slope)
        saved, lses = [], []
        for mask in (pos_mask, neg_mask):
            masked = torch.where(mask, logits, float("-inf"))
            shift = masked.amax(dim=1)
            present = shift != float("-inf")  # NaN stays NaN
            shift = torch.where(present, shift, 0.0)
            exp = exp_in_place(masked.sub_(shift.unsqueeze(1)))
            total = torch.where(present, exp.sum(dim=1), 1.0)
            saved += [exp, total]
            lses.append((torch.log(total) + shift, present))
        (lse_p, has_p), (lse_n, has_n) = lses
        valid = has_p & has_n
        z = lse_p + lse_n
        save_inputs(ctx, pos_mask, slope, *saved, z, valid)
        return torch.where(valid, _softplus(z), 0.0)

    @staticmethod
    @backward_once("the dense Circle loss", _CIRCLE_REMEDY)
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        pos_mask, slope, exp_p, sum_p, exp_n, sum_n, z, valid = ctx.saved_tensors
        row = torch.where(valid, grad * torch.sigmoid(z), 0.0)
        grad_l = exp_p * (row / sum_p).unsqueeze(1)
        grad_l.addcmul_(exp_n, (row / sum_n).unsqueeze(1))
        grad_v = grad_l.mul_(slope)
        grad_sim = torch.where(pos_mask, -grad_v, grad_v)
        return grad_sim, None, None, None, None


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
        m: relaxation margin, a real number (as PML; recommended 0.25-0.4).
        gamma: scale, > 0.

    Returns:
        ``(B,)`` losses in ``compute_dtype(sim.dtype)``: :math:`\operatorname{softplus}
        (\operatorname{LSE}\ell_n + \operatorname{LSE}\ell_p)` per row, 0 where the row
        has no positive or no negative.
    """
    if plain_autograd_needed():  # derivatives the hand-written backward cannot give
        return circle_loss_masked(sim, pos_mask, neg_mask, m, gamma)
    m, gamma = _margin(m), _gamma(gamma)
    _check_matrix(sim, {"pos_mask": pos_mask, "neg_mask": neg_mask})
    with torch.autocast(device_type=sim.device.type, enabled=False):
        sim = sim.to(compute_dtype(sim.dtype))
        if sim.shape[1] == 0:  # no reference: no pairs, 0 per row
            return sim.sum(1) * 0
        return _checked(_DenseCircle.apply(sim, pos_mask, neg_mask, m, gamma))


class _DenseNegativesCircle(torch.autograd.Function):
    r"""Per-row Circle loss with dense negatives and a list of positive pairs.

    The usual shape of a metric-learning batch: few positives per anchor, nearly
    all other pairs negative. Negatives are reduced on the matrix (mask, one
    log-sum-exp per row), positives gathered and reduced per row with scatter
    ``amax``/``index_add``; the backward is hand-written as in :class:`_DenseCircle`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sim: torch.Tensor,
        neg_mask: torch.Tensor,
        pos_keys: torch.Tensor,
        m: float,
        gamma: float,
    ) -> torch.Tensor:
        batch, ref_size = sim.shape
        rows = torch.div(pos_keys, ref_size, rounding_mode="floor")
        s_p = sim.reshape(-1).index_select(0, pos_keys)
        slope_p = torch.relu((1 + m) - s_p).mul_(gamma)  # -d l_p / d s_p
        l_p = (1 - m) - s_p
        l_p.mul_(slope_p)
        shift_p = sim.new_full((batch,), float("-inf")).scatter_reduce_(0, rows, l_p, "amax")
        has_p = shift_p != float("-inf")  # NaN stays NaN
        shift_p = torch.where(has_p, shift_p, 0.0)
        exp_p = exp_in_place(l_p.sub_(shift_p.index_select(0, rows)))
        sum_p = torch.where(has_p, sim.new_zeros(batch).index_add_(0, rows, exp_p), 1.0)

        slope_n = torch.relu(sim + m).mul_(gamma)  # d l_n / d s_n
        masked = torch.where(neg_mask, (sim - m).mul_(slope_n), float("-inf"))
        shift_n = masked.amax(dim=1)
        has_n = shift_n != float("-inf")
        shift_n = torch.where(has_n, shift_n, 0.0)
        exp_n = exp_in_place(masked.sub_(shift_n.unsqueeze(1)))
        sum_n = torch.where(has_n, exp_n.sum(dim=1), 1.0)

        valid = has_p & has_n
        z = torch.log(sum_p) + shift_p + torch.log(sum_n) + shift_n
        save_inputs(ctx, pos_keys, rows, slope_p, exp_p, sum_p, slope_n, exp_n, sum_n, z, valid)
        return torch.where(valid, _softplus(z), 0.0)

    @staticmethod
    @backward_once("the dense Circle loss", _CIRCLE_REMEDY)
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        pos_keys, rows, slope_p, exp_p, sum_p, slope_n, exp_n, sum_n, z, valid = ctx.saved_tensors
        row = torch.where(valid, grad * torch.sigmoid(z), 0.0)
        grad_sim = exp_n * (row / sum_n).unsqueeze(1)
        grad_sim.mul_(slope_n)
        grad_p = exp_p * (row / sum_p).index_select(0, rows)
        grad_sim.view(-1).index_add_(0, pos_keys, grad_p.mul_(slope_p).neg_())
        return grad_sim, None, None, None, None


def circle_loss_dense_negatives(
    sim: torch.Tensor,
    neg_mask: torch.Tensor,
    pos_keys: torch.Tensor,
    m: float,
    gamma: float,
) -> torch.Tensor:
    r"""Per-anchor Circle loss with negatives on the matrix and positives as a list.

    Args:
        sim: ``(B, R)`` cosine similarities.
        neg_mask: ``(B, R)`` bool, the negative pairs.
        pos_keys: 1-D flat indices ``a * R + r`` of the positive pairs (deduplicated,
            disjoint from ``neg_mask``: ``ValueError`` otherwise, while the value checks
            are on).
        m: relaxation margin, a real number (as PML; recommended 0.25-0.4).
        gamma: scale, > 0.

    Returns:
        ``(B,)`` losses as :func:`circle_loss_dense`, which it equals.
    """
    m, gamma = _margin(m), _gamma(gamma)
    if plain_autograd_needed():
        raise ValueError(
            "circle_loss_dense_negatives has a hand-written backward only: under torch.func "
            "transforms, forward-mode AD or pml_margins.autograd_only() use "
            "circle_loss_masked (the same loss from the pair masks)"
        )
    _check_matrix(sim, {"neg_mask": neg_mask})
    if not caller_checked():
        checks = function_value_checks()
        flat_mask = neg_mask.reshape(-1)
        check_class_labels(pos_keys, _length(pos_keys), len(flat_mask), "pos_keys", checks, "B * R")
        checks.run()
        if checks.enabled and len(pos_keys):
            shared = values_under_transforms(flat_mask[pos_keys.long()])  # every vmap lane
            if bool(shared.any()):
                raise ValueError("pos_keys and neg_mask share pairs: a pair is one or the other")
            if len(torch.unique(pos_keys)) != len(pos_keys):  # each would count once more
                raise ValueError("pos_keys has duplicates: list each positive pair once")
    with torch.autocast(device_type=sim.device.type, enabled=False):
        sim = sim.to(compute_dtype(sim.dtype)).contiguous()
        if sim.shape[1] == 0:  # no reference: no pairs, 0 per row
            return sim.sum(1) * 0
        return _checked(_DenseNegativesCircle.apply(sim, neg_mask, pos_keys.long(), m, gamma))


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
        m: relaxation margin, a real number (as PML; recommended 0.25-0.4).
        gamma: scale, > 0.

    Returns:
        ``(B,)`` losses, 0 (zero gradient) for anchors without a positive or without
        a negative pair. Every listed pair counts, duplicates included: deduplicate
        first to follow PML's set semantics.
    """
    m, gamma = _margin(m), _gamma(gamma)
    if not caller_checked():
        checks = function_value_checks()
        num_anchors = check_size(num_anchors, "num_anchors")
        check_similarities(s_p, "s_p", 1, checks)
        check_similarities(s_n, "s_n", 1, checks)
        _check_anchors(pos_anchors, "pos_anchors", s_p, "s_p", num_anchors, "num_anchors", checks)
        _check_anchors(neg_anchors, "neg_anchors", s_n, "s_n", num_anchors, "num_anchors", checks)
        checks.run()
    dtype = compute_dtype(torch.promote_types(s_p.dtype, s_n.dtype))
    with torch.autocast(device_type=s_p.device.type, enabled=False), CHECKED_BY_CALLER:
        lse_p, has_p = segment_logsumexp(
            circle_positive_logits(s_p.to(dtype), m, gamma), pos_anchors, num_anchors
        )
        lse_n, has_n = segment_logsumexp(
            circle_negative_logits(s_n.to(dtype), m, gamma), neg_anchors, num_anchors
        )
        valid = has_p & has_n
        losses = torch.where(valid, _softplus(lse_p + lse_n), torch.zeros_like(lse_p))
    return _checked(losses)


def circle_loss_whole(s_p: torch.Tensor, s_n: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    r"""Whole-set Circle loss: one log-sum over all positive and all negative pairs.

    .. math::
        L = \operatorname{softplus}\big(\operatorname{LSE}_{j\in\mathcal N}\ell_n^j
                                       + \operatorname{LSE}_{i\in\mathcal P}\ell_p^i\big)

    This is the paper's Eq. 4 applied to the whole batch, as in the seed
    implementation (which takes each unordered pair of the batch once), with
    :math:`\alpha` detached as in the paper (the seed snippet differentiates through it:
    the same value, other gradients).

    Args:
        s_p: similarities of all positive pairs (any shape).
        s_n: similarities of all negative pairs (any shape).
        m: relaxation margin, a real number (as PML; recommended 0.25-0.4).
        gamma: scale, > 0.

    Returns:
        A 0-dim tensor; 0 with zero gradients when either set is empty.
    """
    m, gamma = _margin(m), _gamma(gamma)
    if not caller_checked():
        checks = function_value_checks()
        check_similarities(s_p, "s_p", checks=checks)
        check_similarities(s_n, "s_n", checks=checks)
        checks.run()
    dtype = compute_dtype(torch.promote_types(s_p.dtype, s_n.dtype))
    with torch.autocast(device_type=s_p.device.type, enabled=False):
        s_p, s_n = s_p.to(dtype).reshape(-1), s_n.to(dtype).reshape(-1)
        if s_p.numel() == 0 or s_n.numel() == 0:
            return (s_p.sum() + s_n.sum()) * 0 + 0.0  # (+0: a negative sum times 0 is -0)
        lse_p = torch.logsumexp(circle_positive_logits(s_p, m, gamma), dim=0)
        lse_n = torch.logsumexp(circle_negative_logits(s_n, m, gamma), dim=0)
        loss = _softplus(lse_p + lse_n)
    return _checked(loss)


def circle_loss_masked(
    sim: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    m: float,
    gamma: float,
    per_anchor: bool = True,
) -> torch.Tensor:
    r"""Circle loss from the pair masks in plain torch operations of fixed shapes.

    No pair lists and no host reads: what ``torch.func.vmap`` can batch (per-sample
    gradients by ``vmap(grad(...))``), and differentiable any number of times. Each
    masked-out entry is :math:`-\infty` in its log-sum-exp; a row (or batch) with no
    pair of a kind has zeros there instead, so that its log-sum-exp and gradients stay
    finite, and its loss is set to 0.

    Args:
        sim: ``(B, R)`` cosine similarities.
        pos_mask, neg_mask: ``(B, R)`` bool, disjoint.
        m: relaxation margin, a real number (as PML; recommended 0.25-0.4).
        gamma: scale, > 0.
        per_anchor: ``(B,)`` losses as :func:`circle_loss_dense`; else the 0-dim
            whole-set loss of :func:`circle_loss_whole` over the masked pairs.

    Returns:
        The losses in ``compute_dtype(sim.dtype)``.
    """
    m, gamma = _margin(m), _gamma(gamma)
    per_anchor = check_bool(per_anchor, "per_anchor")  # ("no" was taken as True)
    _check_matrix(sim, {"pos_mask": pos_mask, "neg_mask": neg_mask})
    # (masks made under torch.inference_mode: copied, as torch.where saves its condition)
    pos_mask, neg_mask = outside_inference(pos_mask), outside_inference(neg_mask)
    with torch.autocast(device_type=sim.device.type, enabled=False):
        sim = sim.to(compute_dtype(sim.dtype))
        dims = (1,) if per_anchor else (0, 1)
        lses, present = [], []
        for mask, logits in (
            (pos_mask, circle_positive_logits(sim, m, gamma)),
            (neg_mask, circle_negative_logits(sim, m, gamma)),
        ):
            some = mask.any(dim=1) if per_anchor else mask.any()
            masked = torch.where(mask, logits, float("-inf"))
            masked = torch.where(some.unsqueeze(1) if per_anchor else some, masked, 0.0)
            lses.append(torch.logsumexp(masked, dim=dims))
            present.append(some)
        valid = present[0] & present[1]
        losses = torch.where(valid, _softplus(lses[0] + lses[1]), 0.0)
    return _checked(losses)
