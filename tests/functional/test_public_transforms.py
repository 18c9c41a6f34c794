"""The public fused functions under what their hand-written backwards cannot serve
(``torch.func`` transforms, forward-mode AD, ``autograd_only``): the same derivatives as
autograd on the materialized logits, or a clear error; never a silent zero (found by
review: ``jvp`` of the fused function was 0)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jvp, vmap

import pml_margins
from pml_margins.functional import (
    circle_loss_dense,
    fused_margin_softmax_cross_entropy,
    margin_softmax_cross_entropy,
)
from pml_margins.functional.circle import circle_loss_dense_negatives, circle_loss_masked
from pml_margins.functional.target_logits import (
    TargetWithSlope,
    arcface_target,
    arcface_value_and_slope,
)
from pml_margins.losses import ArcFaceLoss

F64 = torch.float64


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, dtype=F64)
    w = torch.randn(8, 30, generator=g, dtype=F64)
    return x, w, torch.randint(0, 30, (6,), generator=g), torch.randn(6, 8, generator=g, dtype=F64)


def _reference(x, w, y, psi=None, scale=30.0):
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=0)
    return margin_softmax_cross_entropy(cos, y, psi, scale).sum()


@pytest.mark.parametrize("materialize", [None, False])
def test_forward_mode_and_transforms_match_autograd(materialize) -> None:
    x, w, y, v = _inputs()

    def fused(x):
        return fused_margin_softmax_cross_entropy(x, w, y, None, 30.0, materialize=materialize)

    ours = jvp(lambda x: fused(x).sum(), (x,), (v,))[1]
    expected = jvp(lambda x: _reference(x, w, y), (x,), (v,))[1]
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(jacfwd(lambda x: fused(x).sum())(x), grad(_reference)(x, w, y))
    torch.testing.assert_close(grad(lambda x: fused(x).sum())(x), grad(_reference)(x, w, y))
    lanes = vmap(lambda x: fused(x).sum())(torch.stack([x, 2 * x]))
    torch.testing.assert_close(lanes, torch.stack([_reference(x, w, y), _reference(2 * x, w, y)]))


def test_forward_ad_duals_of_weight_and_scale_get_their_tangents() -> None:
    x, w, y, _ = _inputs()
    t, scale = torch.randn_like(w), torch.full((6,), 20.0, dtype=F64)
    with fwAD.dual_level():
        out = fused_margin_softmax_cross_entropy(x, fwAD.make_dual(w, t), y, None, 30.0)
        tangent = fwAD.unpack_dual(out.sum()).tangent
        scaled = fused_margin_softmax_cross_entropy(
            x, w, y, None, fwAD.make_dual(scale, torch.ones_like(scale))
        )
        scale_tangent = fwAD.unpack_dual(scaled.sum()).tangent
    expected = jvp(lambda w: _reference(x, w, y), (w,), (t,))[1]
    torch.testing.assert_close(tangent, expected)
    expected = jvp(
        lambda s: _reference(x, w, y, scale=s[:, None]), (scale,), (torch.ones(6, dtype=F64),)
    )
    torch.testing.assert_close(scale_tangent, expected[1])
    loss = ArcFaceLoss(30, 8).double()
    with fwAD.dual_level():
        out = functional_call(loss, {"W": fwAD.make_dual(w, t)}, (x, y))
        assert fwAD.unpack_dual(out).tangent is not None  # was None through the loss


def test_autograd_only_gives_the_fused_function_a_second_derivative() -> None:
    x, w, y, _ = _inputs()
    x = x.requires_grad_()
    with pml_margins.autograd_only():
        (g,) = torch.autograd.grad(
            fused_margin_softmax_cross_entropy(x, w, y, None, 10.0).sum(), x, create_graph=True
        )
    assert g.requires_grad
    with pml_margins.autograd_only(), pytest.raises(ValueError, match="chunk_size needs the"):
        fused_margin_softmax_cross_entropy(x, w, y, None, 10.0, chunk_size=4)


@pytest.mark.parametrize("materialize", [None, False])
def test_a_scale_from_the_cosines_is_checked_and_shaped_on_every_path(materialize) -> None:
    x, w, y, _ = _inputs()

    def run(scale):
        return fused_margin_softmax_cross_entropy(x, w, y, None, scale, materialize=materialize)

    with pytest.raises(ValueError, match="scale must be finite"):
        run(lambda blocks: float("nan"))
    with pytest.raises(ValueError, match="scale must be > 0"):
        run(lambda blocks: -5.0)
    expected = run(lambda blocks: 3.0)
    torch.testing.assert_close(run(lambda blocks: torch.tensor(3.0, dtype=F64)), expected)
    torch.testing.assert_close(run(lambda blocks: torch.full((6, 1), 3.0, dtype=F64)), expected)


def test_a_learnable_margin_in_a_target_with_slope_gets_its_gradient() -> None:
    x, w, y, _ = _inputs()
    margin = torch.tensor(0.5, dtype=F64, requires_grad=True)
    psi = TargetWithSlope(arcface_target, arcface_value_and_slope, margin=margin)
    (ours,) = torch.autograd.grad(
        fused_margin_softmax_cross_entropy(x, w, y, psi, 30.0).sum(), margin
    )
    (expected,) = torch.autograd.grad(_reference(x, w, y, psi), margin)
    torch.testing.assert_close(ours, expected)


def test_circle_loss_dense_under_transforms_is_the_masked_loss() -> None:
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(6, 6, generator=g, dtype=F64) * 2 - 1
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pos = (labels[:, None] == labels) & ~torch.eye(6, dtype=torch.bool)
    neg = labels[:, None] != labels

    def dense(s):
        return circle_loss_dense(s, pos, neg, 0.25, 80.0).sum()

    def masked(s):
        return circle_loss_masked(s, pos, neg, 0.25, 80.0).sum()

    torch.testing.assert_close(grad(dense)(sim), grad(masked)(sim))
    ones = torch.ones_like(sim)
    torch.testing.assert_close(jvp(dense, (sim,), (ones,))[1], jvp(masked, (sim,), (ones,))[1])
    with pytest.raises(ValueError, match="use circle_loss_masked"):
        grad(lambda s: circle_loss_dense_negatives(s, neg, torch.tensor([1]), 0.25, 80.0).sum())(
            sim
        )


def test_weight_of_another_dtype_is_named() -> None:
    """Integer weights were silently taken, complex ones failed inside clamp (review)."""
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    for w in (torch.ones(8, 5, dtype=torch.long), torch.randn(8, 5, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=r"weight must have dtype torch\.float16"):
            fused_margin_softmax_cross_entropy(x, w, y, None, 10.0)


@pytest.mark.parametrize("materialize", [None, True, False])
def test_a_margin_carrying_the_only_tangent_gets_it(materialize) -> None:
    """A tangent on what the target function closes over (a margin) reached the
    hand-written functions, which have no jvp: it came back None, meaning 0 (review)."""
    from functools import partial

    x, w, y, _ = _inputs()

    def losses(m):
        target = partial(arcface_target, margin=m)
        return fused_margin_softmax_cross_entropy(x, w, y, target, 8.0, materialize=materialize)

    m0, h = torch.tensor(0.3, dtype=F64), 1e-6
    finite_difference = (losses(m0 + h) - losses(m0 - h)) / (2 * h)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(losses(fwAD.make_dual(m0, torch.ones_like(m0)))).tangent
    torch.testing.assert_close(tangent, finite_difference, rtol=1e-6, atol=1e-8)
    with fwAD.dual_level(), pytest.raises(ValueError, match="chunk_size needs the fused"):
        fused_margin_softmax_cross_entropy(x, w, y, None, 8.0, chunk_size=4)


@pytest.mark.parametrize("sub_centers", [1, 2])
def test_vmap_over_a_margin_equals_a_loop(sub_centers) -> None:
    """Only the target depends on the margin: vmap batched it and not the logits, which
    the in-place scatter could not take (an internal vmap error; review)."""
    x, w, y, _ = _inputs()
    y = y % (w.shape[1] // sub_centers)
    margins = torch.tensor([0.1, 0.2, 0.3], dtype=F64)

    def losses(m):
        target = lambda c: arcface_target(c, m)  # noqa: E731
        return fused_margin_softmax_cross_entropy(x, w, y, target, 8.0, sub_centers=sub_centers)

    expected = torch.stack([losses(m) for m in margins])
    torch.testing.assert_close(vmap(losses)(margins), expected)
    slopes = vmap(lambda m: arcface_value_and_slope(x[:, 0].tanh(), m)[1])(margins)
    expected = [arcface_value_and_slope(x[:, 0].tanh(), float(m))[1] for m in margins]
    torch.testing.assert_close(slopes, torch.stack(expected))
