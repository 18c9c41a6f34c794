"""The small-problem lane (``ClassWeightLoss._direct_loss``) gives what the full path gives.

A class-weight loss's ``forward`` on a small CPU problem in the common call (PML's
default reducer, no miner, no statistics, no per-step hooks) calls the dense function
directly. These tests hold it to the full path, value and gradients bit for bit, for every
class-weight loss and dtype pair; check that it is taken exactly where it may be; and that
bad input still gets the full checks' errors.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.reducers import MeanReducer, SumReducer
from pytorch_metric_learning.regularizers import LpRegularizer

import pml_margins
from pml_margins.functional import FusedLogits
from pml_margins.losses import (
    ArcFaceLoss,
    ClassWeightLoss,
    CosFaceLoss,
    MagFaceLoss,
    NormSoftmaxLoss,
    ProxyCircleLoss,
    SoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from pml_margins.losses import class_weight_loss as cwl
from pml_margins.losses.class_weight_loss import ClassWeightLoss as _Base
from tests.losses.specs import SPECS

DTYPES = (torch.float32, torch.float64)


def _full_path(loss_fn: ClassWeightLoss, *args, **kwargs):
    """The loss through the layers the lane skips."""
    with mock.patch.object(_Base, "_direct_loss", return_value=None):
        return loss_fn(*args, **kwargs)


def _takes_lane(loss_fn: ClassWeightLoss, x, y, **kwargs) -> bool:
    """Whether ``forward`` calls the dense function straight from the lane."""
    dense = cwl.dense_margin_softmax_cross_entropy
    with mock.patch.object(cwl, "dense_margin_softmax_cross_entropy", wraps=dense) as spy:
        direct = loss_fn._direct_loss(x, y, kwargs.get("indices_tuple"), None, None)
    return direct is not None and spy.call_count == 1 and spy.call_args.kwargs["mean"] is True


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


def test_the_lane_steps_aside_for_autograd_only_and_forward_ad() -> None:
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    loss_fn = CosFaceLoss(11, 6)
    with pml_margins.autograd_only():
        assert loss_fn._direct_loss(x, y, None, None, None) is None
    with torch.autograd.forward_ad.dual_level():
        assert loss_fn._direct_loss(x, y, None, None, None) is None


_RAW = DotProductSimilarity(normalize_embeddings=False)


class _WithExtra(CosFaceLoss):
    def extra_losses(self, embeddings, labels):
        return embeddings.norm(dim=1) * 0.1


class _OwnLogits(CosFaceLoss):
    def base_logits(self, embeddings):
        logits, scale = super().base_logits(embeddings)
        return logits * 0.5, scale


class _StricterChecks(CosFaceLoss):
    def check_inputs(self, embeddings, labels, *rest):
        super().check_inputs(embeddings, labels, *rest)
        if len(embeddings) < 10:
            raise ValueError("at least 10 rows")


def _equal_to_full_path(loss_fn, x, y) -> bool:
    results = []
    for full in (False, True):
        xs = x.clone().requires_grad_(True)
        loss = _full_path(loss_fn, xs, y) if full else loss_fn(xs, y)
        results.append((loss, *torch.autograd.grad(loss, [xs, *loss_fn.parameters()])))
    return all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize(
    ("make", "dense"),
    [
        (lambda: _OwnLogits(11, 6), False),  # its own logits: the plain path
        (lambda: ProxyCircleLoss(11, 6), False),  # a non-target function
        (lambda: SubCenterArcFaceLoss(11, 6), False),  # K columns per class
        (
            lambda: NormSoftmaxLoss(
                11, 6, distance=DotProductSimilarity(normalize_embeddings=False)
            ),
            True,
        ),
    ],
    ids=["own logits", "proxy circle", "sub-centres", "nsl raw embeddings"],
)
def test_other_forms_get_the_full_paths_losses(make, dense) -> None:
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    loss_fn = make()
    assert _takes_lane(loss_fn, x, y) == dense
    assert _equal_to_full_path(loss_fn, x, y)


def test_a_problem_the_core_does_not_materialize_gets_the_blocked_function() -> None:
    x, y = torch.randn(4, 16), torch.randint(0, 70_000, (4,))
    loss_fn = CosFaceLoss(70_000, 16)
    assert not _takes_lane(loss_fn, x, y)
    assert _equal_to_full_path(loss_fn, x, y)


def test_hooks_step_aside() -> None:
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    with pytest.raises(ValueError, match="at least 10 rows"):
        _StricterChecks(11, 6)(x, y)
    extra = _WithExtra(11, 6)
    assert extra._direct_loss(x, y, None, None, None) is None
    plain = CosFaceLoss(11, 6)
    plain.load_state_dict(extra.state_dict())
    assert not torch.equal(extra(x, y), plain(x, y))  # the extra term is not dropped


def _error(call) -> str:
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _bad_calls():
    """(id, loss, embeddings, labels, kwargs) that the full path refuses."""
    x, y = torch.randn(6, 8), torch.randint(0, 10, (6,))
    yield "ref_labels alone", CosFaceLoss(10, 8), x, y, {"ref_labels": y}
    yield "ref_emb alone", CosFaceLoss(10, 8), x, y, {"ref_emb": x}
    narrow = CosFaceLoss(10, 8)
    narrow.W = torch.nn.Parameter(torch.randn(9, 10))
    yield "W of another width", narrow, x, y, {}
    wide = CosFaceLoss(10, 8)
    wide.W = torch.nn.Parameter(torch.randn(8, 12))
    yield "W of more columns", wide, x, y, {}
    for shape in [(1,), (11,), (6, 10)]:
        softmax = SoftmaxLoss(10, 8)
        softmax.bias = torch.nn.Parameter(torch.randn(shape))
        yield f"bias {shape}", softmax, x, y, {}
    sparse = CosFaceLoss(10, 8)
    weight = sparse.W.detach().to_sparse()
    del sparse.W
    sparse.W = weight
    yield "sparse W", sparse, x, y, {}
    for count in (1.0, True):

        class FloatCount(CosFaceLoss):
            def fused_logits(self, embeddings, count=count):
                return FusedLogits(True, True, self.scale, None, count)

        yield f"sub_centers {count!r}", FloatCount(10, 8), x, y, {}
    for distance in (_BareCosine(), None):
        for labels in (y, y + 10):
            swapped = CosFaceLoss(10, 8)
            swapped.distance = distance
            yield f"distance {distance} labels {labels.max()}", swapped, x, labels, {}
    no_reducer = CosFaceLoss(10, 8)
    no_reducer.reducer = None
    yield "reducer None, bad labels", no_reducer, x, y + 10, {}


class _BareCosine(torch.nn.Module):
    """A distance swapped in after construction, without PML's attributes."""

    def forward(self, query, reference):
        return F.normalize(query, dim=1) @ F.normalize(reference, dim=1).t()


