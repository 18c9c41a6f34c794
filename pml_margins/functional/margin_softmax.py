r"""The margin-softmax core shared by every class-weight loss.

.. math::
    L_i = -\log \frac{e^{s_i\,\psi(z_{i,y_i})}}
                     {e^{s_i\,\psi(z_{i,y_i})} + \sum_{j\ne y_i} e^{s_i z_{i,j}}}

``z`` are the base logits (cosines :math:`\cos\theta_{ij}` for the normalized
losses, raw :math:`W_j^\top x_i + b_j` for plain softmax), :math:`\psi` the
loss's target-logit function (identity for softmax and NSL, :math:`\cos\theta-m`
for CosFace, ...) and :math:`s_i` the scale (a constant, or :math:`\|x_i\|` for
SphereFace).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pml_margins.function_transforms import in_function_transform, is_compiling
from pml_margins.functional.autograd_switch import has_forward_tangent
from pml_margins.functional.saved_inputs import outside_inference
from pml_margins.validation import (
    MAX_LOGIT_TERM,
    caller_checked,
    check_class_labels,
    check_logit_scale,
    check_not_meta,
    check_positive_values,
    check_tensor,
    function_value_checks,
)

__all__ = [
    "TargetLogitFn",
    "autocast_off",
    "compute_dtype",
    "exp_in_place",
    "exp_of",
    "margin_softmax_cross_entropy",
    "products_dtype",
    "takes_unit_columns",
]

#: a target-logit function: base logits (cosines) in, the logits the softmax uses out
TargetLogitFn = Callable[[torch.Tensor], torch.Tensor]


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled inside, where it is on; else a no-op (cheaper than entering one)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


#: :math:`\log_2 e`
LOG2E = 1.4426950408889634
#: fewest values :func:`exp_in_place` takes through ``exp2`` (below, one ``exp`` is faster)
EXP2_MIN_ELEMENTS = 1 << 13


def exp_in_place(values: torch.Tensor) -> torch.Tensor:
    r""":math:`e^x` of ``values``, in place; on CPU in float32/float64 as
    :math:`2^{x \log_2 e}`.

    torch's CPU ``exp`` takes about four times as long as its ``exp2`` on the AMD EPYC
    machines measured (512k float32 values: 249 us against 64, and 95 with the
    multiply; float64: 517 against 207), which made it the largest element-wise pass of
    a 10k-class step. The rounding of the product changes a term by at most
    :math:`|x|\,u` relative (``u`` the unit roundoff): the arguments here are logits
    minus their maximum, so the terms that carry a sum (``x`` near 0) are the least
    changed. Elsewhere (an accelerator, half dtypes, fewer than
    :data:`EXP2_MIN_ELEMENTS` values) it is ``exp_``.
    """
    if _exp2_faster(values):
        return values.mul_(LOG2E).exp2_()
    return values.exp_()


def exp_of(values: torch.Tensor) -> torch.Tensor:
    """:func:`exp_in_place` into a new tensor (``values`` unchanged)."""
    if _exp2_faster(values):
        return torch.mul(values, LOG2E).exp2_()
    return torch.exp(values)


def _exp2_faster(values: torch.Tensor) -> bool:
    """CPU, float32/float64, and enough values that the pass outweighs the second op
    (float32: equal at ~7k values; 65k: 38.7 us against 17.3)."""
    return (
        values.device.type == "cpu"
        and values.dtype in (torch.float32, torch.float64)
        and values.numel() >= EXP2_MIN_ELEMENTS
    )


def row_norms(embeddings: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r"""``(B,)`` norms :math:`\|x_i\|` of the rows in ``dtype``, outside autocast, with
    their graph (SphereFace's feature-norm scale)."""
    with autocast_off(embeddings.device.type):
        return torch.linalg.vector_norm(embeddings.to(dtype), dim=1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmax and the margins are evaluated in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def products_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The operand dtype of the matrix products of a loss computed in ``dtype``:
    autocast's where it is on and ``dtype`` is float32 (autocast leaves float64 alone),
    else ``dtype``."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


#: the bound float16 gradient products are kept within (float16's largest is 65504: a
#: margin of 4x for what the bounds below leave out, such as a non-target slope up to 3)
FLOAT16_PRODUCT_BOUND = 2.0**14


def float16_gradient_scale(
    grad: torch.Tensor,
    rows: torch.Tensor,
    products: torch.dtype,
    column_max: torch.Tensor | float = 1.0,
) -> torch.Tensor | None:
    r"""For float16 products of a logit gradient :math:`G` (``(B, C)``, or ``(K, B, C)``
    planes of sub-centres; compute dtype, the rows' factor :math:`g_i s_i` in it) with
    ``W``'s columns (``grad x = G W^T``, entries at most ``column_max``: 1 for unit columns)
    and with ``rows`` (``grad W = X^T G``): the factor :math:`c` to divide :math:`G` by
    before the products and to multiply them by after, else ``None``.

    :math:`c = \max(1, \max(\max_i \sum_{k,j} |G_{kij}| \max|W|, \max_{k,j} \sum_i
    \|x_i\|_\infty |G_{kij}|) / 2^{14})`, the least that keeps every entry of both
    products (and of :math:`G`) within range: 1, the products as they are, unless
    :math:`g s` passes it (a scale beyond 65504, SphereFace's :math:`s\|x_i\|`, a summed
    loss). On the device.
    """
    if products != torch.float16:
        return None
    size = grad.abs()
    by_row = (size.sum(dim=(0, 2)) if size.ndim == 3 else size.sum(dim=1)).amax() * column_max
    by_column = (rows.abs().amax(dim=1).to(size.dtype) @ size).amax()
    return (torch.maximum(by_row, by_column) / FLOAT16_PRODUCT_BOUND).clamp_min(1.0)


def float16_gradient_operand(
    rows: torch.Tensor,
    row_factor: torch.Tensor,
    products: torch.dtype,
    largest_entry: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The operand :math:`x_i f_i` (:math:`f_i = g_i s_i`, ``(B, 1)``) of the blocked
    products :math:`\sum_i x_i f_i G_{ij}` that give ``W``'s gradient, whose :math:`G` is
    at most ``largest_entry`` in magnitude, and ``None``; for float16 products ``(x f / c,
    c)``, :math:`c = \max(1, \sum_i |f_i| \|x_i\|_\infty \max|G| / 2^{14})`, each
    block's product then multiplied by ``c``: the operand as it is unless an entry could
    leave float16's range. On the device.
    """
    operand = rows * row_factor
    if products != torch.float16:
        return operand, None
    bound = operand.detach().abs().amax(dim=1).sum() * largest_entry
    top = (bound / FLOAT16_PRODUCT_BOUND).clamp_min(1.0)
    return operand / top, top


def takes_unit_columns(products: torch.dtype) -> bool:
    """Whether products in this dtype take the unit columns of ``W`` (normalized in the
    compute dtype first) instead of the raw columns with the result scaled by
    ``1/|W_j|``: float16, whose range (65504) raw columns, ``s |W_j|`` or ``1/|W_j|``
    of a tiny column may leave."""
    return products == torch.float16


def _check_logits_and_labels(logits: object, labels: object) -> None:
    """``(B, C)`` floating logits (any values: a masked class is ``-inf``) and ``(B,)``
    labels in ``[0, C)``, read once unless a checked loss calls."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a floating tensor, got {got}")
    check_tensor(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (B, C), got shape {tuple(logits.shape)}")
    if caller_checked():
        return
    checks = function_value_checks()
    check_class_labels(labels, logits.shape[0], logits.shape[1], checks=checks)
    checks.run()


def check_scale(scale: Any, rows: int, callable_ok: bool = True) -> Any:
    """A margin softmax's ``scale`` for ``rows`` rows: a number, or the values of a tensor
    (floating or integer), in ``(0, MAX_LOGIT_TERM]`` (a NaN scale gave NaN losses); a
    tensor with one entry is expanded to ``(rows,)`` (as broadcasting would), one per row
    (``(rows,)`` or ``(rows, 1)``) is returned as ``(rows,)``; a callable as given if
    ``callable_ok`` (the fused core's scale from the cosines), else ``TypeError``. The
    values are not read again when a loss that checked its own calls
    (:func:`~pml_margins.validation.caller_checked`).

    Raises:
        ValueError / TypeError: a tensor of another shape, a bad number or value.
    """
    if callable(scale) and not callable_ok and not isinstance(scale, torch.Tensor):
        raise TypeError(
            f"scale must be a number or a tensor here, got {type(scale).__name__} (a scale "
            "computed from the cosines is the fused function's)"
        )
    if isinstance(scale, torch.Tensor):
        check_not_meta(scale, "scale")
        if scale.numel() == 1:
            scale = scale.reshape(()).expand(rows)
        elif tuple(scale.shape) in ((rows,), (rows, 1)):
            scale = scale.reshape(rows)
        else:
            raise ValueError(
                f"a tensor scale must have one entry or one per row ({rows},) or ({rows}, 1), "
                f"got shape {tuple(scale.shape)}"
            )
        if not caller_checked():  # as a number scale: (0, MAX_LOGIT_TERM]
            checks = function_value_checks()
            check_positive_values(scale, "scale", checks, MAX_LOGIT_TERM)
            checks.run()
        return scale
    if callable(scale) or caller_checked():  # a loss checks its scale when it is set
        return scale
    return check_logit_scale(scale, "scale")  # 1e300 gave NaN losses


def scale_logits(base: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``base * scale`` (``scale`` a number or a ``(B, 1)`` tensor of positive scales).

    When a tensor scale has a derivative (it requires grad, is a forward-mode dual, or a
    ``torch.func`` transform differentiates it), ``-inf`` logits (masked classes) stay
    ``-inf`` outside the product, so that the scale's derivative has no NaN (``-inf``
    times a zero softmax gradient). Without one, one product: the masking costs three
    passes over ``B x C`` (8.7 ms at 256 x 10k classes on a 2-core CPU)."""
    if not (isinstance(scale, torch.Tensor) and _has_derivative(scale)):
        return base * scale
    masked = base == float("-inf")
    finite = torch.where(masked, 0.0, base)
    return torch.where(masked, float("-inf"), finite * scale)


def _has_derivative(value: torch.Tensor) -> bool:
    """Whether ``value`` may have a derivative: it requires grad, carries a forward-mode
    tangent, runs inside a ``torch.func`` transform, or ``torch.compile`` traces (which
    hides a forward-mode tangent; the compiled masking is cheap)."""
    if value.requires_grad or in_function_transform() or is_compiling():
        return True
    return has_forward_tangent(value)


def elementwise_result(value: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """``value``, the output of the element-wise function ``name`` on ``like``; a
    ``ValueError`` when its shape is not ``like``'s (which scatter and gather would
    report as an internal error)."""
    if not isinstance(value, torch.Tensor) or value.shape != like.shape:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"{name} must return one value per input element, shape {tuple(like.shape)}, "
            f"got {shape}"
        )
    return value


def margin_softmax_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_logit_fn: TargetLogitFn | None,
    scale: float | torch.Tensor = 1.0,
    non_target_logit_fn: TargetLogitFn | None = None,
) -> torch.Tensor:
    r"""Per-sample cross-entropy with a modified target logit.

    Args:
        logits: base logits ``z``, shape ``(B, C)``, any floating dtype (bf16/fp16
            inputs are promoted to float32; autocast is disabled inside).
        labels: integer class indices, shape ``(B,)``, in ``[0, C)`` (checked unless a
            loss that has checked them calls: see
            :func:`~pml_margins.validation.check_function_inputs`); the logits' values are
            not (``-inf`` masks a class; NaN gives NaN losses), nor whether ``s z`` fits
            the compute dtype (cosines do at any scale the check takes, up to 1e15; raw
            logits beyond, say ``1e25 * 1e15``, overflow to NaN losses).
        target_logit_fn: :math:`\psi`, applied to the ``(B,)`` vector of target logits; ``None``
            for the identity.
        scale: :math:`s`, a float or a tensor of ``B`` per-sample scales.
        non_target_logit_fn: applied element-wise to all base logits before scaling
            (``None``: identity); the target entries are then overwritten with
            ``target_logit_fn`` of their *base* logit. Circle loss's class-level form
            and CurricularFace use it. It may close over per-row ``(B,)`` tensors (used
            as ``v.unsqueeze(1)``); the fused core
            (:func:`~pml_margins.functional.fused_margin_softmax_cross_entropy`) takes
            the same function.

    Returns:
        The ``B`` per-sample losses, in ``compute_dtype(logits.dtype)``.

    Only the ``B`` target entries are changed (gathered, mapped, scattered back);
    no ``(B, C)`` one-hot mask is built.
    """
    _check_logits_and_labels(logits, labels)
    scale = check_scale(scale, logits.shape[0], callable_ok=False)
    dtype = compute_dtype(logits.dtype)
    with autocast_off(logits.device.type):
        logits = logits.to(dtype)
        if isinstance(scale, torch.Tensor):  # (autograd saves the factors of a product,
            scale = outside_inference(scale.to(dtype).reshape(-1, 1))  # and a gather's index)
        labels = outside_inference(labels.long())
        index = labels.unsqueeze(1)
        base = logits
        if non_target_logit_fn is not None:  # (in the compute dtype, as the fused core's)
            base = elementwise_result(non_target_logit_fn(logits), logits, "non_target_logit_fn")
            base = base.to(dtype)
        scaled = scale_logits(base, scale)
        if target_logit_fn is not None or non_target_logit_fn is not None:
            # the target entries: psi of their base logit (the identity when None, also
            # where a non-target function changed the others)
            cosines = logits.gather(1, index).squeeze(1)
            target = cosines
            if target_logit_fn is not None:
                target = target_logit_fn(cosines)
                target = elementwise_result(target, cosines, "target_logit_fn").to(dtype)
            scaled = scaled.scatter(1, index, target.unsqueeze(1) * scale)
        return F.cross_entropy(scaled, labels, reduction="none")
