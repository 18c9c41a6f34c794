"""Gradients of gradients: the hand-written backwards refuse them, ``autograd_only`` gives them.

A gradient penalty ``|dL/dx|^2`` differentiated again (``create_graph=True``) must be
either exact or a clear error: never a second derivative that silently leaves out the
fast path's part (SphereFace's penalty gradient was off by 0.59 of 0.69 before).
"""

from __future__ import annotations

import math
import threading
from functools import partial

import pytest
import pytorch_metric_learning.losses as pml
import torch

import pml_margins
from pml_margins.functional import arcface_target, fused_margin_softmax_cross_entropy
from pml_margins.losses import ArcFaceLoss, CircleLoss, CosFaceLoss
from tests.losses.specs import SPECS

SPEC_IDS = [s.id for s in SPECS]


def _inputs(num_classes=5, dim=6, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x, y


def _penalty(loss_fn, x, y, seed=None):
    """``|dL/dx|^2`` with its graph, and the leaf ``x``."""
    x = x.clone().requires_grad_()
    if seed is not None:  # ElasticFace draws its margins: the same draw every call
        torch.manual_seed(seed)
    (grad,) = torch.autograd.grad(loss_fn(x, y), x, create_graph=True)
    return grad.square().sum(), x


def _penalty_gradient(loss_fn, x, y, seed=None):
    penalty, leaf = _penalty(loss_fn, x, y, seed)
    return torch.autograd.grad(penalty, leaf)[0]


def _finite_difference(loss_fn, x, y, seed=None, eps=1e-6):
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=x.dtype)
        step[i] = eps
        step = step.view_as(x)
        hi = _penalty(loss_fn, x + step, y, seed)[0].detach()
        lo = _penalty(loss_fn, x - step, y, seed)[0].detach()
        out.view(-1)[i] = (hi - lo) / (2 * eps)
    return out


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_a_second_derivative_is_exact_or_refused(spec):
    """The hand-written paths refuse; those autograd differentiates (Sub-center's and
    CurricularFace's materialized logits at this size) give autograd_only's result."""
    x, y = _inputs()
    torch.manual_seed(0)
    loss_fn = spec.build(5, 6).double().eval()
    with pml_margins.autograd_only():
        expected = _penalty_gradient(loss_fn, x, y, seed=0)
    try:
        got = _penalty_gradient(loss_fn, x, y, seed=0)
    except RuntimeError as error:
        assert "autograd_only()" in str(error)
        return
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("materialize", [True, False])  # the dense and the blocked function
def test_the_fused_functions_refuse_a_second_derivative(materialize):
    x, y = _inputs()
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    leaf = x.clone().requires_grad_()
    losses = fused_margin_softmax_cross_entropy(
        leaf, w, y, partial(arcface_target, margin=0.5), 16.0, materialize=materialize
    )
    what = "dense" if materialize else "fused"
    with pytest.raises(RuntimeError, match=f"the {what} margin softmax .*autograd_only"):
        torch.autograd.grad(losses.mean(), leaf, create_graph=True)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_autograd_only_gives_the_fast_paths_values_and_gradients(spec):
    x, y = _inputs()
    values, grads = [], []
    for enabled in (False, True):
        torch.manual_seed(0)  # the same initial W (and ElasticFace draw)
        loss_fn = spec.build(5, 6).double()
        leaf = x.clone().requires_grad_()
        with pml_margins.autograd_only(enabled):
            value = loss_fn(leaf, y)
        value.backward()
        values.append(value.detach())
        grads.append((leaf.grad, loss_fn.W.grad))
    torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=1e-12)
    for fast, plain in zip(*grads, strict=True):
        torch.testing.assert_close(plain, fast, rtol=1e-9, atol=1e-10)


#: AdaFace's margin reads the norms detached (as the paper's code): its gradient is not
#: the derivative of its value, so finite differences of the penalty do not apply
SMOOTH_SPECS = [s for s in SPECS if s.kind != "adaface"]


@pytest.mark.parametrize("spec", SMOOTH_SPECS, ids=[s.id for s in SMOOTH_SPECS])
def test_autograd_only_penalty_gradient_equals_finite_differences(spec):
    """In eval mode (no buffer moves between the calls), float64."""
    loss_fn = spec.build(5, 6).double().eval()
    x, y = _inputs()
    with pml_margins.autograd_only():
        analytic = _penalty_gradient(loss_fn, x, y, seed=0)
        numeric = _finite_difference(loss_fn, x, y, seed=0)
    scale = numeric.abs().max().item()
    assert math.isfinite(scale) and scale > 0
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-5 * scale)


