"""The small-problem lane (``ClassWeightLoss._direct_loss``) gives what the full path gives.

A class-weight loss's ``forward`` on a small CPU problem in the common call (PML's
default reducer, no miner, no statistics, no per-step hooks) calls the dense function
directly. These tests hold it to the full path, value and gradients bit for bit, for every
class-weight loss and dtype pair; check that it is taken exactly where it may be; and that
bad input still gets the full checks' errors.
"""

from __future__ import annotations

import copy
import functools
from unittest import mock

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.reducers import MeanReducer, SumReducer
from pytorch_metric_learning.regularizers import LpRegularizer

import pml_margins
from pml_margins.losses import ArcFaceLoss, ClassWeightLoss, CosFaceLoss, SphereFaceLoss
from pml_margins.losses.class_weight_loss import ClassWeightLoss as _Base
from tests.losses.specs import SPECS

DTYPES = (torch.float32, torch.float64)


def _full_path(loss_fn: ClassWeightLoss, *args):
    """The loss through the layers the lane skips."""
    with mock.patch.object(_Base, "_direct_loss", return_value=None):
        return loss_fn(*args)


def _takes_lane(loss_fn: ClassWeightLoss, x, y, **kwargs) -> bool:
    return loss_fn._direct_loss(x, y, kwargs.get("indices_tuple"), None, None) is not None


def _case(spec, x_dtype, w_dtype, seed=0):
    torch.manual_seed(seed)
    loss_fn = spec.build(11, 6).to(w_dtype)
    with torch.no_grad():
        loss_fn.W.normal_()
    x = torch.randn(9, 6, dtype=x_dtype) * 3 + 1  # off-centre, norms far from 1
    return loss_fn, x, torch.randint(0, 11, (9,))


@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_lane_equals_the_full_path_bit_for_bit(spec, x_dtype, w_dtype) -> None:
    initial, x, y = _case(spec, x_dtype, w_dtype)
    results = []
    for full in (False, True):
        loss_fn = copy.deepcopy(initial)  # (running statistics move in the forward)
        run = functools.partial(_full_path, loss_fn) if full else loss_fn
        torch.manual_seed(1)  # ElasticFace draws its margins in the forward
        xs = x.clone().requires_grad_(True)
        loss = run(xs, y)
        grads = torch.autograd.grad(loss, [xs, *loss_fn.parameters()])
        results.append((loss, grads, {k: v.clone() for k, v in loss_fn.state_dict().items()}))
    (lane_loss, lane_grads, lane_state), (full_loss, full_grads, full_state) = results
    assert lane_loss.dtype == full_loss.dtype
    assert torch.equal(lane_loss, full_loss), spec.id
    for a, b in zip(lane_grads, full_grads, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), spec.id
    for name, value in lane_state.items():
        assert torch.equal(value, full_state[name]), (spec.id, name)


LANE_LOSSES = {
    "arcface": lambda **kw: ArcFaceLoss(11, 6, **kw),
    "cosface": lambda **kw: CosFaceLoss(11, 6, **kw),
    "sphereface": lambda **kw: SphereFaceLoss(11, 6, **kw),
}


@pytest.mark.parametrize("name", LANE_LOSSES)
def test_the_common_call_takes_the_lane(name: str) -> None:
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    loss_fn = LANE_LOSSES[name]()
    assert _takes_lane(loss_fn, x, y)
    assert _takes_lane(LANE_LOSSES[name](reducer=MeanReducer()), x, y)
    assert _takes_lane(loss_fn, x.double(), y)
    with pml_margins.value_checks(False):
        assert _takes_lane(loss_fn, x, y)  # shape checks only, as the full path


