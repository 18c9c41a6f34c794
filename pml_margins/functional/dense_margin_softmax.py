r"""The margin softmax of a small problem: one ``(B, C)`` product, one autograd node.

For ``B C`` up to a few hundred thousand the cost of a margin-softmax step is its
op count, not its arithmetic. Here the cosines come from one product, made without
a graph; the target logit :math:`t_i = s_i\psi(z_{iy_i}) + b_{y_i}` is formed from
the gathered target cosines (with the graph of :math:`\psi`'s other inputs and of
the scale; the bias's enters without one), and one autograd function takes the
softmax and writes the gradients by hand (``P``: the softmax of the logits,
:math:`\hat x = x/|x|`, :math:`\hat w_j = w_j/|w_j|`, :math:`g` the incoming gradient):

.. math::
    G_{ij} = g_i s_i P_{ij}\ (j \ne y_i), \qquad
    G_{iy_i} = g_i s_i (P_{iy_i} - 1)\,\psi'(z_{iy_i})

    \partial L/\partial\hat x = G\,\mathrm{diag}(1/|w|)\,W^\top, \qquad
    \partial L/\partial x_i = (I - \hat x_i\hat x_i^\top)\,\partial L/\partial\hat x_i / |x_i|

    \partial L/\partial w_j = (I - \hat w_j\hat w_j^\top)\,\hat X^\top G_{:j} / |w_j|, \qquad
    \partial L/\partial t_i = g_i (P_{iy_i} - 1)

(no projection where a norm is below ``F.normalize``'s ``eps``, as there), plus
:math:`\partial L/\partial s_i = g_i(\sum_{j\ne y_i} P_{ij} z_{ij} + (P_{iy_i} - 1)
\psi(z_{iy_i}))` and :math:`\partial L/\partial b_j = \sum_i g_i (P_{ij} - [j = y_i])` (the
whole of each: the target logit takes the scale and the bias without their graphs, so a
half-precision scale's or bias's gradient is rounded once, in the compute dtype). About
half the ops of the same loss written with torch functions and differentiated by autograd.

The products take ``W``'s raw columns and the result is scaled by :math:`1/|w_j|`
(exact, and no ``W``-sized copy), except in float16 (autocast), whose range raw
columns leave (an entry above 65504, or :math:`1/|w_j|` of a tiny column in the
backward): there they take the unit columns :math:`\hat w_j`, formed in float32, as
PML's normalized ``W`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from pml_margins.functional.autograd_switch import SOFTMAX_REMEDY, backward_once
from pml_margins.functional.margin_softmax import (
    autocast_off,
    check_scale,
    compute_dtype,
    elementwise_result,
    exp_of,
    float16_gradient_scale,
    products_dtype,
    takes_unit_columns,
)
from pml_margins.functional.saved_inputs import outside_inference, save_inputs

__all__ = ["NORM_EPS", "dense_margin_softmax_cross_entropy", "target_and_slope"]

#: ``F.normalize``'s default: norms below this are clamped (the gradient then ignores the norm)
NORM_EPS = 1e-12


def target_and_slope(
    z_y: torch.Tensor,
    target_logit_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    scale: float | torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    slope_needed: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Target logits :math:`t = s\,\psi(z) + b_y` and the slope :math:`\psi'(z)`.

    ``z_y`` (the ``B`` target cosines) carries no graph; ``t`` has the graph of
    :math:`\psi`'s other inputs (per-row margins), of the scale and of the bias. Both
    come from ``target_logit_fn.value_and_slope`` when it has one
    (:class:`~pml_margins.functional.target_logits.TargetWithSlope`, no graph), else
    from autograd; the slope is ``None`` unless ``slope_needed``.
    """
    dtype = z_y.dtype
    slope = None
    if target_logit_fn is None:
        psi = z_y
        slope = torch.ones_like(z_y) if slope_needed else None
    elif hasattr(target_logit_fn, "value_and_slope") and not getattr(
        target_logit_fn, "has_graph", False
    ):
        with torch.no_grad():
            psi, slope = target_logit_fn.value_and_slope(z_y)
        psi = _cast(elementwise_result(psi, z_y, "target_logit_fn"), dtype)
        slope = _cast(slope, dtype) if slope_needed else None
    else:
        psi, slope = _target_with_autograd_slope(z_y, target_logit_fn, slope_needed)
    target = psi * (_cast(scale, dtype) if isinstance(scale, torch.Tensor) else float(scale))
    if bias is not None:
        target = target + _cast(bias.index_select(0, labels), dtype)
    return target, slope


