"""AdaFace: the margin of the normalized norm, the running statistics, special cases."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from pml_margins.losses import AdaFaceLoss, ArcFaceLoss, CosFaceLoss
from pml_margins.losses.adaface import adaface_target, adaface_update_statistics
from tests.losses.reference import reference_per_sample
from tests.losses.specs import ADAFACE_PAPER

C, D, B = 11, 6, 16


def _batch(seed: int = 0, low: float = 0.5, high: float = 8.0):
    """Rows with norms spread over [low, high] (so the margins differ per row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64))
    x = x * torch.linspace(low, high, B, dtype=torch.float64).unsqueeze(1)
    return x.requires_grad_(True), torch.randint(0, C, (B,), generator=g)


def _hand_statistics(x: torch.Tensor, mean: float, std: float, t_alpha: float):
    """Eq. 8 by hand: the clipped norms' mean and unbiased (N - 1) deviation, then the EMA."""
    norms = [min(max(float(n), 0.001), 100.0) for n in x.detach().norm(dim=1)]
    return (
        t_alpha * statistics.mean(norms) + (1 - t_alpha) * mean,
        t_alpha * statistics.stdev(norms) + (1 - t_alpha) * std,
    )


@pytest.mark.parametrize("t_alpha", [0.01, 0.5, 1.0])
def test_running_statistics_follow_the_ema_by_hand(t_alpha: float) -> None:
    loss = AdaFaceLoss(C, D, t_alpha=t_alpha).double()
    mean, std = 20.0, 100.0
    for step in range(3):
        x, y = _batch(step, high=8.0 + 100 * step)  # step 2: norms above 100 are clipped
        mean, std = _hand_statistics(x, mean, std, t_alpha)
        loss(x, y)
        assert float(loss.batch_mean) == pytest.approx(mean, rel=1e-12)
        assert float(loss.batch_std) == pytest.approx(std, rel=1e-12)


def test_step_uses_the_updated_statistics() -> None:
    """The step's normalized norms come from the statistics after this batch's update."""
    torch.manual_seed(0)
    loss = AdaFaceLoss(C, D, h=1.0, t_alpha=1.0, scale=16.0).double()
    x, y = _batch()
    out = loss(x, y)
    mean, std = _hand_statistics(x, 20.0, 100.0, 1.0)
    hp = {**ADAFACE_PAPER, "h": 1.0, "scale": 16.0, "batch_mean": mean, "batch_std": std}
    ref = reference_per_sample("adaface", x, loss.W, y, **hp).mean()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, (x, loss.W)), torch.autograd.grad(ref, (x, loss.W))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_statistics_move_only_in_training_and_not_for_one_row() -> None:
    loss = AdaFaceLoss(C, D)
    x, y = _batch()
    loss.eval()
    loss(x.float(), y)
    assert (float(loss.batch_mean), float(loss.batch_std)) == (20.0, 100.0)
    loss.train()
    loss(x[:1].float(), y[:1])  # one row: its unbiased spread is undefined
    assert (float(loss.batch_mean), float(loss.batch_std)) == (20.0, 100.0)
    loss(x.float(), y)
    assert float(loss.batch_mean) != 20.0 and float(loss.batch_std) != 100.0
    mean, std = adaface_update_statistics(torch.ones(1), loss.batch_mean, loss.batch_std, 0.5)
    assert torch.equal(mean, loss.batch_mean) and torch.equal(std, loss.batch_std)


