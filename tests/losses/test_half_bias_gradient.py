"""A half-precision bias's gradient is rounded once (found by review: the target rows'
share reached the bias through the target logits and the other classes' share through
the fused function, each rounded to the bias's dtype before autograd added them; a bf16
``SoftmaxLoss`` bias gradient was up to 178 bf16 ulps from float64, where plain autograd
is within half an ulp)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pml_margins.losses import SoftmaxLoss

C, D, B = 10, 16, 64


def ulps_from_float64(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest distance of ``got`` from ``want``, in units in the last place of
    ``dtype`` at ``want``'s values."""
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    ulp = torch.exp2(torch.floor(torch.log2(want.abs())) - mantissa)
    return float(((got.double() - want) / ulp).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [{}, {"chunk_size": 3}], ids=["dense", "blocked"])
@pytest.mark.parametrize("seed", range(5))
def test_half_bias_gradient_within_one_ulp_of_float64(dtype, mode, seed) -> None:
    torch.manual_seed(seed)
    loss = SoftmaxLoss(C, D, **mode).to(dtype)
    with torch.no_grad():
        loss.bias.normal_(0, 0.1)
    x = torch.randn(B, D).to(dtype).requires_grad_()
    labels = torch.randint(0, C, (B,))
    loss(x, labels).backward()
    assert loss.bias.grad.dtype == dtype
    bias = loss.bias.detach().double().requires_grad_()
    logits = x.detach().double() @ loss.W.detach().double() + bias
    F.cross_entropy(logits, labels).backward()
    assert ulps_from_float64(loss.bias.grad, bias.grad, dtype) <= 1.0
