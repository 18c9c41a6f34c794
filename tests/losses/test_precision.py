"""Dtypes: W keeps its own dtype, autocast bf16/fp16 works, finite at cos = +-1."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import pml_margins
from pml_margins.losses import (
    ArcFaceLoss,
    CombinedMarginLoss,
    ElasticFaceLoss,
    SubCenterArcFaceLoss,
)
from tests.losses.reference import reference_per_sample
from tests.losses.specs import SPEC_IDS, SPECS, LossSpec

LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_autocast_keeps_fp32_weights_and_matches_reference(spec: LossSpec, dtype) -> None:
    torch.manual_seed(1)
    loss_fn = spec.build(20, 16)
    model = torch.nn.Linear(16, 16)
    inputs = torch.randn(12, 16)
    y = torch.randint(0, 20, (12,))
    w_before = loss_fn.W.detach().clone()
    with torch.autocast("cpu", dtype=dtype):
        emb = model(inputs)
        assert emb.dtype == dtype  # what a model under autocast hands the loss
        out = loss_fn(emb, y)
    assert out.dtype == torch.float32
    out.backward()
    assert loss_fn.W.dtype == torch.float32 and loss_fn.W.grad.dtype == torch.float32
    assert torch.equal(loss_fn.W.detach(), w_before)  # storage never re-assigned
    assert torch.isfinite(loss_fn.W.grad).all() and torch.isfinite(model.weight.grad).all()
    ref = spec.reference(loss_fn, emb.detach().double(), y).mean()
    # the product ran in low precision: cosines carry ~1e-2 relative error, times the scale
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=0.5)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_half_inputs_without_autocast_use_fp32_weights(spec: LossSpec) -> None:
    loss_fn = spec.build(10, 8)
    x = torch.randn(6, 8).half().requires_grad_(True)
    y = torch.randint(0, 10, (6,))
    out = loss_fn(x, y)
    out.backward()
    assert loss_fn.W.dtype == torch.float32 and x.grad.dtype == torch.float16
    ref = spec.reference(loss_fn, x.detach().double(), y).mean()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-3)


def _aligned_inputs(spec: LossSpec, dtype, sign: float):
    """Embeddings exactly equal to (or opposite) their class weight: cos = +-1."""
    loss_fn = spec.build(4, 6).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 1])
    # the class weight (sub-centre 0 of the class where there are several)
    x = (sign * loss_fn.W.detach().t()[y * spec.columns_per_class]).clone().requires_grad_(True)
    return loss_fn, x, y


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos=+1", "cos=-1"])
def test_finite_at_cosine_plus_minus_one(spec: LossSpec, dtype, sign: float) -> None:
    loss_fn, x, y = _aligned_inputs(spec, dtype, sign)
    out = loss_fn(x, y)
    gx, gw = torch.autograd.grad(out, (x, loss_fn.W))
    assert torch.isfinite(out) and torch.isfinite(gx).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos=+1", "cos=-1"])
def test_finite_at_cosine_plus_minus_one_under_autocast(spec: LossSpec, dtype, sign) -> None:
    loss_fn, x, y = _aligned_inputs(spec, torch.float32, sign)
    with torch.autocast("cpu", dtype=dtype):
        out = loss_fn(x.to(dtype), y)
    gx, gw = torch.autograd.grad(out, (x, loss_fn.W))
    assert torch.isfinite(out) and torch.isfinite(gx).all() and torch.isfinite(gw).all()


def test_pml_arcface_is_not_finite_at_cosine_one_but_ours_is() -> None:
    """Documents why we avoid acos: PML's ArcFace gradient there is NaN."""
    import math

    from pytorch_metric_learning.losses import ArcFaceLoss as PMLArcFace

    from pml_margins.losses import ArcFaceLoss

    pml = PMLArcFace(3, 4, margin=28.6).double()
    ours = ArcFaceLoss(3, 4, margin=math.radians(28.6)).double()
    ours.load_state_dict(pml.state_dict())
    x = pml.W.detach().t().clone().requires_grad_(True)
    y = torch.arange(3)
    g_pml = torch.autograd.grad(pml(x, y), x)[0]
    g_ours = torch.autograd.grad(ours(x, y), x)[0]
    assert not torch.isfinite(g_pml).all()
    assert torch.isfinite(g_ours).all()


def _symmetric_gradients(fn, x: torch.Tensor, w: torch.Tensor, step: float = 1e-5):
    """Mean autograd gradients of the float64 scalar ``fn(x + d, w)`` and ``fn(x - d, w)``.

    At cos = +-1 the reference's ``acos`` has an infinite slope, and where the target
    logit has a kink in the angle (ArcFace at theta = 0, a non-integer combined margin at
    theta = pi) the gradient there is direction-dependent; the mean of the gradients a
    small step to either side cancels the kink and keeps the smooth part, O(step^2).
    """
    d = torch.nn.functional.normalize(torch.randn(x.shape, dtype=x.dtype), dim=1) * step
    grads = []
    for moved in (x + d, x - d):
        xr, wr = moved.clone().requires_grad_(True), w.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(xr, wr), (xr, wr)))
    return [(a + b) / 2 for a, b in zip(*grads, strict=True)]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos=+1", "cos=-1"])
