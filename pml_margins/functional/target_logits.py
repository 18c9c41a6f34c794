r"""Target-logit functions of the margin-softmax losses.

Each function maps the cosine :math:`\cos\theta_y` between an embedding and the
weight of its own class to the *unscaled* logit that replaces it in the softmax.
They are pure, element-wise and differentiable, work on any floating dtype and
are evaluated in at least float32 by :func:`~pml_margins.functional.margin_softmax`.

None of them calls ``acos`` on a path that needs a gradient: angles enter through
trigonometric identities and Chebyshev polynomials, or (a non-integer multiple of the
angle) ``atan2`` of :func:`safe_sine` and the cosine, so gradients stay finite at
:math:`\cos\theta = \pm 1` (where ``d acos/dx`` is infinite).

Finite is not accurate there: a slope with :math:`\cos\theta / \sin\theta` in it
(ArcFace's, the combined margin's) reads :math:`\sin\theta` from the cosine alone, and
within ~1e-3 rad of :math:`\theta = 0` (or :math:`\pi`) a float32 cosine no longer
resolves the angle: :math:`1 - \cos\theta` is a few of its ulps, the slope is off by up
to tens of percent at 3e-4 rad (a review measured 0.46 relative error of ArcFace's input
gradient there against float64; PML's ``acos`` path, 0.08), and the error is that of the
input's own rounding, not of the formula. The target's gradient term carries the factor
``1 - p_y`` (at :math:`\theta \approx 0`: below 1e-20 with ``s = 64`` at any number of
classes, ~1e-2 with ``s = 16`` and 10k random others), and embeddings that close to their
class weight (cos > 0.9999995) are rare in training; run such an analysis in float64
(exact there to ~1e-15).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from pml_margins.function_transforms import in_function_transform, is_batched, is_compiling
from pml_margins.validation import (
    caller_checked,
    check_angle_margin,
    check_angle_multiple,
    check_bool,
    check_integer_margin,
    check_logit_offset,
    check_multiplier,
    check_number_or_tensor,
    check_signed_angle_margin,
    check_signed_logit_offset,
)

__all__ = [
    "TargetWithSlope",
    "angle_cosine",
    "arcface_target",
    "arcface_value_and_slope",
    "combined_margin_target",
    "combined_margin_value_and_slope",
    "cos_multiple_angle",
    "cosface_target",
    "cosface_value_and_slope",
    "safe_sine",
    "sphereface_psi",
    "sphereface_value_and_slope",
]


def safe_sine(cosine: torch.Tensor) -> torch.Tensor:
    r""":math:`\sin\theta = \sqrt{(1-\cos\theta)(1+\cos\theta)}` for :math:`\theta\in[0,\pi]`.

    The product form loses less precision near :math:`\cos\theta=\pm1` than
    :math:`1-\cos^2\theta`. The value is exact everywhere (0 at
    :math:`\cos\theta=\pm1`); the gradient :math:`-\cos\theta/\sin\theta` is
    exactly 0 (not Inf/NaN) where the sine is 0, at :math:`\cos\theta=\pm1` only:
    the smallest other sine, :math:`\sqrt{2u}` (``u`` the unit roundoff, 1.5e-8 in
    float64), keeps its finite slope, whose share of an embedding's gradient
    (:math:`\sin m\cos\theta/\sin\theta` times :math:`d\cos\theta/dx`, of norm
    :math:`\sin\theta/|x|`) stays finite as the angle closes. Plain torch operations
    (the masked entries take the square root of 1, so no infinite slope reaches
    them): differentiable to any order, and under every ``torch.func`` transform.
    """
    square = (1 - cosine) * (1 + cosine)
    sine = square.clamp_min(0).sqrt().detach()
    flat = sine == 0
    return torch.where(flat, sine, torch.where(flat, 1.0, square).sqrt())


def angle_cosine(cosine: torch.Tensor) -> torch.Tensor:
    r"""``cosine`` clamped to :math:`[-1, 1]`, the cosines of angles in :math:`[0, \pi]`.

    What the additive angular targets :math:`\cos(\theta + m)` (ArcFace, Sub-center,
    ElasticFace-Arc, MagFace, CurricularFace's bound, the combined margin at
    :math:`m_1 = 1`) are evaluated at: a distance that is not the L2 cosine (PML's
    ``CosineSimilarity(p=3)``, say) can give values beyond, where :math:`\theta` does
    not exist; they take the nearest angle, 0 or :math:`\pi`, as PML's ArcFace
    (``get_angles``) does, and no gradient. SphereFace's :math:`\psi` keeps PML's
    ``LargeMarginSoftmaxLoss`` form instead: the polynomial at the given cosine, the
    region :math:`k` from the clamped angle.
    """
    return cosine.clamp(-1.0, 1.0)


def _outside_slope(slope: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
    """``slope`` with 0 where ``cosine`` is outside ``[-1, 1]`` (:func:`angle_cosine`'s
    derivative there), in place."""
    return slope.masked_fill_(cosine.abs() > 1, 0.0)


def cosface_target(cosine: torch.Tensor, margin: float) -> torch.Tensor:
    r"""CosFace / LMCL (Wang et al., 2018): :math:`\cos\theta_y - m` (``m`` may be
    negative, as PML takes it)."""
    return cosine - check_number_or_tensor(margin, check_signed_logit_offset, "margin")


def cosface_value_and_slope(
    cosine: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`cosface_target` and its derivative (1), no graph."""
    margin = check_number_or_tensor(margin, check_signed_logit_offset, "margin")
    return cosine - margin, torch.ones_like(cosine)