@pytest.mark.parametrize("case", ["h0", "norms_at_mean"])
def test_zero_normalized_norm_is_cosface(case: str) -> None:
    """z = 0 (h = 0, or every norm at the running mean): cos(theta) - m, CosFace's logit."""
    torch.manual_seed(1)
    h = 0.0 if case == "h0" else 0.333
    ada = AdaFaceLoss(C, D, margin=0.4, h=h, scale=32.0).double().eval()
    cos = CosFaceLoss(C, D, margin=0.4, scale=32.0).double()
    cos.load_state_dict(ada.state_dict(), strict=False)
    x, y = _batch()
    if case == "norms_at_mean":
        x = torch.nn.functional.normalize(x.detach()) * 20.0  # the initial batch_mean
        x.requires_grad_(True)
    a, b = ada(x, y), cos(x, y)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for u, v in zip(
        torch.autograd.grad(a, (x, ada.W)), torch.autograd.grad(b, (x, cos.W)), strict=True
    ):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_target_at_the_ends_of_the_normalized_norm() -> None:
    """z = -1: ArcFace's cos(theta + m); z = 0: cos(theta) - m; z = 1: cos(theta - m) - 2m."""
    m = 0.4
    theta = torch.linspace(0.5, 2.5, 41, dtype=torch.float64)  # away from the clips
    c = torch.cos(theta)
    for z, expected in (
        (-1.0, torch.cos(theta + m)),
        (0.0, c - m),
        (1.0, torch.cos(theta - m) - 2 * m),
    ):
        got = adaface_target(c, torch.full_like(c, z), m, 1e-3)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # every norm far below the running mean (z = -1): ArcFace's loss on such inputs
    torch.manual_seed(2)
    ada = AdaFaceLoss(C, D, margin=m, h=1.0, scale=16.0).double().eval()
    ada.batch_std.fill_(1.0)  # (0.5 - 20) / (1 + eps) < -1
    arc = ArcFaceLoss(C, D, margin=m, scale=16.0).double()
    arc.load_state_dict(ada.state_dict(), strict=False)
    y = torch.arange(5)
    x = ada.W.detach().t()[y] + 0.3 * torch.randn(5, D, dtype=torch.float64)
    x = 0.5 * torch.nn.functional.normalize(x)  # target angles well inside (eps, pi - m)
    torch.testing.assert_close(ada(x, y), arc(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", [{"chunk_size": 3}, {"sample_rate": 0.7}], ids=str)
def test_no_gradient_through_the_norm_on_every_path(mode: dict) -> None:
    """The norm is a detached quality proxy: the x-gradient has no radial part."""
    torch.manual_seed(3)
    loss = AdaFaceLoss(C, D, h=1.0, t_alpha=1.0, scale=16.0, **mode).double()
    x, y = _batch()
    torch.manual_seed(4)
    (grad,) = torch.autograd.grad(loss(x, y), x)
    radial = (grad * x).sum(1) / x.norm(dim=1)
    assert radial.abs().max() < 1e-12
    assert grad.abs().max() > 1e-3


def test_fused_modes_give_the_default_step() -> None:
    torch.manual_seed(5)
    base = AdaFaceLoss(C, D, h=1.0, scale=16.0).double()
    chunked = AdaFaceLoss(C, D, h=1.0, scale=16.0, chunk_size=4).double()
    chunked.load_state_dict(base.state_dict())
    x, y = _batch()
    torch.testing.assert_close(base(x, y), chunked(x, y), rtol=1e-12, atol=1e-12)
    assert torch.equal(base.batch_mean, chunked.batch_mean)
    assert torch.equal(base.batch_std, chunked.batch_std)


def test_buffers_are_in_the_state_dict_and_round_trip() -> None:
    a = AdaFaceLoss(C, D)
    x, y = _batch()
    a(x.float(), y)
    assert set(a.state_dict()) == {"W", "batch_mean", "batch_std"}
    b = AdaFaceLoss(C, D)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v)
    a.eval(), b.eval()
    assert torch.equal(a(x.float(), y), b(x.float(), y))
    text = repr(a)
    assert "h=0.333" in text and "t_alpha=0.01" in text and "batch_mean=" in text


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"margin": -0.1}, ValueError, "margin must be >= 0"),
        ({"margin": 23.0}, ValueError, r"radians.*math\.radians"),
        ({"h": -1.0}, ValueError, r"h must lie in \[0\.0, 3\.4"),
        ({"scale": 0.0}, ValueError, "scale must be > 0"),
        ({"t_alpha": 1.5}, ValueError, r"t_alpha must lie in \[0.0, 1.0\]"),
        ({"t_alpha": "fast"}, TypeError, "t_alpha must be a real number"),
        ({"eps": 0.0}, ValueError, r"eps must lie in \(0.0, 1.0\)"),
        ({"eps": math.nan}, ValueError, "eps must be finite"),
    ],
)
def test_bad_hyperparameters(kwargs, error, message: str) -> None:
    with pytest.raises(error, match=message):
        AdaFaceLoss(C, D, **kwargs)
    loss = AdaFaceLoss(C, D)
    name, value = next(iter(kwargs.items()))
    with pytest.raises(error, match=message):  # a scheduler's assignment is checked too
        setattr(loss, name, value)


def test_target_logit_fn_alone_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="depend on the embeddings' norms"):
        AdaFaceLoss(C, D).target_logit_fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-3, 2e-8, 1e-12, 1e-300])
@pytest.mark.parametrize("mode", [{}, {"chunk_size": 2}])
def test_an_eps_below_the_dtypes_roundoff_still_clips_below_one(dtype, eps, mode) -> None:
    """``1 - eps`` rounding to 1 (float32: eps < 2^-25) left the clip holding nothing:
    an embedding along its class weight (cos = 1) gave NaN gradients, silently."""
    torch.manual_seed(0)
    loss = AdaFaceLoss(num_classes=4, embedding_size=8, eps=eps, **mode).to(dtype)
    x = (loss.W.detach().t()[:3] * 30).clone().requires_grad_()  # each row on its class
    value = loss(x, torch.tensor([0, 1, 2]))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss.W.grad).all()


def test_the_clip_of_a_tiny_eps_is_the_largest_value_below_one() -> None:
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    cosine = torch.tensor([1.0, -1.0, 0.5], requires_grad=True)
    scaler = torch.zeros(3)
    tiny = adaface_target(cosine, scaler, 0.4, 1e-20)
    at_bound = adaface_target(torch.tensor([below_one, -below_one, 0.5]), scaler, 0.4, 1e-20)
    assert torch.equal(tiny, at_bound)
    tiny.sum().backward()
    assert torch.equal(cosine.grad[:2], torch.zeros(2))  # clipped: zero slope, not NaN
