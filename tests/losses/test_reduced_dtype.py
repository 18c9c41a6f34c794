"""A regularizer or a reducer does not change the loss's dtype: float32 for half
embeddings, float64 where W is float64 (PML's MultipleReducers and zero losses take the
embeddings' dtype: a bf16 ArcFace loss 61.0 for 61.03, an fp16 SphereFace loss inf)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.reducers import ThresholdReducer
from pytorch_metric_learning.regularizers import LpRegularizer, RegularFaceRegularizer

from pml_margins.losses import (
    ArcFaceLoss,
    CenterLoss,
    CircleLoss,
    CosFaceLoss,
    NormSoftmaxLoss,
    SoftmaxLoss,
    SphereFaceLoss,
)

C, D = 5, 8
LOSSES = {
    "arcface": lambda **k: ArcFaceLoss(C, D, **k),
    "cosface": lambda **k: CosFaceLoss(C, D, **k),
    "sphereface": lambda **k: SphereFaceLoss(C, D, **k),
    "softmax": lambda **k: SoftmaxLoss(C, D, **k),
    "nsl_dot": lambda **k: NormSoftmaxLoss(
        C, D, distance=DotProductSimilarity(normalize_embeddings=False), **k
    ),
    "center": lambda **k: CenterLoss(C, D, **k),
    "circle": lambda **k: CircleLoss(m=0.25, gamma=32, **k),
}
WITH_W = {"arcface", "cosface", "sphereface", "softmax", "nsl_dot"}
REGULARIZERS = {
    "embedding": {"embedding_regularizer": LpRegularizer(), "embedding_reg_weight": 0.0},
    "weight": {"weight_regularizer": RegularFaceRegularizer(), "weight_reg_weight": 0.0},
}


def _pair(name: str, regularizer: str, w_dtype: torch.dtype):
    kwargs = REGULARIZERS[regularizer]
    torch.manual_seed(0)
    plain = LOSSES[name]()
    torch.manual_seed(0)
    regularized = LOSSES[name](**kwargs)
    return plain.to(w_dtype), regularized.to(w_dtype)


@pytest.mark.parametrize("regularizer", sorted(REGULARIZERS))
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
    ],
    ids=str,
)
def test_a_regularizer_keeps_the_loss_dtype_and_value(name, regularizer, x_dtype, w_dtype):
    if regularizer == "weight" and name not in WITH_W:
        pytest.skip("no class weights to regularize")
    plain, regularized = _pair(name, regularizer, w_dtype)
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    y = torch.arange(12) % C
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = plain(xa, y), regularized(xb, y)
    assert b.dtype == a.dtype
    held = x_dtype if name == "circle" else w_dtype  # (Circle holds no W nor centres)
    assert a.dtype == torch.promote_types(torch.float32, torch.promote_types(x_dtype, held))
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)  # (weight 0: the same value)
    a.backward()
    b.backward()
    assert xb.grad.dtype == x_dtype
    torch.testing.assert_close(xb.grad, xa.grad)


def test_half_embeddings_near_fp16s_range_give_a_finite_loss_with_a_regularizer():
    """SphereFace's logits scale with the feature norm: in fp16 the gathered sub-loss
    overflowed to inf with no error (the float32 loss is finite)."""
    x = (torch.randn(12, D, generator=torch.Generator().manual_seed(0)) * 2e4).clamp(-6e4, 6e4)
    y = torch.arange(12) % C
    kwargs = {"embedding_regularizer": LpRegularizer(), "embedding_reg_weight": 1e-12}
    torch.manual_seed(0)
    loss = SphereFaceLoss(C, D, **kwargs)(x.half().requires_grad_(), y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["arcface", "circle"])
def test_a_zero_loss_from_the_reducer_has_the_loss_dtype(name):
    """A reducer that keeps nothing returns PML's zero loss, in the loss's dtype."""
    x = torch.randn(8, D, dtype=torch.bfloat16, requires_grad=True)
    loss = LOSSES[name](reducer=ThresholdReducer(low=1e9))(x, torch.arange(8) % C)
    assert loss.dtype == torch.float32 and loss.item() == 0
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