def arcface_target(cosine: torch.Tensor, margin: float, easy_margin: bool = False) -> torch.Tensor:
    r"""ArcFace (Deng et al., 2019): :math:`\cos(\theta_y + m)`, margin in radians.

    .. math::
        \cos(\theta+m) = \cos\theta\cos m - \sin\theta\sin m

    Where :math:`\theta + m > \pi` the cosine would grow again, so the logit falls
    back to :math:`\cos\theta - m\sin m` (the reference implementation's rule,
    keeping the target logit decreasing in :math:`\theta` for margins up to about
    2.33 rad, where :math:`\cos m + m\sin m = 1`; above, it jumps up at the switch, as
    insightface's and PML's do). With ``easy_margin``
    the margin is applied only where :math:`\cos\theta > 0`, otherwise
    :math:`\cos\theta` is kept.

    ``margin`` in :math:`(-\pi, \pi)`: a negative one (Liu et al., ECCV 2020, "Negative
    Margin Matters") loosens the target; :math:`\theta + m` never exceeds :math:`\pi`
    then, so there is no fallback (PML's rule, :math:`\theta \le \pi - m`).
    """
    margin = check_number_or_tensor(margin, check_signed_angle_margin, "margin")
    easy_margin = easy_margin if caller_checked() else check_bool(easy_margin, "easy_margin")
    cos_m, sin_m = _cos_sin(margin)
    cosine = angle_cosine(cosine)
    with_margin = cosine * cos_m - safe_sine(cosine) * sin_m
    if easy_margin:
        return torch.where(cosine > 0, with_margin, cosine)
    return torch.where(_within_margin(cosine, margin), with_margin, cosine - margin * sin_m)