PML_PAIRS = {
    "arcface": (
        lambda: ArcFaceLoss(5, 6, margin=0.5, scale=16.0),
        lambda: pml.ArcFaceLoss(5, 6, margin=math.degrees(0.5), scale=16.0),
    ),
    "cosface": (lambda: CosFaceLoss(5, 6), lambda: pml.CosFaceLoss(5, 6)),
}


@pytest.mark.parametrize("name", sorted(PML_PAIRS))
def test_autograd_only_penalty_gradient_equals_pmls(name):
    ours_fn, pml_fn = (make().double() for make in PML_PAIRS[name])
    pml_fn.W.data.copy_(ours_fn.W.data)
    x, y = _inputs()
    with pml_margins.autograd_only():
        ours = _penalty_gradient(ours_fn, x, y)
    torch.testing.assert_close(ours, _penalty_gradient(pml_fn, x, y), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch", [8, 40])  # the dense and the dense-negatives paths
def test_circle_refuses_then_equals_pmls_penalty_gradient(batch):
    x, y = _inputs(num_classes=3, batch=batch)
    ours_fn, pml_fn = CircleLoss(m=0.4, gamma=80.0), pml.CircleLoss(m=0.4, gamma=80.0)
    with pytest.raises(RuntimeError, match="Circle loss"):
        _penalty(ours_fn, x, y)
    with pml_margins.autograd_only():
        ours = _penalty_gradient(ours_fn, x, y)
    expected = _penalty_gradient(pml_fn, x, y)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("mode", [{"chunk_size": 2}, {"sample_rate": 0.5}])
def test_autograd_only_refuses_the_fused_core_modes(mode):
    loss_fn = ArcFaceLoss(5, 6, **mode)
    x, y = _inputs()
    with pml_margins.autograd_only(), pytest.raises(ValueError, match="autograd_only"):
        loss_fn(x.float(), y)


def test_autograd_only_is_per_thread_restored_and_checked():
    assert not pml_margins.autograd_only_enabled()
    seen = []
    with pml_margins.autograd_only():
        assert pml_margins.autograd_only_enabled()
        thread = threading.Thread(target=lambda: seen.append(pml_margins.autograd_only_enabled()))
        thread.start()
        thread.join()
        with pml_margins.autograd_only(False):
            assert not pml_margins.autograd_only_enabled()
        assert pml_margins.autograd_only_enabled()
    assert seen == [False] and not pml_margins.autograd_only_enabled()
    with pytest.raises(TypeError, match="bool"):
        pml_margins.autograd_only("yes")


def test_first_order_gradients_without_create_graph_are_unchanged():
    loss_fn = ArcFaceLoss(5, 6).double()
    x, y = _inputs()
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(leaf, y), leaf)
    with pml_margins.autograd_only():
        leaf2 = x.clone().requires_grad_()
        (plain,) = torch.autograd.grad(loss_fn(leaf2, y), leaf2)
    torch.testing.assert_close(grad, plain, rtol=1e-10, atol=1e-12)


def test_the_sharded_loss_refuses_a_second_derivative_and_says_why():
    from pml_margins.distributed import ShardedMarginSoftmaxLoss

    loss_fn = ShardedMarginSoftmaxLoss(ArcFaceLoss, 5, 6).double()  # one process
    x, y = _inputs()
    for enabled in (False, True):
        with (
            pml_margins.autograd_only(enabled),
            pytest.raises(RuntimeError, match="sharded losses have no autograd-only path"),
        ):
            _penalty(loss_fn, x, y)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("chunk_size", [None, 2], ids=["default", "blocked"])
def test_batched_gradients_are_refused_by_name_or_exact(spec, chunk_size) -> None:
    """A vectorized Jacobian (``is_grads_batched=True`` under the hood) runs the
    hand-written backwards under vmap: it either equals the Jacobian row by row, or fails
    with an error naming the function and ``autograd_only`` (vmap's own error named an
    in-place op), under which it is exact (found by review)."""
    x, y = _inputs()
    try:
        loss_fn = spec.build(5, 6, chunk_size=chunk_size)
    except (TypeError, ValueError):
        pytest.skip("no chunk_size for this loss")
    loss_fn = loss_fn.double()

    def loss_of(x):
        torch.manual_seed(0)  # (ElasticFace's draw: the same each call)
        return loss_fn(x, y)

    loss_fn.eval()  # (running statistics stay put between the calls)
    rows = torch.autograd.functional.jacobian(loss_of, x)
    try:
        vectorized = torch.autograd.functional.jacobian(loss_of, x, vectorize=True)
    except RuntimeError as error:
        assert "cannot take batched gradients" in str(error)
        assert "autograd_only" in str(error) or "one process" in str(error)
        loss_fn.chunk_size = None
        with pml_margins.autograd_only():
            vectorized = torch.autograd.functional.jacobian(loss_of, x, vectorize=True)
    torch.testing.assert_close(vectorized, rows)
