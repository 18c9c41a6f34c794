"""A half-precision per-row scale's gradient is rounded once (found by review, as the
bias's was: the target logit's share reached the scale through autograd and the other
classes' share through the fused function, each rounded to the scale's dtype before
autograd added them; with confident rows, whose two shares nearly cancel, a bf16 scale's
gradient was 30 bf16 ulps from float64 on the dense path and 87 on the blocked one with a
non-target function, where plain autograd is within 4.3)."""

from __future__ import annotations

import pytest
import torch

from pml_margins.functional import arcface_target, fused_margin_softmax_cross_entropy

C, D, B = 30, 8, 64
MODES = {
    "dense": {},
    "blocked": {"chunk_size": 7},
    "blocked-phi": {"chunk_size": 7, "non_target_logit_fn": lambda z: 1.1 * z},
    "dense-bias": {"bias": "bias"},
    "blocked-bias": {"chunk_size": 7, "bias": "bias"},
}


def scale_gradient(scale: torch.Tensor, mode: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(D, C)
    labels = torch.randint(0, C, (B,))
    x = 3 * w[:, labels].t() + 0.3 * torch.randn(B, D)  # confident rows: P_iy near 1
    kwargs = dict(mode)
    if kwargs.get("bias") == "bias":
        kwargs["bias"] = torch.randn(C).mul_(0.1).requires_grad_()
    scale = scale.detach().requires_grad_()
    losses = fused_margin_softmax_cross_entropy(
        x, w, labels, lambda z: arcface_target(z, 0.5), scale, **kwargs
    )
    losses.sum().backward()
    assert scale.grad.dtype == scale.dtype
    return scale.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("seed", range(3))
def test_half_scale_gradient_is_the_float32_one_rounded_once(dtype, mode, seed) -> None:
    """The same values as a float32 scale tensor give, rounded once to ``dtype``: the
    logits and every share of the gradient are formed in float32 either way."""
    scale = (torch.rand(B, generator=torch.Generator().manual_seed(seed)) * 20 + 10).to(dtype)
    half = scale_gradient(scale, mode, seed)
    full = scale_gradient(scale.float(), mode, seed)
    torch.testing.assert_close(half, full.to(dtype), rtol=0, atol=0)