def arcface_value_and_slope(
    cosine: torch.Tensor, margin: float, easy_margin: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`arcface_target` and its derivative in one pass, no graph.

    .. math::
        \frac{d}{d\cos\theta}\cos(\theta+m) = \cos m + \sin m\,\frac{\cos\theta}{\sin\theta}

    with the second term 0 where :math:`\sin\theta = 0` (as :func:`safe_sine`'s
    gradient), and 1 where the fallback (or, with
    ``easy_margin``, the plain cosine) applies.
    """
    margin = check_number_or_tensor(margin, check_signed_angle_margin, "margin")
    easy_margin = easy_margin if caller_checked() else check_bool(easy_margin, "easy_margin")
    cos_m, sin_m = _cos_sin(margin)
    given, cosine = cosine, angle_cosine(cosine)
    sine = ((1 - cosine) * (1 + cosine)).sqrt_()  # (both factors >= 0: cosine is clamped)
    value = cosine * cos_m - sine * sin_m
    ratio = torch.div(cosine, sine).masked_fill_(sine == 0, 0)  # (+-inf where sine is 0)
    if isinstance(sin_m, torch.Tensor):  # per row, or batched by vmap: not in place
        slope = ratio * sin_m + cos_m
    else:
        slope = ratio.mul_(sin_m).add_(cos_m)
    if easy_margin:
        above = cosine > 0
        return torch.where(above, value, cosine), _outside_slope(
            torch.where(above, slope, 1.0), given
        )
    above = _within_margin(cosine, margin)
    value = torch.where(above, value, cosine - margin * sin_m)
    return value, _outside_slope(torch.where(above, slope, 1.0), given)


def _cos_sin(margin: float | torch.Tensor) -> tuple[Any, Any]:
    """``cos m`` and ``sin m``: floats for a number, tensors (with their graph: a learnable
    or per-row margin) for a tensor."""
    if isinstance(margin, torch.Tensor):
        return torch.cos(margin), torch.sin(margin)
    return math.cos(margin), math.sin(margin)


def _within_margin(cosine: torch.Tensor, margin: float | torch.Tensor) -> torch.Tensor:
    r"""Where :math:`\theta + m \le \pi` (PML's rule), :math:`\theta` the angle of each
    cosine as given in its dtype: :math:`\cos\theta \ge \cos(\pi - m) = -\cos m`, the
    threshold taken up to the least value of the cosines' dtype at or above it (everywhere
    for :math:`m < 0`). Rounded to the nearest value instead, a threshold that rounds
    toward 0 equals a cosine whose angle is inside the margin's range and sent it to the
    fallback (float32, ``m = 0.5``: the cosine -0.87758255). Exact for a number ``m``; for
    a tensor (per row, learnable) from ``-cos m`` in float64, so exact for float32 and
    narrower cosines, and for float64 ones up to the last bits of that threshold."""
    if not isinstance(margin, torch.Tensor):
        return cosine >= _threshold_at_or_above(margin, cosine.dtype)
    if margin.device.type == "mps":  # (no float64 there)
        return cosine >= torch.where(margin < 0, -2.0, -torch.cos(margin.detach()))
    wide = margin.detach().to(torch.float64)
    threshold = torch.where(wide < 0, -2.0, -torch.cos(wide))
    if cosine.dtype == torch.float64:
        return cosine >= threshold
    rounded = threshold.to(cosine.dtype)
    up = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
    return cosine >= torch.where(rounded.to(torch.float64) < threshold, up, rounded)


@torch.compiler.assume_constant_result  # (torch.compile: a constant of the trace)
def _threshold_at_or_above(margin: float, dtype: torch.dtype) -> float:
    r"""The least value of ``dtype`` at or above :math:`-\cos m` (-2 for ``m < 0``)."""
    return _exact_threshold(margin, dtype)


@functools.lru_cache(maxsize=64)
def _exact_threshold(margin: float, dtype: torch.dtype) -> float:
    r"""The least value of ``dtype`` at or above :math:`-\cos m` (-2 for ``m < 0``), from
    mpmath's 40 digits (a dependency of torch's, through sympy)."""
    if margin < 0:
        return -2.0
    import mpmath

    with mpmath.workdps(40):
        exact = -mpmath.cos(mpmath.mpf(margin))
        rounded = torch.tensor(float(exact), dtype=torch.float64).to(dtype)
        if mpmath.mpf(rounded.item()) < exact:
            rounded = torch.nextafter(rounded, torch.tensor(math.inf, dtype=dtype))
    return rounded.item()


def cos_multiple_angle(cosine: torch.Tensor, multiplier: float) -> torch.Tensor:
    r""":math:`\cos(m\theta)` from :math:`\cos\theta`.

    For an integer :math:`m` this is the Chebyshev polynomial :math:`T_m(\cos\theta)`
    (recurrence :math:`T_{k+1} = 2xT_k - T_{k-1}`), exact and smooth everywhere.
    For a non-integer :math:`m` it uses :math:`\theta` of :func:`angle_of`: finite
    gradients, 0 only at :math:`\cos\theta = \pm1` exactly.
    ``multiplier``: a finite number with :math:`|m| \le 100` (the recurrence takes
    :math:`m` steps; ``ValueError`` otherwise). A one-element tensor ``multiplier`` with
    a whole-number value takes the recurrence too, and keeps its gradient
    :math:`\partial/\partial m = -\theta\sin(m\theta)` (reading it as a number cut
    it); any other tensor (per row, not a whole number, under ``vmap`` or
    ``torch.compile``, where its value is not read) goes through the angle, as a
    non-integer number does.
    """
    if not caller_checked():
        check_angle_multiple(multiplier)
    cosine = _floating(cosine)
    if isinstance(multiplier, torch.Tensor):
        return _cos_multiple_angle_of_tensor(cosine, multiplier)
    multiplier = abs(multiplier)  # cos is even: cos(-m theta) = cos(m theta)
    if float(multiplier).is_integer():
        m = int(multiplier)
        t_prev, t_curr = torch.ones_like(cosine), cosine
        if m == 0:
            return t_prev
        if m == 1:  # a new tensor, as for every other m (not the caller's)
            return cosine.clone()
        for _ in range(m - 1):
            t_prev, t_curr = t_curr, 2 * cosine * t_curr - t_prev
        return t_curr
    return torch.cos(multiplier * angle_of(cosine))


def _cos_multiple_angle_of_tensor(cosine: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """:func:`cos_multiple_angle` of a tensor ``multiplier`` (see there): the recurrence's
    value for one whole number, plus ``(m - m.detach())`` times the detached slope in
    ``m`` (0 in value, that slope in gradient); else through the angle."""
    whole = (
        multiplier.numel() == 1
        and not multiplier.is_complex()
        and not is_compiling()
        and not is_batched(multiplier)
        and float(multiplier.detach()).is_integer()
    )
    if not whole:
        return torch.cos(multiplier * angle_of(cosine))
    m = multiplier.reshape(())
    value = cos_multiple_angle(cosine, abs(int(float(m.detach()))))
    if not m.requires_grad:
        return value
    with torch.no_grad():
        theta = angle_of(cosine)
        slope = -theta * torch.sin(m.to(theta.dtype) * theta)
    return value + (m - m.detach()).to(value.dtype) * slope  # (slope: value's dtype)


def angle_of(cosine: torch.Tensor) -> torch.Tensor:
    r""":math:`\theta = \operatorname{atan2}(\sin\theta, \cos\theta)` of the cosine
    clamped to :math:`[-1, 1]`, with :func:`safe_sine`: its derivative
    :math:`-1/\sin\theta` is finite at every cosine but :math:`\pm1`, where it is 0.
    (An ``acos`` of the cosine clamped to :math:`[-1+\epsilon, 1-\epsilon]` gave the one
    cosine inside each end no slope and the angle of its neighbour: the combined margin's
    gradient 0 there, found by review.)"""
    cosine = angle_cosine(cosine)
    return torch.atan2(safe_sine(cosine), cosine)


def _floating(cosine: torch.Tensor) -> torch.Tensor:
    """Integer (or bool) cosines in the default float dtype, as their product with a float
    would be (the polynomials would otherwise stay integer); floating ones as they are."""
    return cosine if cosine.is_floating_point() else cosine.to(torch.get_default_dtype())


def _sin_multiple_angle(cosine: torch.Tensor, multiplier: float) -> torch.Tensor:
    r""":math:`\sin(m\theta)`; for integer :math:`m`, :math:`\sin\theta\,U_{m-1}(\cos\theta)`."""
    if float(multiplier).is_integer():
        m = int(multiplier)
        if m == 0:
            return torch.zeros_like(cosine)
        u_prev, u_curr = torch.ones_like(cosine), 2 * cosine  # U_0, U_1
        if m == 1:
            return safe_sine(cosine)
        for _ in range(m - 2):
            u_prev, u_curr = u_curr, 2 * cosine * u_curr - u_prev
        return safe_sine(cosine) * u_curr
    return torch.sin(multiplier * angle_of(cosine))


def _angle_region(cosine: torch.Tensor, multiplier: Any, offset: Any) -> torch.Tensor:
    r""":math:`k=\lfloor (m\theta + b)/\pi \rfloor`; piecewise constant, computed without grad
    (as :math:`\theta\,(m/\pi) + b/\pi`: a number ``m`` and ``b = 0`` take three ops), in
    at least float32 (half precision put ``k`` in the next region near its edges, where
    the slope of the target then came out negative), returned in ``cosine``'s dtype."""
    with torch.no_grad():
        wide = cosine.float() if cosine.dtype in (torch.float16, torch.bfloat16) else cosine
        turns = torch.acos(torch.clamp(wide, -1.0, 1.0)) * (multiplier / math.pi)
        if isinstance(offset, torch.Tensor) or offset != 0:
            turns = turns + offset / math.pi
        return torch.floor(turns).to(cosine.dtype)


