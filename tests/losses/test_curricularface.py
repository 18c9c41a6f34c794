"""CurricularFace: every path against the paper's formula, t's moving average, special cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import SumReducer

import pml_margins.functional.fused_margin_softmax as fused
from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.functional import sample_classes
from pml_margins.losses import ArcFaceLoss, CurricularFaceLoss
from tests.losses.reference import (
    arcface_cos,
    miner_weights,
    normalized_cosine,
    reference_per_sample,
    target_softmax_cross_entropy,
)

C, D, B = 17, 8, 24
F64 = torch.float64


class _Cosine(CosineSimilarity):
    """A distance subclass: the loss then runs on the plain (materialized, autograd) path."""


#: single-process paths; "blocked" forces the blocked function where "default" materializes
PATHS = {
    "default": {},
    "blocked": {},
    "chunk5": {"chunk_size": 5},
    "auto": {"chunk_size": "auto"},
    "partial_fc": {"sample_rate": 0.6},
    "plain": {"distance": _Cosine()},
}


def _data(seed: int = 0, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=dtype), torch.randint(0, C, (B,), generator=g)


def _grads(value: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(value, (x, w))


@pytest.mark.parametrize("margin", [0.5, 2.5], ids=["m0.5", "beyond_pi"])
@pytest.mark.parametrize("path", list(PATHS))
def test_values_and_gradients_match_the_paper_on_every_path(path, margin, monkeypatch) -> None:
    if path == "blocked":
        monkeypatch.setattr(fused, "MATERIALIZE_MAX_ELEMENTS", 0)
    torch.manual_seed(0)
    loss = CurricularFaceLoss(C, D, margin=margin, scale=16.0, momentum=0.3, **PATHS[path])
    loss = loss.double()
    loss.t.fill_(0.2)  # a t far from 0: hard negatives are cos (t + cos)
    x, y = _data(1)
    x.requires_grad_(True)
    torch.manual_seed(5)
    out = loss(x, y)
    t = float(loss.t)
    cos_y = normalized_cosine(x, loss.W)[torch.arange(B), y].detach()
    assert t == pytest.approx(0.3 * float(cos_y.mean()) + 0.7 * 0.2, abs=1e-15)  # before use
    w, y_used = loss.W, y
    if path == "partial_fc":  # the columns the step sampled (same seed)
        torch.manual_seed(5)
        index, y_used = sample_classes(y, C, 0.6)
        w = loss.W[:, index]
    ref = reference_per_sample("curricular", x, w, y_used, margin=margin, scale=16.0, t=t)
    ref = ref.mean()
    if margin > 1:  # the fallback and the hard negatives of rows beyond pi are exercised
        theta = torch.acos(cos_y)
        assert (theta + margin > math.pi).any()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(_grads(out, x, loss.W), _grads(ref, x, loss.W), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_no_hard_negative_is_arcface() -> None:
    """Every non-target cosine below cos(theta_y + m): exactly ArcFace (any t)."""
    torch.manual_seed(0)
    curricular = CurricularFaceLoss(6, 8, margin=0.5, scale=32.0).double()
    q, _ = torch.linalg.qr(torch.randn(8, 6, dtype=F64))
    curricular.W.data.copy_(q)  # orthonormal class weights
    curricular.t.fill_(0.7)
    arc = ArcFaceLoss(6, 8, margin=0.5, scale=32.0).double()
    arc.load_state_dict(curricular.state_dict(), strict=False)
    y = torch.arange(12) % 6
    x = (q.t()[y] + 0.05 * torch.randn(12, 8, dtype=F64)).requires_grad_(True)
    cos = normalized_cosine(x, q).detach()
    bound = torch.cos(torch.acos(cos[torch.arange(12), y]) + 0.5)
    others = cos.scatter(1, y[:, None], -2.0)
    assert (others < bound[:, None]).all()
    a, b = curricular(x, y), arc(x, y)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for u, v in zip(_grads(a, x, curricular.W), _grads(b, x, arc.W), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_t_zero_makes_hard_negatives_squared_cosines() -> None:
    """A fresh loss in eval mode (t = 0): each hard negative's logit is s cos_j^2."""
    torch.manual_seed(2)
    loss = CurricularFaceLoss(C, D, margin=0.5, scale=16.0).double().eval()
    x, y = _data(3)
    out = loss(x, y)
    cos = normalized_cosine(x, loss.W)
    cos_y = cos[torch.arange(B), y]
    hard = cos > (cos_y * math.cos(0.5) - (1 - cos_y**2).sqrt() * math.sin(0.5))[:, None]
    hard[torch.arange(B), y] = False
    assert hard.any() and (~hard).any()
    logits = 16.0 * torch.where(hard, cos * cos, cos)
    want = target_softmax_cross_entropy(logits, y, 16.0 * arcface_cos(cos_y, 0.5)).mean()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert float(loss.t) == 0.0