def test_values_and_gradients_at_cosine_plus_minus_one_match_the_reference(spec, sign) -> None:
    """At cos = +-1 (ArcFace's theta + m > pi fallback at -1) against the paper's formula.

    The reference's ``acos`` has no gradient there, so its gradients are the symmetric
    mean beside the point (:func:`_symmetric_gradients`): the zero-kink gradient, which is
    also ours (d cos / d x vanishes at alignment, whatever the slope of the margin).
    """
    loss_fn, x, y = _aligned_inputs(spec, torch.float64, sign)
    bias = getattr(loss_fn, "bias", None)
    bias = None if bias is None else bias.detach()

    def reference(x_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return reference_per_sample(spec.kind, x_, w_, y, bias=bias, **spec.hp_for(loss_fn)).mean()

    out = loss_fn(x, y)
    gx, gw = torch.autograd.grad(out, (x, loss_fn.W))
    w = loss_fn.W.detach()
    # the angle is ill-conditioned at cos = +-1: one ulp of the cosine moves theta by ~1.5e-8,
    # and the two computations round the cosine differently (scale * sin m * 1.5e-8 < 1e-6)
    torch.testing.assert_close(out, reference(x.detach(), w), rtol=1e-8, atol=1e-6)
    torch.manual_seed(0)
    ref_gx, ref_gw = _symmetric_gradients(reference, x.detach(), w)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-4)


NEAR_ALIGNMENT_LOSSES = {
    "arcface": lambda: ArcFaceLoss(5, 4, margin=0.5, scale=2.0),
    "arcface_blocked": lambda: ArcFaceLoss(5, 4, margin=0.5, scale=2.0, chunk_size=2),
    "combined_1_m_0": lambda: CombinedMarginLoss(5, 4, 1.0, 0.5, 0.0, scale=2.0),
    "elasticface_sigma0": lambda: ElasticFaceLoss(5, 4, margin=0.5, sigma=0.0, scale=2.0),
    "subcenter_k1": lambda: SubCenterArcFaceLoss(5, 4, 0.5, 2.0, 1),
}


@pytest.mark.parametrize("theta", [1e-7, 5e-7, 9e-7, 3e-6])
@pytest.mark.parametrize(
    ("name", "autograd"),
    [(name, False) for name in sorted(NEAR_ALIGNMENT_LOSSES)]
    + [(name, True) for name in sorted(NEAR_ALIGNMENT_LOSSES) if name != "arcface_blocked"],
)
def test_gradient_within_a_micro_radian_of_the_class_keeps_the_margin_term(
    name, theta, autograd
) -> None:
    """cos(theta + m)'s slope in the cosine, cos m + sin m cos / sin, grows as the angle
    closes, and d cos / dx shrinks as sin theta: their product stays finite (norm
    ~ sin m / |x|). A fixed cut-off (sine <= 1e-6 got no slope) dropped it: the row's
    gradient 143% off in float64 (found by review). Reference: the paper's formula with
    theta from atan2 of the geometry (well conditioned where acos is not)."""
    torch.manual_seed(0)
    loss_fn = NEAR_ALIGNMENT_LOSSES[name]().double()
    w = loss_fn.W.detach()
    w0 = w[:, 0] / w[:, 0].norm()
    u = torch.randn(4, dtype=torch.float64)
    u = u - (u @ w0) * w0
    u = u / u.norm()
    x = (3.0 * (math.cos(theta) * w0 + math.sin(theta) * u))[None]
    labels = torch.tensor([0])

    def reference(x_: torch.Tensor) -> torch.Tensor:
        unit_x = x_ / x_.norm(dim=1, keepdim=True)
        unit_w = w / w.norm(dim=0, keepdim=True)
        cosines = unit_x @ unit_w
        along = unit_x[0] @ unit_w[:, 0]
        angle = torch.atan2(torch.linalg.vector_norm(unit_x[0] - along * unit_w[:, 0]), along)
        logits = torch.cat([torch.cos(angle + 0.5).reshape(1, 1), cosines[:, 1:]], dim=1)
        return torch.nn.functional.cross_entropy(2.0 * logits, labels)

    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(leaf), leaf)
    leaf = x.clone().requires_grad_(True)
    with pml_margins.autograd_only() if autograd else contextlib.nullcontext():
        (got,) = torch.autograd.grad(loss_fn(leaf, labels), leaf)
    assert float((got - expected).norm() / expected.norm()) < 2e-2
