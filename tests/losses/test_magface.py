"""MagFace: the margin and regulariser of the norm, gradients through the norm, special cases."""

from __future__ import annotations

import math

import pytest
import torch

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.losses import ArcFaceLoss, MagFaceLoss
from pml_margins.losses.magface import magface_margin, magface_regularizer
from pml_margins.schedules import MarginScheduler

C, D, B = 11, 6, 16
SMALL = {"l_a": 1.0, "u_a": 6.0, "l_m": 0.3, "u_m": 1.2}


def test_margin_is_linear_in_the_clipped_norm() -> None:
    a = torch.tensor([5.0, 10.0, 60.0, 110.0, 500.0], dtype=torch.float64)
    m = magface_margin(a, 10.0, 110.0, 0.45, 0.8)
    expected = [0.45, 0.45, 0.45 + 0.35 * 50 / 100, 0.8, 0.8]
    torch.testing.assert_close(m, torch.tensor(expected, dtype=torch.float64))


def test_regulariser_is_least_at_the_upper_bound() -> None:
    a = torch.linspace(10.0, 110.0, 1001, dtype=torch.float64)
    g = magface_regularizer(a, 10.0, 110.0)
    assert int(g.argmin()) == len(a) - 1  # g'(a) = -1/a^2 + 1/u_a^2 < 0 below u_a
    assert float(g[-1]) == pytest.approx(2 / 110.0)


def test_constant_margin_without_regulariser_is_arcface() -> None:
    """l_m = u_m and lambda_g = 0: ArcFace with that margin (values and gradients)."""
    torch.manual_seed(0)
    mag = MagFaceLoss(C, D, scale=16.0, l_a=1.0, u_a=6.0, l_m=0.5, u_m=0.5, lambda_g=0.0)
    arc = ArcFaceLoss(C, D, margin=0.5, scale=16.0)
    mag, arc = mag.double(), arc.double()
    arc.load_state_dict(mag.state_dict())
    x = (2 * torch.randn(B, D, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, C, (B,))
    a, b = mag(x, y), arc(x, y)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for u, v in zip(
        torch.autograd.grad(a, (x, mag.W)), torch.autograd.grad(b, (x, arc.W)), strict=True
    ):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", [{}, {"chunk_size": 4}, {"sample_rate": 0.7}], ids=str)
def test_gradient_flows_through_the_norm_on_every_path(mode: dict) -> None:
    """ArcFace's x-gradient is orthogonal to x; MagFace's has a radial part in [l_a, u_a]."""
    torch.manual_seed(1)
    loss = MagFaceLoss(C, D, scale=16.0, lambda_g=0.0, **SMALL, **mode).double()
    x = torch.randn(B, D, dtype=torch.float64)
    x = (x / x.norm(dim=1, keepdim=True) * torch.linspace(0.55, 8.05, B).unsqueeze(1)).double()
    x.requires_grad_(True)
    torch.manual_seed(2)
    (grad,) = torch.autograd.grad(loss(x, torch.randint(0, C, (B,))), x)
    radial = (grad * x).sum(1) / x.norm(dim=1)
    inside = (x.norm(dim=1) > 1.0) & (x.norm(dim=1) < 6.0)
    assert (radial[inside].abs() > 1e-8).all()
    assert (radial[~inside].abs() < 1e-12).all()  # clipped: no gradient to the norm


def test_regulariser_pulls_norms_towards_the_upper_bound() -> None:
    loss = MagFaceLoss(C, D, scale=16.0, lambda_g=5.0, **SMALL).double()
    x = (3 * torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64))).requires_grad_()
    with_g = torch.autograd.grad(loss(x, torch.arange(B) % C), x)[0]
    loss.lambda_g = 0.0
    without = torch.autograd.grad(loss(x, torch.arange(B) % C), x)[0]
    # the regulariser's gradient is radial and negative (descent makes the norm larger)
    diff = with_g - without
    radial = (diff * x).sum(1) / x.norm(dim=1)
    expected = 5.0 * (-1 / 9 + 1 / 36) / B  # lambda_g * g'(3) / B (mean reducer)
    torch.testing.assert_close(radial, torch.full((B,), expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"l_a": 10.0, "u_a": 10.0}, "l_a must be < u_a"),
        ({"l_m": 0.8, "u_m": 0.45}, "u_m must be >= l_m"),
        ({"u_m": 45.0}, r"radians.*math\.radians"),
        ({"l_a": 0.0}, r"l_a must lie in \[1e-15, "),
        ({"lambda_g": -1.0}, "lambda_g must be >= 0"),
        ({"scale": -1.0}, "scale must be > 0"),
    ],
)
def test_bad_hyperparameters(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MagFaceLoss(C, D, **kwargs)


def test_target_logit_fn_alone_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="depend on the embeddings' norms"):
        MagFaceLoss(C, D).target_logit_fn()


def test_sharded_in_one_process_equals_the_loss() -> None:
    """Through prepare_step/extra_losses: margins and regulariser, values and gradients."""
    torch.manual_seed(3)
    kwargs = {"scale": 16.0, "lambda_g": 5.0, **SMALL}
    sharded = ShardedMarginSoftmaxLoss(MagFaceLoss, C, D, **kwargs).double()
    ref = MagFaceLoss(C, D, **kwargs).double()
    sharded.loss.load_state_dict(ref.state_dict())
    x = (3 * torch.randn(B, D, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, C, (B,))
    a, b = sharded(x, y), ref(x, y)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for u, v in zip(
        torch.autograd.grad(a, (x, sharded.W_local)),
        torch.autograd.grad(b, (x, ref.W)),
        strict=True,
    ):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_set_ranges_checks_and_keeps_the_old_values_on_error() -> None:
    loss = MagFaceLoss(C, D)
    loss.set_ranges(1.0, 20.0, 0.2, 0.6)
    assert (loss.l_a, loss.u_a, loss.l_m, loss.u_m) == (1.0, 20.0, 0.2, 0.6)
    with pytest.raises(ValueError, match="l_a must be < u_a"):
        loss.set_ranges(30.0, 20.0, 0.2, 0.6)
    assert (loss.l_a, loss.u_a) == (1.0, 20.0)
    assert math.isclose(loss.lambda_g, 35.0)


@pytest.mark.parametrize(
    "attr, value, match",
    [
        ("u_m", 5.0, "radians"),
        ("l_a", 200.0, "l_a must be < u_a"),
        ("u_a", 5.0, "l_a must be < u_a"),
        ("l_m", 1.0, "u_m must be >= l_m"),
        ("u_a", -1.0, r"u_a must lie in \[1e-15, "),
    ],
)
def test_each_range_bound_is_checked_with_the_others_when_set(attr, value, match):
    """A scheduler (or a user) setting one bound cannot leave the ranges invalid."""
    loss_fn = MagFaceLoss(5, 4)
    with pytest.raises(ValueError, match=match):
        setattr(loss_fn, attr, value)
    with pytest.raises(ValueError, match=match):
        MarginScheduler(loss_fn, value, value, total_steps=1, attr=attr).step()
    assert (loss_fn.l_a, loss_fn.u_a, loss_fn.l_m, loss_fn.u_m) == (10.0, 110.0, 0.45, 0.8)
    loss_fn.u_m = 0.7
    assert loss_fn.u_m == 0.7 and "u_m=0.7" in repr(loss_fn)
