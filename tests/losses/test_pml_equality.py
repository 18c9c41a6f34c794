"""Where PML has the same loss with the same definition, values and gradients match."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners

from pml_margins.losses import ArcFaceLoss, CosFaceLoss, NormSoftmaxLoss, SphereFaceLoss

PAIRS = [
    ("arcface", lambda: pml_losses.ArcFaceLoss(12, 16, margin=28.6, scale=64),
     lambda: ArcFaceLoss(12, 16, margin=math.radians(28.6), scale=64)),
    ("arcface_large", lambda: pml_losses.ArcFaceLoss(12, 16, margin=70.0, scale=30),
     lambda: ArcFaceLoss(12, 16, margin=math.radians(70.0), scale=30)),
    ("cosface", lambda: pml_losses.CosFaceLoss(12, 16, margin=0.35, scale=64),
     lambda: CosFaceLoss(12, 16, margin=0.35, scale=64)),
    ("nsl", lambda: pml_losses.NormalizedSoftmaxLoss(12, 16, temperature=0.05),
     lambda: NormSoftmaxLoss(12, 16, scale=20.0)),
    ("sphereface", lambda: pml_losses.SphereFaceLoss(12, 16, margin=4),
     lambda: SphereFaceLoss(12, 16, margin=4)),
    ("sphereface_m3", lambda: pml_losses.SphereFaceLoss(12, 16, margin=3),
     lambda: SphereFaceLoss(12, 16, margin=3)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "make_pml", "make_ours"), PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("use_miner", [False, True], ids=["labels", "miner"])
def test_equal_to_pml(name, make_pml, make_ours, dtype, use_miner) -> None:
    pml, ours = make_pml().to(dtype), make_ours().to(dtype)
    ours.load_state_dict(pml.state_dict())
    x = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    y = torch.arange(40) % 12
    tuples = miners.MultiSimilarityMiner(0.3)(x, y) if use_miner else None
    out_pml, out_ours = pml(x, y, tuples), ours(x, y, tuples)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out_ours, out_pml, **tol)
    for a, b in zip(
        torch.autograd.grad(out_ours, (x, ours.W)),
        torch.autograd.grad(out_pml, (x, pml.W)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize(("name", "make_pml", "make_ours"), PAIRS, ids=[p[0] for p in PAIRS])
def test_state_dicts_load_both_ways(name, make_pml, make_ours) -> None:
    pml, ours = make_pml(), make_ours()
    assert set(pml.state_dict()) == set(ours.state_dict()) == {"W"}
    ours.load_state_dict(pml.state_dict())
    assert torch.equal(ours.W, pml.W)
    trained = make_ours()
    pml.load_state_dict(trained.state_dict())
    assert torch.equal(pml.W, trained.W)
    assert ours.W.shape == (16, 12)


def test_pml_loses_fp32_master_weights_under_autocast_but_ours_keep_them() -> None:
    model = torch.nn.Linear(16, 16)
    pml = pml_losses.ArcFaceLoss(12, 16)
    ours = ArcFaceLoss(12, 16)
    ours.load_state_dict(pml.state_dict())
    w0 = pml.W.detach().clone()
    y = torch.arange(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pml(model(torch.randn(8, 16)), y)
        ours(model(torch.randn(8, 16)), y)
    assert pml.W.dtype == torch.bfloat16 and not torch.equal(pml.W.float(), w0)  # PML's defect
    assert ours.W.dtype == torch.float32 and torch.equal(ours.W, w0)