def test_t_is_the_moving_average_in_training_only() -> None:
    torch.manual_seed(0)
    loss = CurricularFaceLoss(C, D).double()
    expected = 0.0
    for step in range(3):
        x, y = _data(10 + step)
        loss(x, y)
        cos_y = normalized_cosine(x, loss.W.detach())[torch.arange(B), y]
        expected = 0.01 * float(cos_y.mean()) + 0.99 * expected
        assert float(loss.t) == pytest.approx(expected, rel=1e-14, abs=1e-16)
    loss.eval()
    loss(*_data(20))
    assert float(loss.t) == pytest.approx(expected, rel=1e-14, abs=1e-16)
    assert set(loss.state_dict()) == {"W", "t"} and loss.t.shape == ()
    assert loss.t.grad is None and not loss.t.requires_grad


def test_state_dict_round_trip_with_t() -> None:
    torch.manual_seed(0)
    trained = CurricularFaceLoss(C, D, momentum=0.5).double()
    for step in range(2):
        trained(*_data(step))
    restored = CurricularFaceLoss(C, D, momentum=0.5).double()
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.t, trained.t) and float(restored.t) != 0.0
    x, y = _data(9)
    torch.testing.assert_close(restored.eval()(x, y), trained.eval()(x, y), rtol=0, atol=0)
    assert f"t={float(trained.t):.4g}" in repr(restored)


def test_miner_weights_and_reducer_while_t_counts_every_sample() -> None:
    torch.manual_seed(0)
    loss = CurricularFaceLoss(C, D, scale=16.0, momentum=1.0, reducer=SumReducer()).double()
    x, y = _data(4)
    y = y % 5  # repeated classes, so the miner finds triplets
    x.requires_grad_(True)
    mined = BatchHardMiner()(x, y)
    out = loss(x, y, mined)
    cos_y = normalized_cosine(x, loss.W)[torch.arange(B), y].detach()
    assert float(loss.t) == pytest.approx(float(cos_y.mean()), abs=1e-15)  # momentum 1
    per_sample = reference_per_sample(
        "curricular", x, loss.W, y, margin=0.5, scale=16.0, t=float(loss.t)
    )
    want = (per_sample * miner_weights(mined, B)).sum()
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for got, ref in zip(_grads(out, x, loss.W), _grads(want, x, loss.W), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs", [{}, {"chunk_size": 4}], ids=["blocked", "chunk4"])
def test_gradcheck(kwargs, monkeypatch) -> None:
    monkeypatch.setattr(fused, "MATERIALIZE_MAX_ELEMENTS", 0)
    torch.manual_seed(0)
    loss = CurricularFaceLoss(7, 5, margin=0.4, scale=4.0, **kwargs).double().eval()
    loss.t.fill_(0.3)
    x = torch.randn(6, 5, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 4])
    assert torch.autograd.gradcheck(lambda a, w: _with_weight(loss, w)(a, y), (x, loss.W))


def _with_weight(loss: CurricularFaceLoss, w: torch.Tensor):
    """``loss`` with ``w`` as its class weights (gradcheck perturbs its own copy)."""
    return lambda a, y: torch.func.functional_call(loss, {"W": w, "t": loss.t}, (a, y))


def test_float32_close_to_the_reference() -> None:
    torch.manual_seed(0)
    loss = CurricularFaceLoss(C, D, momentum=0.5)
    x, y = _data(6, torch.float32)
    out = loss(x, y)
    ref = reference_per_sample(
        "curricular", x.double(), loss.W.detach(), y, margin=0.5, scale=64.0, t=float(loss.t)
    )
    torch.testing.assert_close(out.double(), ref.mean(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"margin": -0.1}, ValueError, "margin must be >= 0"),
        ({"margin": 28.6}, ValueError, r"radians.*math\.radians"),
        ({"scale": 0.0}, ValueError, "scale must be > 0"),
        ({"momentum": 1.5}, ValueError, r"momentum must lie in \[0.0, 1.0\]"),
        ({"momentum": -0.01}, ValueError, "momentum must lie in"),
        ({"momentum": math.nan}, ValueError, "momentum must be finite"),
        ({"momentum": "fast"}, TypeError, "momentum must be a real number"),
    ],
)
def test_bad_hyperparameters(kwargs, error, message: str) -> None:
    with pytest.raises(error, match=message):
        CurricularFaceLoss(C, D, **kwargs)