@torch.compiler.disable
def _target_with_autograd_slope(
    z_y: torch.Tensor, target_logit_fn: Callable[[torch.Tensor], torch.Tensor], slope_needed: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r""":math:`\psi(z)` (the graph of its other inputs kept) and, if ``slope_needed``, its
    slope by autograd. Run eagerly under ``torch.compile``: the slope's backward keeps
    :math:`\psi`'s graph for the loss's own (``retain_graph``), which a compiled graph's
    backward with donated buffers refuses (``dynamic=True``: AdaFace, MagFace and
    ElasticFace failed at their first call, found by review)."""
    with torch.enable_grad():
        leaf = z_y.detach().requires_grad_(slope_needed)
        psi = elementwise_result(target_logit_fn(leaf), leaf, "target_logit_fn").to(z_y.dtype)
        slope = _autograd_slope(psi, leaf) if slope_needed else None
    if not slope_needed and not psi.requires_grad:
        psi = psi.detach()
    return psi, slope


def _autograd_slope(psi: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial\psi/\partial z`, element-wise, keeping the graph of :math:`\psi`."""
    if not psi.requires_grad:
        return torch.zeros_like(leaf)
    (slope,) = torch.autograd.grad(
        psi, leaf, torch.ones_like(psi), retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(leaf) if slope is None else slope.detach()


def _row_inverse_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1)`` ``1 / max(|x_i|, eps)`` and ``|x_i|``: ``F.normalize``'s rule (the
    backward tells its gradient's two cases apart by the norms), in three ops."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return norms.clamp_min(NORM_EPS).reciprocal_(), norms


def _column_inverse_norms(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C,)`` ``1 / max(|w_j|, eps)`` and ``|w_j|^2`` where it is at least ``eps^2``, else
    ``inf``: the divisor of the radial term of the gradient (which is 0 where the norm is
    below eps, as in ``F.normalize``, whose clamp passes the gradient at equality). From
    the squared norms (``vecdot``: a strided ``vector_norm`` over columns is several times
    slower); both broadcast over rows."""
    squares = torch.linalg.vecdot(w, w, dim=0)
    inverse = squares.clamp_min(NORM_EPS**2).rsqrt_()
    # (norms compared, as F.normalize does: float32's eps^2 rounds below the square of
    # its eps, so a column of norm exactly eps lost its radial term; found by review)
    return inverse, squares.masked_fill_(squares.sqrt() < NORM_EPS, torch.inf)


def check_norm_scale_form(normalize_embeddings: bool, bias: object, scale: object) -> None:
    """``ValueError`` unless ``scale_by_norm`` can apply: normalized embeddings, a number
    scale (times the norms), no bias."""
    number = not isinstance(scale, torch.Tensor) and not callable(scale)
    if not (normalize_embeddings and bias is None and number):
        raise ValueError("scale_by_norm needs normalize_embeddings=True, a number scale, no bias")


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, without the call when it is already (a step makes a dozen)."""
    return x if x.dtype == dtype else x.to(dtype)


def dense_margin_softmax_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    scale: float | torch.Tensor | Callable[[list[torch.Tensor]], float | torch.Tensor],
    normalize_embeddings: bool,
    normalize_weight: bool,
    bias: torch.Tensor | None = None,
    *,
    mean: bool = False,
    scale_by_norm: bool = False,
) -> torch.Tensor:
    r"""Per-sample margin-softmax cross-entropy of a small problem (see the module doc).

    Same arguments and values as
    :func:`~pml_margins.functional.fused_margin_softmax_cross_entropy` with one
    column of ``W`` per class and no non-target function (a callable ``scale`` is
    given ``[cosines]``, the ``(B, C)`` matrix as one block); ``labels`` are ``int64``
    in ``[0, C)``. Computed in ``compute_dtype`` of the inputs (the products in the
    autocast dtype under autocast); gradients in each input's own dtype. ``mean=True``
    returns their mean instead, ``torch.mean`` of the ``(B,)`` losses, the same value and
    gradients without a node of its own (the backward spreads :math:`g/B` over the rows).
    ``scale_by_norm=True`` (SphereFace's :math:`\|x_i\|\cos\theta_{ij}`; with
    ``normalize_embeddings``, a number ``scale`` and no bias) multiplies the scale by each
    row's norm :math:`n_i = |x_i|`, taken from the normalization, and folds its gradient in:
    :math:`\partial L/\partial x_i` gains :math:`s\,(\partial L/\partial S_i)\,x_i/n_i`
    (0 where :math:`n_i = 0`, as the norm's own derivative) with
    :math:`\partial L/\partial S_i = g_i\,(\sum_{j\ne y_i} P_{ij} z_{ij}
    + (P_{iy_i} - 1)\,\psi(z_{iy_i}))`: no norm and no scale graph through autograd.
    """
    if scale_by_norm:
        check_norm_scale_form(normalize_embeddings, bias, scale)
    # made under torch.inference_mode: copied once (autograd saves a gather's index, the
    # backward reads the batch; see saved_inputs.py)
    embeddings, labels = outside_inference(embeddings), outside_inference(labels)
    bias = outside_inference(bias)
    if isinstance(scale, torch.Tensor):
        scale = outside_inference(scale)
    dtype = compute_dtype(torch.promote_types(embeddings.dtype, weight.dtype))
    device_type = embeddings.device.type
    mm_dtype = products_dtype(dtype, device_type)
    grad = torch.is_grad_enabled()
    with torch.no_grad(), autocast_off(device_type):
        x = _cast(embeddings.detach(), dtype)
        x_inv = x_norms = w_inv = w_radial = None
        norm_scale = float(scale) if scale_by_norm else None  # (checked above)
        if normalize_embeddings:
            x_inv, x_norms = _row_inverse_norms(x)
            x = x * x_inv
            if norm_scale is not None:  # S_i = s |x_i|, no graph (its gradient: below)
                norms = x_norms.squeeze(1)
                scale = norms if norm_scale == 1.0 else norms * norm_scale
        w = _cast(weight.detach(), dtype)
        if normalize_weight:
            w_inv, w_radial = _column_inverse_norms(w)
        unit_w = normalize_weight and takes_unit_columns(mm_dtype)
        w_op = w * w_inv if unit_w else w  # float16: the unit columns (module doc)
        cosine = _cast(torch.mm(_cast(x, mm_dtype), _cast(w_op, mm_dtype)), dtype)
        if normalize_weight and not unit_w:
            cosine.mul_(w_inv)
        index = labels.unsqueeze(1)
        z_y = cosine.gather(1, index).squeeze(1)
    if callable(scale):  # decided from the cosines (before they become the logits)
        scale = check_scale(scale([cosine]), len(labels))
    scale_tensor = scale if isinstance(scale, torch.Tensor) else None
    inputs = (embeddings, weight, scale_tensor, bias)
    grad = grad and any(t is not None and t.requires_grad for t in inputs)
    psi = None
    if norm_scale is not None:  # psi kept for dL/dS; the target logit S psi (psi's graph)
        psi, slope = target_and_slope(z_y, target_logit_fn, 1.0, None, labels, grad)
        target = psi * scale
        psi = psi.detach()
    elif grad and scale_tensor is not None and scale_tensor.requires_grad:
        # the scale and the bias without their graphs: the backward gives each its whole
        # gradient, the target's share included (rounded once to a half scale's dtype)
        psi, slope = target_and_slope(z_y, target_logit_fn, 1.0, None, labels, grad)
        target = psi * _cast(scale_tensor.detach(), psi.dtype)
        if bias is not None:
            target = target + _cast(bias.detach().index_select(0, labels), psi.dtype)
        psi = psi.detach()
    else:
        # the bias without its graph: the backward gives its whole gradient (rounded once)
        b_d = None if bias is None else bias.detach()
        target, slope = target_and_slope(z_y, target_logit_fn, scale, b_d, labels, grad)
    if not grad and not target.requires_grad:
        return _losses(cosine, scale, bias, target.detach(), index, mean)[0]
    saved = _Saved(
        x,
        x_inv,
        x_norms,
        w_inv,
        w_radial,
        index,
        slope,
        mm_dtype,
        scale,
        unit_w,
        mean,
        norm_scale,
        psi,
    )
    return _DenseMarginSoftmax.apply(embeddings, weight, scale_tensor, bias, target, cosine, saved)


class _Saved(NamedTuple):
    """What the backward reads besides the logits: the unit rows and columns, no graph."""

    x: torch.Tensor  # rows of the product (normalized when asked), compute dtype
    x_inv: torch.Tensor | None  # (B, 1) 1 / max(|x|, eps)
    x_norms: torch.Tensor | None  # (B, 1) |x| (the radial term only where above eps)
    w_inv: torch.Tensor | None  # (C,)
    w_radial: torch.Tensor | None  # (C,) |w|^2 where |w| >= eps, else inf
    index: torch.Tensor  # (B, 1) labels
    slope: torch.Tensor | None  # (B,) psi'(z_y)
    mm_dtype: torch.dtype  # the products' operand dtype
    scale: float | torch.Tensor
    unit_w: bool  # the products take the unit columns of W (takes_unit_columns)
    mean: bool  # the function returns the mean of the losses
    norm_scale: float | None  # s where the scale is s |x| (scale_by_norm), else None
    psi: torch.Tensor | None  # (B,) psi(z_y) there, and where the scale tensor needs a gradient


def _losses(
    cosine: torch.Tensor,
    scale: float | torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    index: torch.Tensor,
    mean: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(B,)`` losses (their mean where ``mean``) and the log-softmax of the logits
    ``s z + b`` with the targets written in (``cosine`` becomes the logits)."""
    if isinstance(scale, torch.Tensor):
        cosine.mul_(_cast(scale.detach(), cosine.dtype).unsqueeze(1))
    else:
        cosine.mul_(float(scale))
    if bias is not None:
        cosine.add_(_cast(bias.detach(), cosine.dtype))
    log_prob = torch.log_softmax(cosine.scatter_(1, index, target.unsqueeze(1)), 1)
    picked = log_prob.gather(1, index)  # (B, 1)
    return (torch.mean(picked) if mean else picked.squeeze(1)).neg_(), log_prob


class _DenseMarginSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        embeddings: torch.Tensor,
        weight: torch.Tensor,
        scale_tensor: torch.Tensor | None,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        cosine: torch.Tensor,
        saved: _Saved,
    ) -> torch.Tensor:
        # grad s (and grad x where the scale is s |x|) needs the cosines, which become the logits
        by_norm = saved.norm_scale is not None and ctx.needs_input_grad[0]
        z = cosine.clone() if ctx.needs_input_grad[2] or by_norm else None
        target = _cast(target.detach(), cosine.dtype)
        losses, log_prob = _losses(cosine, saved.scale, bias, target, saved.index, saved.mean)
        ctx.saved = saved
        ctx.dtypes = embeddings.dtype, weight.dtype, None if bias is None else bias.dtype
        # the inputs through save_for_backward: one changed in place before the backward
        # (an optimizer step) raises autograd's usual error instead of wrong gradients
        # (an inference tensor, which has no version counter, as its copy: saved_inputs.py)
        save_inputs(ctx, log_prob, z, weight, embeddings, scale_tensor)
        return losses

    @staticmethod
    @backward_once("the dense margin softmax", SOFTMAX_REMEDY)
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        log_prob, z, weight, embeddings, _ = ctx.saved_tensors  # (the version checks)
        saved: _Saved = ctx.saved
        x, index, mm_dtype = saved.x, saved.index, saved.mm_dtype
        need_x, need_w, need_s, need_b, need_t = ctx.needs_input_grad[:5]
        dtype = log_prob.dtype
        w = _cast(weight.detach(), dtype)
        grad_x = grad_w = grad_s = grad_b = grad_t = None
        with autocast_off(log_prob.device.type):
            g = _cast(grad_losses, dtype)
            if saved.mean:  # each row's share (what torch.mean's backward hands each loss),
                g = g / len(index)  # 0-dim: it broadcasts over the rows
            s = saved.scale
            s = _cast(s.detach(), dtype) if isinstance(s, torch.Tensor) else s
            gs = g * s
            gs = gs.unsqueeze(1) if gs.ndim else gs
            prob = exp_of(log_prob)
            p_minus_1 = prob.gather(1, index).squeeze(1).sub_(1)  # P_iy - 1, once
            by_norm = saved.norm_scale is not None and need_x
            if need_s or need_b or by_norm:  # off the target (it reaches s through t)
                prob.scatter_(1, index, 0.0)
            if need_s:  # sum_{j != y} P_ij z_ij + (P_iy - 1) psi_i, in dtype
                off_target = torch.linalg.vecdot(prob, z)
                grad_s = _cast(off_target.addcmul_(p_minus_1, saved.psi).mul_(g), saved.scale.dtype)
            if by_norm:  # dL/dS (S = s |x|; the target logit S psi: its share too)
                off_target = torch.linalg.vecdot(prob, z)
                grad_norm = torch.addcmul(off_target, p_minus_1, saved.psi).mul_(g)
            if need_b:  # sum_i g_i (P_ij - [j = y_i]), in dtype, then the bias's dtype once
                # (one contiguous vector either way: MKL's gemv on Intel CPUs rounds a stride-0
                # vector, torch.mean's gradient or ``mean``'s share, differently)
                g_rows = g.expand(len(index)).contiguous()
                grad_b = torch.mv(prob.t(), g_rows)
                grad_b.index_add_(0, index.squeeze(1), g_rows * p_minus_1)
                grad_b = _cast(grad_b, ctx.dtypes[2])
            if need_t:
                grad_t = g * p_minus_1
            # d loss / d z: g s P off the target, g s (P_y - 1) psi'(z_y) on it
            target_entry = p_minus_1 if saved.slope is None else p_minus_1 * saved.slope
            grad_z = prob.mul_(gs).scatter_(1, index, target_entry.unsqueeze(1) * gs)
            if saved.w_inv is not None and not saved.unit_w:
                grad_z.mul_(saved.w_inv)  # the products then use the raw W
            # float16 products: G / c where g s would take them out of range, c put back
            top = float16_gradient_scale(grad_z, x, mm_dtype)
            grad_z_mm = _cast(grad_z if top is None else grad_z / top, mm_dtype)
            if need_x:
                w_op = w * saved.w_inv if saved.unit_w else w
                grad_x = _cast(torch.mm(grad_z_mm, _cast(w_op, mm_dtype).t()), dtype)
                if top is not None:
                    grad_x.mul_(top)
                if saved.x_inv is not None:  # x: the unit rows (no radial term where clamped)
                    radial = torch.linalg.vecdot(grad_x, x).unsqueeze_(1)
                    radial.masked_fill_(saved.x_norms < NORM_EPS, 0.0)
                    grad_x.addcmul_(x, radial, value=-1).mul_(saved.x_inv)
                if by_norm:  # s dL/dS_i d|x_i|/dx_i = s dL/dS_i x_i/|x_i| (0 where |x_i| = 0)
                    along = grad_norm.mul_(saved.norm_scale).unsqueeze(1).div_(saved.x_norms)
                    along.masked_fill_(saved.x_norms == 0, 0.0)
                    grad_x.addcmul_(_cast(embeddings.detach(), dtype), along)
                grad_x = _cast(grad_x, ctx.dtypes[0])
            if need_w:
                grad_w = _cast(torch.mm(_cast(x, mm_dtype).t(), grad_z_mm), dtype)
                if top is not None:
                    grad_w.mul_(top)
                if saved.unit_w:
                    grad_w.mul_(saved.w_inv)
                if saved.w_inv is not None:  # w: the raw columns
                    # (vecdot: over columns 1.5-4.5x faster than a product and a sum)
                    radial = torch.linalg.vecdot(grad_w, w, dim=0).div_(saved.w_radial)
                    grad_w.addcmul_(w, radial, value=-1)
                grad_w = _cast(grad_w, ctx.dtypes[1])
        return grad_x, grad_w, grad_s, grad_b, grad_t, None, None