def _off_lane_calls():
    """(id, loss kwargs, call) where the lane must step aside."""
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    yield "miner", {}, lambda f: f._direct_loss(x, y, MultiSimilarityMiner()(x, y), None, None)
    yield "ref_emb", {}, lambda f: f._direct_loss(x, y, None, x, y)
    yield "int32 labels", {}, lambda f: f._direct_loss(x, y.int(), None, None, None)
    yield "bfloat16", {}, lambda f: f._direct_loss(x.bfloat16(), y, None, None, None)
    yield "wrong width", {}, lambda f: f._direct_loss(x[:, :5], y, None, None, None)
    yield "label out of range", {}, lambda f: f._direct_loss(x, y + 11, None, None, None)
    yield "no labels", {}, lambda f: f._direct_loss(x, None, None, None, None)
    yield "chunk_size", {"chunk_size": 4}, lambda f: f._direct_loss(x, y, None, None, None)
    yield "sample_rate", {"sample_rate": 0.5}, lambda f: f._direct_loss(x, y, None, None, None)
    yield "sum reducer", {"reducer": SumReducer()}, lambda f: f._direct_loss(x, y, None, None, None)
    yield (
        "regularizer",
        {"weight_regularizer": LpRegularizer()},
        lambda f: f._direct_loss(x, y, None, None, None),
    )
    yield "collect_stats", {"collect_stats": True}, lambda f: f._direct_loss(x, y, None, None, None)
    yield (
        "distance stats",
        {"distance": CosineSimilarity(collect_stats=True)},
        lambda f: f._direct_loss(x, y, None, None, None),
    )
    nan = x.clone()
    nan[2, 3] = float("nan")
    yield "NaN", {}, lambda f: f._direct_loss(nan, y, None, None, None)


@pytest.mark.parametrize(("case", "kwargs", "call"), list(_off_lane_calls()))
def test_the_lane_steps_aside(case, kwargs, call) -> None:
    assert call(CosFaceLoss(11, 6, **kwargs)) is None, case


def test_the_lane_steps_aside_for_autograd_only_transforms_and_large_problems() -> None:
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    loss_fn = CosFaceLoss(11, 6)
    with pml_margins.autograd_only():
        assert not _takes_lane(loss_fn, x, y)
    with torch.autograd.forward_ad.dual_level():
        assert not _takes_lane(loss_fn, x, y)
    big = CosFaceLoss(100_000, 512)
    assert not _takes_lane(big, torch.randn(256, 512), torch.randint(0, 100_000, (256,)))


def test_hooks_and_redefined_logits_step_aside() -> None:
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))

    class WithExtra(CosFaceLoss):
        def extra_losses(self, embeddings, labels):
            return embeddings.norm(dim=1) * 0.1

    class OwnLogits(CosFaceLoss):
        def base_logits(self, embeddings):
            logits, scale = super().base_logits(embeddings)
            return logits * 0.5, scale

    class StricterChecks(CosFaceLoss):
        def check_inputs(self, embeddings, labels, *rest):
            super().check_inputs(embeddings, labels, *rest)
            if len(embeddings) < 10:
                raise ValueError("at least 10 rows")

    with pytest.raises(ValueError, match="at least 10 rows"):
        StricterChecks(11, 6)(x, y)
    for cls in (WithExtra, OwnLogits):
        loss_fn = cls(11, 6)
        assert not _takes_lane(loss_fn, x, y), cls.__name__
        torch.testing.assert_close(loss_fn(x, y), _full_path(loss_fn, x, y))
    extra = WithExtra(11, 6)
    plain = CosFaceLoss(11, 6)
    plain.load_state_dict(extra.state_dict())
    assert not torch.equal(extra(x, y), plain(x, y))  # the extra term is not dropped


def test_bad_input_gets_the_full_checks_errors() -> None:
    loss_fn = CosFaceLoss(11, 6)
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\)"):
        loss_fn(x, y + 11)
    x[4, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss_fn(x, y)


def test_the_lane_resets_statistics_as_pml_forward_does() -> None:
    """PML's ``forward`` resets the recorded statistics every call; so does the lane."""
    loss_fn = ArcFaceLoss(11, 6, collect_stats=True)
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    loss_fn(x, y)
    assert loss_fn.avg_angle != 0
    loss_fn.collect_stats = False
    assert _takes_lane(loss_fn, x, y)
    loss_fn(x, y)
    assert loss_fn.avg_angle == 0


@pytest.mark.parametrize("name", LANE_LOSSES)
def test_lane_equals_the_full_path_under_cpu_autocast(name: str) -> None:
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    loss_fn = LANE_LOSSES[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _takes_lane(loss_fn, x, y)
        results = []
        for full in (False, True):
            xs = x.clone().requires_grad_(True)
            loss = _full_path(loss_fn, xs, y) if full else loss_fn(xs, y)
            results.append((loss, *torch.autograd.grad(loss, [xs, loss_fn.W])))
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