def _monotone_extension(
    cos_multiple: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(-1)^k c - 2k` for the region :math:`k` (no graph) of ``cos_multiple`` =
    :math:`c`, rounded once as the paper's formula (``addcmul``), and the sign
    :math:`(-1)^k`."""
    sign = 1 - 2 * torch.remainder(k, 2)
    return torch.addcmul(-2 * k, sign, cos_multiple), sign


def sphereface_psi(cosine: torch.Tensor, margin: int) -> torch.Tensor:
    r"""SphereFace / A-Softmax (Liu et al., 2017): the monotone extension of :math:`\cos(m\theta)`.

    .. math::
        \psi(\theta) = (-1)^k \cos(m\theta) - 2k,
        \quad \theta \in \left[\tfrac{k\pi}{m}, \tfrac{(k+1)\pi}{m}\right],
        \; k \in \{0, \dots, m-1\}

    :math:`\cos(m\theta)` is the Chebyshev polynomial :math:`T_m(\cos\theta)`;
    ``margin`` must be an integer in ``[1, 100]`` (``ValueError`` otherwise).
    """
    margin = check_integer_margin(margin, "margin")
    k = _sphereface_region(cosine, margin)
    return _monotone_extension(cos_multiple_angle(cosine, margin), k)[0]


def _sphereface_region(cosine: torch.Tensor, margin: int) -> torch.Tensor:
    r"""SphereFace's region :math:`k = \lfloor m\theta/\pi \rfloor` (no graph), with
    :math:`\theta` the angle of the clamped cosine, as PML's ``LargeMarginSoftmaxLoss``: ``m``
    below -1 (a distance that is not the L2 cosine gives such values; PML's form there), and
    ``m - 1`` at -1 itself, the paper's last region, where both give the same value and the
    slope keeps the sign that makes :math:`\psi` increasing."""
    return _angle_region(cosine, float(margin), 0.0).clamp(max=margin - 1) + (cosine < -1)


def sphereface_value_and_slope(
    cosine: torch.Tensor, margin: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`sphereface_psi` and its derivative :math:`(-1)^k\, m\, U_{m-1}(\cos\theta)`,
    no graph (:math:`T_m' = m U_{m-1}`; both Chebyshev recurrences in one loop:
    :math:`T_{k+1} = 2xT_k - T_{k-1}`, :math:`U_{k} = 2xU_{k-1} - U_{k-2}`,
    :math:`U_{-1} = 0`, :math:`U_0 = 1`)."""
    m = check_integer_margin(margin, "margin")
    cosine = _floating(cosine)
    k = _sphereface_region(cosine, m)
    # T and U side by side, one recurrence (a step costs its op launches, not its B values)
    # (no host-made constant: on an accelerator its copy would synchronize the stream)
    ones = torch.ones_like(cosine)
    prev = torch.stack((ones, torch.zeros_like(cosine)))  # T_0, U_-1
    curr = torch.stack((cosine, ones))  # T_1, U_0
    two_x = 2 * cosine
    for _ in range(m - 1):  # next = 2 x curr - prev, rounded as cos_multiple_angle's
        prev, curr = curr, torch.mul(two_x, curr).sub_(prev)
    t_m, u_m1 = curr
    value, sign = _monotone_extension(t_m, k)
    return value, torch.mul(u_m1, sign).mul_(m)


def combined_margin_target(cosine: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    r"""Combined margin (ArcFace paper, Sec. 3.3): :math:`\cos(m_1\theta_y + m_2) - m_3`.

    Where :math:`m_1\theta + m_2` leaves :math:`[0, \pi]` the function is made
    monotone as the papers do, so that it reduces *exactly* to each special case:

    * :math:`m_1 = 1`: ArcFace's rule with margin :math:`m_2`
      (:func:`arcface_target`), minus :math:`m_3`. With :math:`m_2 = 0` this is
      CosFace :math:`\cos\theta - m_3`.
    * otherwise: the A-Softmax extension
      :math:`(-1)^k\cos(m_1\theta + m_2) - 2k - m_3` with
      :math:`k = \lfloor (m_1\theta + m_2)/\pi \rfloor`; with integer :math:`m_1`
      and :math:`m_2 = 0` this is SphereFace's :math:`\psi` (:func:`sphereface_psi`).

    ``m1`` in ``[1, 100]``, ``m2`` in radians with ``0 <= m2 < pi``, ``m3`` finite and
    ``>= 0`` (:class:`CombinedMarginLoss`'s bounds; ``ValueError`` otherwise, naming the
    argument). A tensor ``m1`` (learnable, per row,
    or under ``vmap``) always takes the general form, through the angle (``atan2``): its
    gradient is then that of :math:`m_1` at every value (the special cases above read
    ``m1`` as a number, which would cut it), and at :math:`m_1 = 1` beyond
    :math:`\theta + m_2 = \pi` it follows A-Softmax's extension rather than ArcFace's.
    """
    m1, m2, m3 = _combined_margins(m1, m2, m3)
    if isinstance(m1, torch.Tensor):
        return _combined_general(cosine, m1, m2, m3)
    no_m2 = not isinstance(m2, torch.Tensor) and m2 == 0
    if m1 == 1:
        return cosine - m3 if no_m2 else arcface_target(cosine, m2) - m3
    if no_m2 and float(m1).is_integer():
        return sphereface_psi(cosine, int(m1)) - m3
    return _combined_general(cosine, m1, m2, m3)


def _combined_general(cosine: torch.Tensor, m1: Any, m2: Any, m3: Any) -> torch.Tensor:
    r"""The A-Softmax extension :math:`(-1)^k\cos(m_1\theta + m_2) - 2k - m_3` (see
    :func:`combined_margin_target`); through the angle for a tensor ``m1``."""
    cos_m2, sin_m2 = _cos_sin(m2)
    if isinstance(m1, torch.Tensor):
        angle = m1 * angle_of(cosine)
        cos_m1, sin_m1 = torch.cos(angle), torch.sin(angle)
    else:
        cos_m1, sin_m1 = cos_multiple_angle(cosine, m1), _sin_multiple_angle(cosine, m1)
    cos_shifted = cos_m1 * cos_m2 - sin_m1 * sin_m2
    k = _angle_region(cosine, m1, m2)  # (no graph)
    sign = 1 - 2 * torch.remainder(k, 2)
    return sign * cos_shifted - 2 * k - m3


def combined_margin_value_and_slope(
    cosine: torch.Tensor, m1: float, m2: float, m3: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`combined_margin_target` and its derivative, no graph, where it reduces to
    ArcFace/CosFace (:math:`m_1 = 1`) or SphereFace (integer :math:`m_1`, :math:`m_2 = 0`):
    the same operations as those special cases.

    Raises:
        ValueError: for the general form (use autograd: :func:`combined_margin_target`).
    """
    m1, m2, m3 = _combined_margins(m1, m2, m3)
    if isinstance(m1, torch.Tensor):
        raise ValueError("no closed-form slope for a tensor m1 (use combined_margin_target)")
    # no graph here: a tensor m2 may be read (all zero: SphereFace's closed form), unless
    # vmap batches it (then ArcFace's form, which gives the same values at m2 = 0)
    no_m2 = m2 == 0
    if isinstance(m2, torch.Tensor):
        no_m2 = not in_function_transform() and bool((m2 == 0).all())
    if m1 == 1:
        if no_m2:
            return cosine - m3, torch.ones_like(cosine)
        value, slope = arcface_value_and_slope(cosine, m2)
    elif no_m2 and float(m1).is_integer():
        value, slope = sphereface_value_and_slope(cosine, int(m1))
    else:
        shown = "a tensor" if isinstance(m2, torch.Tensor) else repr(m2)  # (no .item())
        raise ValueError(f"no closed-form slope for m1={m1}, m2={shown}")
    return value - m3, slope