@pytest.mark.parametrize(("case", "loss_fn", "x", "y", "kwargs"), list(_bad_calls()))
def test_the_lane_raises_what_the_full_path_raises(case, loss_fn, x, y, kwargs) -> None:
    lane = _error(lambda: loss_fn(x, y, **kwargs))
    full = _error(lambda: _full_path(loss_fn, x, y, **kwargs))
    assert lane == full, case


def test_hooks_are_called_once_each_as_on_the_full_path() -> None:
    """A hook with a side effect (a random draw, a counter) sees the same calls."""
    calls = []

    class CountedSubCenter(SubCenterArcFaceLoss):
        def logit_scale(self, embeddings):
            calls.append("scale")
            return 64.0 + float(torch.rand(()))

    class CountedProxyCircle(ProxyCircleLoss):
        def non_target_logit_fn(self):
            calls.append("non-target")
            return super().non_target_logit_fn()

    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    for loss_fn in (CountedSubCenter(11, 6), CountedProxyCircle(11, 6), CosFaceLoss(11, 6)):
        seen = []
        for full in (False, True):
            calls.clear()
            torch.manual_seed(5)
            value = _full_path(loss_fn, x, y) if full else loss_fn(x, y)
            seen.append((value, list(calls), torch.rand(())))
        (v1, c1, r1), (v2, c2, r2) = seen
        assert torch.equal(v1, v2) and c1 == c2 and torch.equal(r1, r2), type(loss_fn).__name__


class _DropConnect(torch.nn.Module):
    calls = 0

    def forward(self, weight):
        _DropConnect.calls += 1
        return weight * (torch.rand_like(weight) > 0.1) / 0.9


def _parametrized_calls():
    """(id, loss, call): calls the lane takes, and calls it declines at every stage."""
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    pairs = MultiSimilarityMiner()(x, y)
    yield "common", CosFaceLoss(11, 6), lambda f: f(x, y)
    yield "miner", CosFaceLoss(11, 6), lambda f: f(x, y, pairs)
    yield "float16 rows", CosFaceLoss(11, 6), lambda f: f(x.half(), y)
    yield "MagFace", MagFaceLoss(11, 6), lambda f: f(x, y)
    yield "sub-centres", SubCenterArcFaceLoss(11, 6), lambda f: f(x, y)
    yield "proxy circle", ProxyCircleLoss(11, 6), lambda f: f(x, y)
    yield "large", CosFaceLoss(70_000, 6), lambda f: f(torch.randn(2, 6), y[:2])


@pytest.mark.parametrize(("case", "loss_fn", "call"), list(_parametrized_calls()))
def test_a_parametrized_w_is_evaluated_as_on_the_full_path(case, loss_fn, call) -> None:
    torch.nn.utils.parametrize.register_parametrization(loss_fn, "W", _DropConnect())
    seen = []
    for full in (False, True):
        _DropConnect.calls = 0
        torch.manual_seed(5)
        with (
            mock.patch.object(_Base, "_direct_loss", return_value=None)
            if full
            else (contextlib.nullcontext())
        ):
            value = call(loss_fn)
        seen.append((value, _DropConnect.calls, torch.rand(())))
    (v1, n1, r1), (v2, n2, r2) = seen
    assert torch.equal(v1, v2) and n1 == n2 and torch.equal(r1, r2), (case, n1, n2)


def test_compute_dtype_is_called_as_on_the_full_path() -> None:
    """``check_inputs`` calls the (overridable) ``compute_dtype``; so does the lane."""
    calls = []

    class Counted(CosFaceLoss):
        def compute_dtype(self, embeddings):
            calls.append(1)
            return super().compute_dtype(embeddings)

    loss_fn = Counted(11, 6)
    x, y = torch.randn(9, 6), torch.randint(0, 11, (9,))
    assert _takes_lane(loss_fn, x, y)
    counts = []
    for full in (False, True):
        calls.clear()
        _full_path(loss_fn, x, y) if full else loss_fn(x, y)
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0


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
