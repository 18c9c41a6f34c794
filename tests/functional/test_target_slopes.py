"""Closed-form (value, slope) of the target-logit functions against autograd."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from pml_margins.functional import (
    arcface_target,
    arcface_value_and_slope,
    combined_margin_target,
    cosface_target,
    cosface_value_and_slope,
    sphereface_psi,
    sphereface_value_and_slope,
)
from pml_margins.functional.target_logits import (
    combined_margin_value_and_slope,
    cos_multiple_angle,
)
from pml_margins.losses import (
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    ElasticFaceLoss,
    SphereFaceLoss,
)
from pml_margins.losses.sphereface import annealed_psi, annealed_psi_value_and_slope


def cosines(dtype=torch.float64):
    """A grid over [-1, 1] plus the edges: +-1, 0, the ArcFace fallback threshold, and
    points within 1e-13 of +-1 (sines of ~4.5e-7: finite slopes, large ones)."""
    edges = [1.0, -1.0, 0.0, math.cos(math.pi - 0.5), 1 - 1e-13, -1 + 1e-13, 0.5, -0.5]
    return torch.cat([torch.linspace(-1, 1, 4001, dtype=dtype), torch.tensor(edges, dtype=dtype)])


CASES = {
    "cosface": (lambda c: cosface_target(c, 0.35), lambda c: cosface_value_and_slope(c, 0.35)),
    "arcface": (lambda c: arcface_target(c, 0.5), lambda c: arcface_value_and_slope(c, 0.5)),
    "arcface_easy": (
        lambda c: arcface_target(c, 0.5, True),
        lambda c: arcface_value_and_slope(c, 0.5, True),
    ),
    "arcface_wide": (lambda c: arcface_target(c, 2.5), lambda c: arcface_value_and_slope(c, 2.5)),
    "arcface_zero": (lambda c: arcface_target(c, 0.0), lambda c: arcface_value_and_slope(c, 0.0)),
    **{
        f"sphereface{m}": (
            partial(sphereface_psi, margin=m),
            partial(sphereface_value_and_slope, margin=m),
        )
        for m in (1, 2, 3, 4, 5)
    },
    "annealed": (
        lambda c: annealed_psi(c, 4, 0.7),
        lambda c: annealed_psi_value_and_slope(c, 4, 0.7),
    ),
    "combined_arc_cos": (
        lambda c: combined_margin_target(c, 1.0, 0.3, 0.2),
        lambda c: combined_margin_value_and_slope(c, 1.0, 0.3, 0.2),
    ),
    "combined_sphere": (
        lambda c: combined_margin_target(c, 3.0, 0.0, 0.1),
        lambda c: combined_margin_value_and_slope(c, 3.0, 0.0, 0.1),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_slope_equal_the_function_and_its_autograd_derivative(name, dtype):
    psi, value_and_slope = CASES[name]
    c = cosines(dtype)
    leaf = c.clone().requires_grad_()
    (expected_slope,) = torch.autograd.grad(psi(leaf).sum(), leaf)
    value, slope = value_and_slope(c)
    assert value.dtype == slope.dtype == dtype and not value.requires_grad
    torch.testing.assert_close(value, psi(c), rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(slope, expected_slope, rtol=tol, atol=tol)
    assert torch.isfinite(slope).all()


def test_combined_margin_general_form_has_no_closed_form_slope():
    with pytest.raises(ValueError, match="no closed-form slope"):
        combined_margin_value_and_slope(torch.zeros(3), 1.5, 0.2, 0.0)
    # the loss then keeps the autograd path
    assert not hasattr(
        CombinedMarginLoss(5, 4, m1=1.5, m2=0.2).target_logit_fn(), "value_and_slope"
    )


@pytest.mark.parametrize(
    "loss",
    [
        ArcFaceLoss(5, 4),
        CosFaceLoss(5, 4),
        SphereFaceLoss(5, 4),
        CombinedMarginLoss(5, 4, m1=1.0, m2=0.3, m3=0.2),
        ElasticFaceLoss(5, 4, sigma=0.0),
    ],
    ids=type,
)
def test_fixed_margin_losses_give_closed_form_slopes(loss):
    fn = loss.target_logit_fn()
    c = cosines()
    value, _ = fn.value_and_slope(c)
    torch.testing.assert_close(value, fn(c), rtol=0, atol=0)


def test_a_tensor_m1_keeps_its_gradient_at_whole_values_and_may_be_per_row() -> None:
    """The special cases read m1 as a number: a learnable m1 lost its gradient at exactly
    1.0 and 2.0, and a per-row m1 hit an ambiguous-truth-value error (review)."""
    import math

    from pml_margins.functional import combined_margin_target

    c = torch.linspace(-0.9, 0.9, 7, dtype=torch.float64)
    for value in (1.5, 2.0, 3.0):
        m1 = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        out = combined_margin_target(c, m1, 0.2, 0.1)
        torch.testing.assert_close(out, combined_margin_target(c, value, 0.2, 0.1))
        (grad,) = torch.autograd.grad(out.sum(), m1)
        h = 1e-6
        fd = (
            combined_margin_target(c, value + h, 0.2, 0.1).sum()
            - combined_margin_target(c, value - h, 0.2, 0.1).sum()
        ) / (2 * h)
        torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)
    # reference from the formula: (-1)^k cos(m1 theta + m2) - 2k - m3, per row
    m1 = torch.linspace(1.0, 3.0, 7, dtype=torch.float64)
    theta = torch.acos(c)
    k = torch.floor((m1 * theta + 0.2) / math.pi)
    expected = (-1) ** k * torch.cos(m1 * theta + 0.2) - 2 * k - 0.1
    torch.testing.assert_close(combined_margin_target(c, m1, 0.2, 0.1), expected)
    with pytest.raises(ValueError, match="no closed-form slope for a tensor m1"):
        combined_margin_value_and_slope(c, torch.tensor(2.0), 0.0, 0.0)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (3, 2), (2, 2, 4)], ids=str)
@pytest.mark.parametrize("margin", [1, 2, 4])
def test_sphereface_value_and_slope_take_any_shape(shape, margin):
    """Element-wise at every shape (the recurrence stacks T and U on a new leading axis)."""
    c = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    value, slope = sphereface_value_and_slope(c, margin)
    flat_value, flat_slope = sphereface_value_and_slope(c.reshape(-1), margin)
    assert value.shape == slope.shape == c.shape
    assert torch.equal(value.reshape(-1), flat_value) and torch.equal(slope.reshape(-1), flat_slope)
    assert torch.equal(value, sphereface_psi(c, margin))
    batched = torch.func.vmap(lambda row: sphereface_value_and_slope(row, margin))(c.reshape(1, -1))
    assert torch.equal(batched[0][0], flat_value) and torch.equal(batched[1][0], flat_slope)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("margin", [2, 3, 4, 7])
def test_sphereface_psi_rounds_once_as_the_papers_formula(dtype, margin):
    """``(-1)^k cos(m theta) - 2k`` with one rounding (as PML's ``sign * cos - 2k``): the
    sign times the Chebyshev value is exact, so only the subtraction rounds."""
    c = cosines(dtype)
    with torch.no_grad():
        k = torch.floor(torch.acos(c.clamp(-1, 1)) * (margin / math.pi)).clamp(max=margin - 1)
    expected = (1 - 2 * torch.remainder(k, 2)) * cos_multiple_angle(c, margin) - 2 * k
    assert torch.equal(sphereface_psi(c, margin), expected)
    assert torch.equal(sphereface_value_and_slope(c, margin)[0], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("margin", [3, 4, 7])
def test_sphereface_slope_never_negative_in_half_precision(dtype, margin):
    """psi increases with the cosine: at every half-precision cosine the slope is >= 0 (the
    region is found in float32; in half it slipped into the next region near its edges)."""
    c = torch.linspace(-1, 1, 40001, dtype=torch.float64).to(dtype).unique()
    value, slope = sphereface_value_and_slope(c, margin)
    assert value.dtype == slope.dtype == dtype
    assert (slope >= 0).all()
    assert torch.equal(value, sphereface_psi(c, margin))
    _, combined_slope = combined_margin_value_and_slope(c, float(margin), 0.0, 0.0)
    assert (combined_slope >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("tensor_m1", [False, True], ids=["number-m1", "tensor-m1"])
@pytest.mark.parametrize("end", [1.0, -1.0], ids=["cos->1", "cos->-1"])
def test_combined_margin_general_form_next_to_plus_minus_one(dtype, tensor_m1, end) -> None:
    """cos(m1 theta + m2) with a non-integer (or tensor) m1 at the cosines one and two ulps
    inside +-1: value and slope of the A-Softmax extension, theta from atan2 in float64.
    An acos of the cosine clamped to [-1 + eps, 1 - eps] gave the innermost one (1 - eps/2
    near 1, -1 + eps/2 near -1) the angle of its neighbour and no slope at all (found by
    review: |dL/dx| 0 for 0.443)."""
    eps = torch.finfo(dtype).eps
    inside = [end * (1 - eps / 2), end * (1 - eps)] if end > 0 else [-1 + eps / 2, -1 + eps]
    c = torch.tensor(inside, dtype=dtype, requires_grad=True)
    m1 = torch.tensor(1.5, dtype=dtype) if tensor_m1 else 1.5
    value = combined_margin_target(c, m1, 0.3, 0.0)
    (slope,) = torch.autograd.grad(value.sum(), c)
    wide = c.detach().double().requires_grad_(True)
    angle = torch.atan2(((1 - wide) * (1 + wide)).sqrt(), wide)
    k = torch.floor((1.5 * angle + 0.3) / math.pi).detach()
    expected = (1 - 2 * (k % 2)) * torch.cos(1.5 * angle + 0.3) - 2 * k
    (expected_slope,) = torch.autograd.grad(expected.sum(), wide)
    rounding = 64 * eps
    torch.testing.assert_close(value.double(), expected.detach(), rtol=rounding, atol=rounding)
    # the slope times d cos/dx's norm, sin(theta): what reaches an embedding of norm 1
    sine = ((1 - wide) * (1 + wide)).sqrt().detach()
    torch.testing.assert_close(slope.double() * sine, expected_slope * sine, rtol=1e-4, atol=0)
