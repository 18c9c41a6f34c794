"""Properties of the margins (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_margins.functional import (
    arcface_target,
    combined_margin_target,
    cosface_target,
    sphereface_psi,
)
from pml_margins.losses import (
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    NormSoftmaxLoss,
    SphereFaceLoss,
)
from tests.losses.reference import reference_per_sample

cosines = st.floats(-1.0, 1.0, allow_nan=False)
margins = st.floats(0.0, 1.5, allow_nan=False)
seeds = st.integers(0, 2**16)


def _batch(seed: int, batch: int = 6, dim: int = 5, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x, y


@settings(max_examples=50, deadline=None)
@given(seed=seeds, scale=st.floats(1.0, 64.0))
def test_zero_margin_is_normalized_softmax(seed: int, scale: float) -> None:
    x, y = _batch(seed)
    nsl = NormSoftmaxLoss(4, 5, scale=scale).double()
    state = nsl.state_dict()
    for loss in (
        CosFaceLoss(4, 5, margin=0.0, scale=scale),
        ArcFaceLoss(4, 5, margin=0.0, scale=scale),
        CombinedMarginLoss(4, 5, 1.0, 0.0, 0.0, scale=scale),
        SphereFaceLoss(4, 5, margin=1, scale=scale, feature_norm=False),
    ):
        loss = loss.double()
        loss.load_state_dict(state)
        torch.testing.assert_close(loss(x, y), nsl(x, y), rtol=1e-12, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(c=cosines, m=margins, m_int=st.integers(1, 6), easy=st.booleans())
def test_target_logit_with_margin_never_exceeds_cosine(c, m, m_int, easy) -> None:
    t = torch.tensor([c], dtype=torch.float64)
    assert cosface_target(t, m) <= t
    assert arcface_target(t, m, easy_margin=easy) <= t + 1e-12
    assert sphereface_psi(t, m_int) <= t + 1e-12
    assert combined_margin_target(t, 1.0 + m, m / 2, m / 3) <= t + 1e-12


@settings(max_examples=50, deadline=None)
@given(seed=seeds, m_a=margins, m_b=margins)
def test_loss_non_decreasing_in_margin(seed: int, m_a: float, m_b: float) -> None:
    lo, hi = sorted((m_a, m_b))
    x, y = _batch(seed)
    for make in (
        lambda m: CosFaceLoss(4, 5, margin=m, scale=16.0),
        lambda m: ArcFaceLoss(4, 5, margin=m, scale=16.0),
        lambda m: CombinedMarginLoss(4, 5, m1=1.0, m2=m / 2, m3=m / 2, scale=16.0),
    ):
        a, b = make(lo).double(), make(hi).double()
        b.load_state_dict(a.state_dict())
        assert a(x, y) <= b(x, y) + 1e-12


@settings(max_examples=50, deadline=None)
@given(seed=seeds, m=st.floats(0.0, 1.2), m_int=st.integers(1, 5), scale=st.floats(1.0, 64.0))
def test_combined_margin_reduces_exactly_to_each_special_case(seed, m, m_int, scale) -> None:
    x, y = _batch(seed)
    x.requires_grad_(True)
    cases = [
        (CombinedMarginLoss(4, 5, 1.0, 0.0, m, scale=scale), CosFaceLoss(4, 5, m, scale=scale)),
        (CombinedMarginLoss(4, 5, 1.0, m, 0.0, scale=scale), ArcFaceLoss(4, 5, m, scale=scale)),
        (
            CombinedMarginLoss(4, 5, float(m_int), 0.0, 0.0, scale=scale),
            SphereFaceLoss(4, 5, m_int, scale=scale, feature_norm=False),
        ),
    ]
    for combined, special in cases:
        combined, special = combined.double(), special.double()
        special.load_state_dict(combined.state_dict())
        a, b = combined(x, y), special(x, y)
        assert torch.equal(a, b)
        assert torch.equal(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_sphereface_psi_is_continuous_and_decreasing_in_angle(m: int) -> None:
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    psi = sphereface_psi(torch.cos(theta), m)
    assert (psi[1:] <= psi[:-1] + 1e-12).all()
    assert (psi[1:] - psi[:-1]).abs().max() < 1e-2
    assert psi[-1].item() == pytest.approx(1 - 2 * m)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, m=st.floats(0.0, 1.2), m_int=st.integers(1, 5), scale=st.floats(1.0, 64.0))
def test_combined_margin_special_cases_equal_the_papers_formulas(seed, m, m_int, scale) -> None:
    """Each special case against the independent float64 reference of that paper."""
    x, y = _batch(seed)
    cases = [
        ((1.0, 0.0, m), "cosface", {"margin": m, "scale": scale}),
        ((1.0, m, 0.0), "arcface", {"margin": m, "scale": scale}),
        (
            (float(m_int), 0.0, 0.0),
            "sphereface",
            {"margin": m_int, "scale": scale, "feature_norm": False},
        ),
    ]
    for (m1, m2, m3), kind, hp in cases:
        loss = CombinedMarginLoss(4, 5, m1, m2, m3, scale=scale).double()
        xg = x.clone().requires_grad_(True)
        value = loss(xg, y)
        xr = x.clone().requires_grad_(True)
        ref = reference_per_sample(kind, xr, loss.W.detach(), y, **hp).mean()
        torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)
        grad, ref_grad = torch.autograd.grad(value, xg)[0], torch.autograd.grad(ref, xr)[0]
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-8)
