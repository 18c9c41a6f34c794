"""Regressions found by the session-16 reviews (each test fails on the code before)."""

from __future__ import annotations

import math

import pytest
import torch

from pml_margins.functional import arcface_target, arcface_value_and_slope
from pml_margins.losses import ArcFaceLoss


def _inside_margin(value: float, margin: float) -> bool:
    """theta + m <= pi for the exact number ``value`` (mpmath, 50 digits)."""
    import mpmath

    with mpmath.workdps(50):
        return bool(mpmath.acos(mpmath.mpf(value)) + mpmath.mpf(margin) <= mpmath.pi)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_arcface_branch_at_the_threshold_follows_the_angle(dtype, margin, as_tensor):
    # the cosines of the dtype around cos(pi - m): the one nearest it rounds toward 0 for
    # m = 0.5 in float32 and float16, and its angle is inside the margin's range
    nearest = torch.tensor(-math.cos(margin), dtype=torch.float64).to(dtype)
    values = [nearest]
    for _ in range(3):
        values.insert(0, torch.nextafter(values[0], torch.tensor(-2.0, dtype=dtype)))
        values.append(torch.nextafter(values[-1], torch.tensor(2.0, dtype=dtype)))
    cosine = torch.stack(values)
    if as_tensor and dtype == torch.float64:
        # a tensor margin's threshold is -cos m in float64, not exact to its last bits
        # (documented): steps of 1e-12 there
        cosine = nearest + 1e-12 * torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], dtype=dtype)
    cosine = cosine[cosine.abs() <= 1]  # (bfloat16 steps past -1 near m = 0.1)
    wide = cosine.to(torch.float64)
    inside = torch.tensor([_inside_margin(v, margin) for v in wide.tolist()])
    assert inside.any() and not inside.all()
    theta = torch.acos(wide)  # (the branch's values: far apart at these cosines)
    expected = torch.where(inside, torch.cos(theta + margin), wide - margin * math.sin(margin))
    margin_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = torch.full(cosine.shape, margin, dtype=margin_dtype) if as_tensor else margin
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
    for got in (arcface_target(cosine, m), arcface_value_and_slope(cosine, m)[0]):
        assert torch.allclose(got.to(torch.float64), expected, atol=tol), (got, expected)


def test_arcface_loss_at_the_rounded_threshold_equals_pml():
    from pytorch_metric_learning.losses import ArcFaceLoss as PMLArcFaceLoss

    cosine = torch.tensor(math.cos(math.pi - 0.5), dtype=torch.float32)  # -0.87758255
    x = torch.stack([cosine, torch.sqrt(1 - cosine * cosine)]).reshape(1, 2)
    labels = torch.tensor([0])
    ours = ArcFaceLoss(2, 2, margin=0.5, scale=64.0)
    theirs = PMLArcFaceLoss(2, 2, margin=math.degrees(0.5), scale=64.0)
    ours.W.data = torch.eye(2)
    theirs.W.data = torch.eye(2)
    assert ours(x, labels).item() == pytest.approx(theirs(x, labels).item(), rel=1e-5)
    with torch.no_grad():  # and the loss's fused and dense paths agree
        assert ours(x, labels).item() == pytest.approx(94.68324, rel=1e-5)


def test_the_exact_threshold_is_a_constant_under_torch_compile():
    torch._dynamo.reset()
    compiled = torch.compile(lambda c: arcface_target(c, 0.5), fullgraph=True)
    cosine = torch.tensor([math.cos(math.pi - 0.5), 0.3], dtype=torch.float32)
    assert torch.equal(compiled(cosine), arcface_target(cosine, 0.5))
    assert compiled(cosine)[0].item() == pytest.approx(-1.0, abs=1e-6)
