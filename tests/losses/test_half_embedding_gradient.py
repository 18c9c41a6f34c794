"""Half embeddings' gradient is rounded once, for every class-weight loss (found in
review: MagFace's gradient reached the embeddings by two paths, the margin softmax and
the norm's (its margin and regulariser), each rounded to bf16/fp16 before autograd added
them: 8-18 ulps from float64, where one rounding is within half an ulp)."""

from __future__ import annotations

import pytest
import torch

from tests.losses.reference import half_ulps
from tests.losses.specs import SPECS

C, D, B = 12, 8, 48


@pytest.mark.parametrize("w_dtype", ["half", torch.float32], ids=["W_half", "W_float32"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [{}, {"chunk_size": 5}], ids=["default", "blocked"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_half_embeddings_gradient_within_one_ulp_of_float64(spec, mode, x_dtype, w_dtype):
    """Against the paper's formula in float64 (the loss's own parameters, rounded, and the
    statistics and margins its step used)."""
    torch.manual_seed(0)
    loss = spec.build(C, D, **mode).to(x_dtype if w_dtype == "half" else w_dtype)
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(B, D, generator=g)).to(x_dtype)  # norms ~8: MagFace's small range
    y = torch.randint(0, C, (B,), generator=g)
    x.requires_grad_(True)
    loss(x, y).backward()
    assert x.grad.dtype == x_dtype
    exact = x.detach().double().requires_grad_(True)
    spec.reference(loss, exact, y).mean().backward()
    assert half_ulps(x.grad, exact.grad) <= 1.0
