"""Dtypes: W keeps its own dtype, autocast bf16/fp16 works, finite at cos = +-1."""

from __future__ import annotations

import pytest
import torch

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
    x = (sign * loss_fn.W.detach().t()[y]).clone().requires_grad_(True)
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