def test_assignments_are_checked_and_momentum_zero_freezes_t() -> None:
    loss = CurricularFaceLoss(C, D, momentum=0.0)
    with pytest.raises(ValueError, match="momentum must lie in"):
        loss.momentum = 2.0
    loss(*_data(0, torch.float32))
    assert float(loss.t) == 0.0 and loss.momentum == 0.0


def test_non_target_fn_alone_is_a_clear_error_and_one_shard_is_the_loss() -> None:
    """Sharded on one rank: the same t updates and values (2-3 ranks: tests/distributed)."""
    with pytest.raises(RuntimeError, match="depend on each row's target cosine"):
        CurricularFaceLoss(C, D).non_target_logit_fn()
    torch.manual_seed(0)
    ref = CurricularFaceLoss(C, D, scale=16.0, momentum=0.5).double()
    sharded = ShardedMarginSoftmaxLoss(CurricularFaceLoss, C, D, scale=16.0, momentum=0.5)
    sharded = sharded.double()
    sharded.loss.load_state_dict(ref.state_dict())
    x, y = _data(7)
    for _ in range(2):
        a, b = ref(x, y), sharded(x, y)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert float(ref.t) == float(sharded.loss.t) != 0.0


def test_runs_on_the_fused_core_and_a_later_step_leaves_the_backward_alone() -> None:
    """t is copied per step: a second forward before the first backward changes nothing."""
    torch.manual_seed(0)
    loss = CurricularFaceLoss(C, D, scale=16.0, momentum=0.9, chunk_size=6).double()
    assert loss.fused_logits(torch.randn(2, D)) is not None
    x, y = _data(7)
    x.requires_grad_(True)
    first = loss(x, y)
    t_first = float(loss.t)
    loss(F.normalize(torch.randn(B, D, dtype=F64)), y)  # moves t
    assert float(loss.t) != t_first
    ref = reference_per_sample("curricular", x, loss.W, y, margin=0.5, scale=16.0, t=t_first)
    got, want = _grads(first, x, loss.W), _grads(ref.mean(), x, loss.W)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_target_selection_is_exact(dtype: torch.dtype) -> None:
    """The hard-negative selection (a 0/1 lerp weight) gives the paper's piecewise value
    and slope bit for bit, including cosines equal to their row's bound (not hard)."""
    from pml_margins.losses.curricularface import (
        curricular_non_target,
        curricular_non_target_and_slope,
    )

    torch.manual_seed(3)
    cosine = (torch.rand(40, 57, dtype=dtype) * 2 - 1).requires_grad_(True)
    bound = torch.rand(40, dtype=dtype) - 0.2
    with torch.no_grad():
        cosine[:, 0] = bound  # on the bound: not a hard negative
    t = torch.tensor(0.37, dtype=dtype)
    hard = cosine.detach() > bound.unsqueeze(1)
    c = cosine.detach()
    want_value = torch.where(hard, c * (t + c), c)
    want_slope = torch.where(hard, t + 2 * c, torch.ones_like(c))
    value, slope = curricular_non_target_and_slope(c, bound, t)
    assert torch.equal(value, want_value) and torch.equal(slope, (c + t).add_(c).where(hard, 1.0))
    torch.testing.assert_close(slope, want_slope, rtol=0, atol=4 * torch.finfo(dtype).eps)
    differentiable = curricular_non_target(cosine, bound, t)
    assert torch.equal(differentiable.detach(), want_value)
    (grad,) = torch.autograd.grad(differentiable.sum(), cosine)
    assert torch.equal(grad, slope)