def _combined_margins(m1: float, m2: float, m3: float) -> tuple[float, float, float]:
    """The combined margin's ``(m1, m2, m3)``, checked as :class:`CombinedMarginLoss` does."""
    return (
        check_number_or_tensor(m1, check_multiplier, "m1"),
        check_number_or_tensor(m2, check_angle_margin, "m2"),
        check_number_or_tensor(m3, check_logit_offset, "m3"),
    )


class TargetWithSlope:
    r"""A target-logit function :math:`\psi` that also gives its derivative.

    ``psi(z, **kwargs)`` is the differentiable function (for autograd paths and
    users); ``value_and_slope(z, **kwargs)`` returns :math:`\psi(z)` and
    :math:`\psi'(z)` without a graph, in one pass: the fused cores then skip an
    autograd pass per step. ``kwargs`` must be constants (floats), not tensors with
    a graph (a margin that depends on the batch needs autograd: pass a plain function).
    """

    def __init__(
        self,
        psi: Callable[..., torch.Tensor],
        value_and_slope: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        **kwargs: Any,
    ) -> None:
        self.psi, self.value_and_slope_fn, self.kwargs = psi, value_and_slope, kwargs

    def __call__(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.psi(cosine, **self.kwargs)

    @property
    def has_graph(self) -> bool:
        """Whether a keyword argument requires grad (a learnable margin): the cores then
        differentiate :meth:`__call__` by autograd instead of using the slope, so that it
        gets its gradient."""
        return any(isinstance(v, torch.Tensor) and v.requires_grad for v in self.kwargs.values())

    def value_and_slope(self, cosine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(\psi, \psi')` at ``cosine``, element-wise, no graph."""
        return self.value_and_slope_fn(cosine, **self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        psi = getattr(self.psi, "__name__", None) or repr(self.psi)  # (a partial has none)
        return f"TargetWithSlope({psi}, {args})"