@pytest.mark.parametrize("scale", [64.0, 30.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_value_and_slope_are_the_scaled_piecewise_ones(dtype, scale: float) -> None:
    """The fused core's default-mode form: s N(t, z) and s N'(z), the same selection
    (cosines on the bound are not hard), within a few ulps of scaling the plain ones."""
    from pml_margins.losses.curricularface import (
        CurricularNonTarget,
        curricular_non_target_and_slope,
        curricular_scaled_non_target_and_slope,
    )

    torch.manual_seed(4)
    cosine = torch.rand(33, 71, dtype=dtype) * 2 - 1
    bound = torch.rand(33, dtype=dtype) - 0.4
    cosine[:, 3] = bound
    t = torch.tensor(-0.21, dtype=dtype)
    value, slope = curricular_non_target_and_slope(cosine, bound, t)
    scaled_value, scaled_slope = curricular_scaled_non_target_and_slope(cosine, bound, t, scale)
    tol = {"rtol": 4 * torch.finfo(dtype).eps, "atol": 4 * scale * torch.finfo(dtype).eps}
    torch.testing.assert_close(scaled_value, value * scale, **tol)
    torch.testing.assert_close(scaled_slope, slope * scale, **tol)
    easy = cosine <= bound.unsqueeze(1)
    assert torch.equal(scaled_value[easy], (cosine * scale)[easy])
    assert (scaled_slope[easy] == scale).all()
    both = CurricularNonTarget(bound, t).scaled_value_and_slope(cosine, scale)
    assert torch.equal(both[0], scaled_value) and torch.equal(both[1], scaled_slope)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_where_every_negative_is_hard_take_the_short_form(dtype, monkeypatch) -> None:
    """Early in training every cosine exceeds its bound: the mask-free form gives the
    general form's values (within an ulp: one product-add may fuse), and one cosine on
    its bound sends the block back to the general form."""
    from pml_margins.losses import curricularface as module

    torch.manual_seed(5)
    cosine = torch.rand(31, 64, dtype=dtype) * 1.2 - 0.2
    bound = torch.full((31,), -0.5, dtype=dtype)
    t, scale = torch.tensor(0.13, dtype=dtype), 30.0
    assert module._all_hard(cosine, bound)
    short = module.curricular_scaled_non_target_and_slope(cosine, bound, t, scale)
    monkeypatch.setattr(module, "_all_hard", lambda c, b: False)
    general = module.curricular_scaled_non_target_and_slope(cosine, bound, t, scale)
    tol = {"rtol": 2 * torch.finfo(dtype).eps, "atol": 2 * scale * torch.finfo(dtype).eps}
    torch.testing.assert_close(short[0], general[0], **tol)
    torch.testing.assert_close(short[1], general[1], **tol)
    torch.testing.assert_close(short[1], scale * (t + 2 * cosine), **tol)
    monkeypatch.undo()
    on_bound = cosine.clone()
    on_bound[7, 40] = bound[7]  # not hard (strictly above is)
    assert not module._all_hard(on_bound, bound)


def test_no_hard_negative_test_leaves_only_the_targets_out() -> None:
    from pml_margins.losses.curricularface import _no_hard_negative

    hard = torch.zeros(3, 5)
    columns = torch.tensor([2, -1, 0])
    assert _no_hard_negative(hard, columns)  # nothing hard at all
    hard[0, 2] = hard[2, 0] = 1.0  # only targets
    assert _no_hard_negative(hard, columns)
    hard[1, 4] = 1.0  # row 1's target is elsewhere: this one is a negative
    assert not _no_hard_negative(hard, columns)
    hard[1, 4] = 0.0
    hard[0, 3] = 1.0  # a negative beside row 0's target
    assert not _no_hard_negative(hard, columns)


@pytest.mark.parametrize("block_elements", [64, 1 << 20], ids=["many_blocks", "one_block"])
def test_trained_rows_take_arcfaces_form_in_the_blocked_core(block_elements, monkeypatch) -> None:
    """Late in training no negative is hard: blocks take the short form, and the loss is
    still the paper's (here: ArcFace's) in value and gradients."""
    from pml_margins.losses import curricularface as module

    monkeypatch.setattr(fused, "MATERIALIZE_MAX_ELEMENTS", 0)
    monkeypatch.setattr(fused, "_CPU_BLOCK_ELEMENTS", block_elements)
    taken = []
    original = module._no_hard_negative
    monkeypatch.setattr(
        module, "_no_hard_negative", lambda *a: taken.append(original(*a)) or taken[-1]
    )
    torch.manual_seed(0)
    curricular = CurricularFaceLoss(40, 64, margin=0.5, scale=32.0).double()
    q, _ = torch.linalg.qr(torch.randn(64, 40, dtype=F64))
    curricular.W.data.copy_(q)
    curricular.t.fill_(0.7)
    arc = ArcFaceLoss(40, 64, margin=0.5, scale=32.0).double()
    arc.load_state_dict(curricular.state_dict(), strict=False)
    y = torch.arange(48) % 40
    x = (q.t()[y] + 0.02 * torch.randn(48, 64, dtype=F64)).requires_grad_(True)
    a, b = curricular(x, y), arc(x, y)
    assert taken and all(taken)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for u, v in zip(_grads(a, x, curricular.W), _grads(b, x, arc.W), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    curricular.W.data[:, 1] = q[:, 0] * 0.999 + 0.001 * q[:, 1]  # one hard negative for class 0
    taken.clear()
    x.grad = None
    out = curricular(x, y)
    assert taken and not all(taken)
    ref = reference_per_sample(
        "curricular", x, curricular.W, y, margin=0.5, scale=32.0, t=float(curricular.t)
    ).mean()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
