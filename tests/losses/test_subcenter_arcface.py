"""Sub-center ArcFace against PML's SubCenterArcFaceLoss, the plain path and ArcFace (K = 1).

Every mode of the fused core (materialized, blocked with one saved buffer, bounded
``chunk_size``, Partial FC) gives PML's values and gradients, ties included.
"""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners, regularizers

import pml_margins.functional.fused_margin_softmax as fused_module
from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.functional import class_columns, sample_classes
from pml_margins.losses import ArcFaceLoss, SubCenterArcFaceLoss
from tests.losses.reference import arcface_cos, class_cosine, target_softmax_cross_entropy
from tests.losses.test_pml_equality import assert_same_value_and_grads

C, D, K = 12, 16, 3
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}
#: every path of the fused core; chunk 5 does not divide C, chunk 64 exceeds it
MODES = {
    "default": {},
    "materialized": {"materialize": True},
    "blocked": {"materialize": False},
    "chunk1": {"chunk_size": 1},
    "chunk5": {"chunk_size": 5},
    "chunk64": {"chunk_size": 64},
    "auto": {"chunk_size": "auto"},
}


class PlainSubCenter(SubCenterArcFaceLoss):
    """The same loss on the plain path: ``cosine`` restated, ``fused_logits`` not."""

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return super().cosine(embeddings)


def _pair(degrees: float = 28.6, scale: float = 64.0, k: int = K, **kw):
    pml = pml_losses.SubCenterArcFaceLoss(
        num_classes=C, embedding_size=D, margin=degrees, scale=scale, sub_centers=k, **kw
    )
    ours = SubCenterArcFaceLoss(C, D, math.radians(degrees), scale, sub_centers=k, **kw)
    ours.load_state_dict(pml.state_dict())
    return pml, ours


def _apply_mode(loss: SubCenterArcFaceLoss, mode: dict, monkeypatch) -> None:
    """``chunk_size``/``sample_rate`` on the loss; ``materialize`` by the core's threshold."""
    loss.chunk_size = mode.get("chunk_size")
    loss.sample_rate = mode.get("sample_rate", 1.0)
    if "materialize" in mode:
        limit = 1 << 62 if mode["materialize"] else 0
        monkeypatch.setattr(fused_module, "MATERIALIZE_MAX_ELEMENTS", limit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("use_miner", [False, True], ids=["labels", "miner"])
@pytest.mark.parametrize(("degrees", "k"), [(28.6, 3), (70.0, 2), (28.6, 1)])
def test_equal_to_pml(dtype, use_miner: bool, degrees: float, k: int) -> None:
    torch.manual_seed(0)
    pml, ours = _pair(degrees, 30.0, k)
    pml, ours = pml.to(dtype), ours.to(dtype)
    x = torch.randn(40, D, dtype=dtype, requires_grad=True)
    y = torch.arange(40) % C
    tuples = miners.MultiSimilarityMiner(0.3)(x, y) if use_miner else None
    assert_same_value_and_grads(ours(x, y, tuples), pml(x, y, tuples), ours, pml, x, TOL[dtype])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("degrees", "k"), [(28.6, 3), (70.0, 2), (170.0, 4)])
def test_every_fused_mode_equals_pml_and_the_plain_path(
    dtype, mode: str, degrees, k, monkeypatch
) -> None:
    """170 degrees: theta + m > pi for most targets (ArcFace's fallback)."""
    torch.manual_seed(5)
    pml, ours = _pair(degrees, 30.0, k)
    _apply_mode(ours, MODES[mode], monkeypatch)
    plain = PlainSubCenter(C, D, math.radians(degrees), 30.0, k)
    plain.load_state_dict(pml.state_dict())
    pml, ours, plain = pml.to(dtype), ours.to(dtype), plain.to(dtype)
    assert ours.fused_logits(torch.zeros(1, D)).sub_centers == k
    assert plain.fused_logits(torch.zeros(1, D)) is None
    x = torch.randn(40, D, dtype=dtype, requires_grad=True)
    y = torch.arange(40) % C
    assert_same_value_and_grads(ours(x, y), pml(x, y), ours, pml, x, TOL[dtype])
    assert_same_value_and_grads(ours(x, y), plain(x, y), ours, plain, x, TOL[dtype])


@pytest.mark.parametrize("mode", list(MODES))
def test_tied_sub_centres_send_the_gradient_to_the_first_as_pml_does(
    mode: str, monkeypatch
) -> None:
    """Duplicate sub-centres tie for the max: PML's max() picks the first, so do we."""
    torch.manual_seed(0)
    pml, ours = _pair()
    _apply_mode(ours, MODES[mode], monkeypatch)
    pml, ours = pml.double(), ours.double()
    with torch.no_grad():
        w = pml.W.view(D, C, K)
        w[:, :, 1] = w[:, :, 0]
        w[:, :, 2] = w[:, :, 0]
    ours.load_state_dict(pml.state_dict())
    x = torch.randn(30, D, dtype=torch.float64, requires_grad=True)
    y = torch.arange(30) % C
    assert_same_value_and_grads(ours(x, y), pml(x, y), ours, pml, x, TOL[torch.float64])
    grad_w = torch.autograd.grad(ours(x, y), ours.W)[0].view(D, C, K)
    assert (grad_w[:, :, 1:] == 0).all() and (grad_w[:, :, 0] != 0).all()


@pytest.mark.parametrize("batch", [7, 9])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 5])
def test_ties_hold_whatever_the_block_and_batch_sizes(batch: int, chunk_size) -> None:
    """Odd batch x block sizes put a sub-centre's product mid cache line; a BLAS product
    written there rounded some columns differently (7 x 3 in bounded mode: the first
    class of each block sent gradient to its duplicate sub-centre). Planes are aligned."""
    torch.manual_seed(2)
    pml, ours = _pair(k=2)
    ours.chunk_size = chunk_size
    pml, ours = pml.double(), ours.double()
    with torch.no_grad():
        w = pml.W.view(D, C, 2)
        w[:, :, 1] = w[:, :, 0]
    ours.load_state_dict(pml.state_dict())
    x = torch.randn(batch, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (batch,))
    assert_same_value_and_grads(ours(x, y), pml(x, y), ours, pml, x, TOL[torch.float64])
    grad_w = torch.autograd.grad(ours(x, y), ours.W)[0].view(D, C, 2)
    assert (grad_w[:, :, 1] == 0).all()


def test_partial_tie_goes_to_the_first_of_the_tied_pair() -> None:
    """Sub-centres 1 and 2 equal and nearest for some rows: column 1 gets their gradient."""
    torch.manual_seed(1)
    pml, ours = _pair()
    ours.chunk_size = 5
    pml, ours = pml.double(), ours.double()
    y = torch.arange(24) % C
    with torch.no_grad():
        w = pml.W.view(D, C, K)
        w[:, :, 2] = w[:, :, 1]
    ours.load_state_dict(pml.state_dict())
    x = pml.W.detach().t()[y * K + 2] + 0.1 * torch.randn(24, D, dtype=torch.float64)
    x.requires_grad_(True)
    assert_same_value_and_grads(ours(x, y), pml(x, y), ours, pml, x, TOL[torch.float64])
    grad_w = torch.autograd.grad(ours(x, y), ours.W)[0].view(D, C, K)
    assert (grad_w[:, :, 2] == 0).all() and (grad_w[:, :, 1] != 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_only_coinciding_leading_entries_take_the_per_plane_products(dtype) -> None:
    """Sub-centres that cannot be equal (their first 8 bytes differ) share one product."""
    torch.manual_seed(0)
    rows = 8 // torch.empty((), dtype=dtype).element_size()
    w = torch.randn(D, C * K).to(dtype)
    assert not fused_module._may_tie(w, K)  # random half entries coincide, 8 bytes do not
    tied = w.clone()
    tied[:rows, 4 * K + 2] = tied[:rows, 4 * K]  # class 4: sub-centres 0 and 2
    assert fused_module._may_tie(tied, K)
    if rows > 1:  # equal first entries, different second: not equal columns
        apart = tied.clone()
        apart[1, 4 * K + 2] = apart[1, 4 * K] + 1
        assert not fused_module._may_tie(apart, K)
    zeros = w.clone()
    zeros[:rows, 7 * K], zeros[:rows, 7 * K + 1] = 0.0, -0.0  # equal as numbers
    assert fused_module._may_tie(zeros, K)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_some_classes_with_duplicate_sub_centres_among_distinct_ones(chunk_size, dtype) -> None:
    """Blocks holding a duplicated class take the planes, the others one product: each
    duplicate's gradient goes to its first copy, and every value and gradient is PML's."""
    torch.manual_seed(3)
    pml, ours = _pair()
    ours.chunk_size = chunk_size
    pml, ours = pml.to(dtype), ours.to(dtype)
    duplicated = torch.tensor([2, 7, 11])
    with torch.no_grad():
        w = pml.W.view(D, C, K)
        w[:, duplicated, 1] = w[:, duplicated, 0]
        w[:, duplicated, 2] = w[:, duplicated, 0]
    ours.load_state_dict(pml.state_dict())
    y = torch.arange(60) % C
    x = torch.randn(60, D, dtype=dtype, requires_grad=True)
    assert_same_value_and_grads(ours(x, y), pml(x, y), ours, pml, x, TOL[dtype])
    grad_w = torch.autograd.grad(ours(x, y), ours.W)[0].view(D, C, K)
    assert (grad_w[:, duplicated, 1:] == 0).all() and (grad_w[:, duplicated, 0] != 0).all()
    distinct = torch.ones(C, dtype=torch.bool)
    distinct[duplicated] = False
    assert (grad_w[:, distinct, 1:] != 0).any()


@pytest.mark.parametrize("mode", ["default", "materialized", "blocked", "chunk5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_partial_fc_equals_the_plain_loss_on_the_sampled_classes(
    dtype, mode: str, monkeypatch
) -> None:
    """Whole classes (all K columns) are kept; the others get no gradient."""
    torch.manual_seed(2)
    _, ours = _pair(30.0, 16.0)
    _apply_mode(ours, {**MODES[mode], "sample_rate": 0.5}, monkeypatch)
    ours = ours.to(dtype)
    x = torch.randn(10, D, dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 0, 3, 3, 3, 7, 7, 11, 11, 11])
    torch.manual_seed(7)
    out = ours(x, y)
    torch.manual_seed(7)
    index, local = sample_classes(y, C, 0.5)
    assert 4 <= len(index) < C
    columns = class_columns(index, K)
    sub = PlainSubCenter(len(index), D, math.radians(30.0), 16.0, K).to(dtype)
    with torch.no_grad():
        sub.W.copy_(ours.W[:, columns])
    xs = x.detach().clone().requires_grad_(True)
    want = sub(xs, local)
    torch.testing.assert_close(out, want, **TOL[dtype])
    gx, gw = torch.autograd.grad(out, (x, ours.W))
    want_gx, want_gw = torch.autograd.grad(want, (xs, sub.W))
    torch.testing.assert_close(gx, want_gx, **TOL[dtype])
    torch.testing.assert_close(gw[:, columns], want_gw, **TOL[dtype])
    others = torch.ones(C * K, dtype=torch.bool)
    others[columns] = False
    assert (gw[:, others] == 0).all()


def test_sharded_sub_center_keeps_the_plain_base_logits() -> None:
    """The sharded loss does not read the sub-centre declaration as plain cosines."""
    from pml_margins.distributed.sharded_loss import _cosine_scale

    torch.manual_seed(3)
    pml, _ = _pair(30.0, 16.0)
    sharded = ShardedMarginSoftmaxLoss(
        SubCenterArcFaceLoss, C, D, rank=0, world_size=1, margin=math.radians(30.0), scale=16.0
    )
    sharded.loss.load_state_dict(pml.state_dict())
    x = torch.randn(20, D, requires_grad=True)
    y = torch.arange(20) % C
    assert _cosine_scale(sharded.loss, x, sampled=False) is None
    out = sharded(x, y)
    torch.testing.assert_close(out, pml(x, y), **TOL[torch.float32])


def test_state_dicts_load_both_ways() -> None:
    pml, ours = _pair()
    assert set(pml.state_dict()) == set(ours.state_dict()) == {"W"}
    assert ours.W.shape == pml.W.shape == (D, C * K)
    assert torch.equal(ours.W, pml.W)
    trained = SubCenterArcFaceLoss(C, D)
    pml.load_state_dict(trained.state_dict())
    assert torch.equal(pml.W, trained.W)
    assert ours.num_classes == C and ours.sub_centers == K


def test_weight_regularizer_and_get_logits_equal_pml() -> None:
    torch.manual_seed(1)
    reg = {"weight_regularizer": regularizers.RegularFaceRegularizer(), "weight_reg_weight": 0.5}
    pml, ours = _pair(**reg)
    pml, ours = pml.double(), ours.double()
    x = torch.randn(20, D, dtype=torch.float64, requires_grad=True)
    y = torch.arange(20) % C
    assert_same_value_and_grads(ours(x, y), pml(x, y), ours, pml, x, TOL[torch.float64])
    torch.testing.assert_close(ours.get_logits(x), pml.get_logits(x))
    assert ours.get_logits(x).shape == (20, C)


@pytest.mark.parametrize("mode", ["default", "blocked", "chunk5", "partial_fc"])
@pytest.mark.parametrize("margin", [0.3, 1.2, 2.9], ids=["small", "big", "beyond_pi"])
@pytest.mark.parametrize("easy_margin", [False, True], ids=["hard", "easy"])
def test_one_sub_centre_is_arcface_exactly(
    margin: float, easy_margin: bool, mode: str, monkeypatch
) -> None:
    """K = 1 is ArcFace, including the theta + m > pi fallback: the same path, bit for bit."""
    torch.manual_seed(2)
    arc = ArcFaceLoss(C, D, margin, 16.0, easy_margin).double()
    sub = SubCenterArcFaceLoss(C, D, margin, 16.0, 1, easy_margin).double()
    sub.load_state_dict(arc.state_dict())
    for loss in (arc, sub):
        _apply_mode(loss, MODES.get(mode, {"sample_rate": 0.5}), monkeypatch)
    x = torch.randn(25, D, dtype=torch.float64, requires_grad=True)
    y = torch.arange(25) % C
    torch.manual_seed(3)
    a = sub(x, y)
    torch.manual_seed(3)
    b = arc(x, y)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a, (x, sub.W))
    gb = torch.autograd.grad(b, (x, arc.W))
    for u, v in zip(ga, gb, strict=True):
        assert torch.equal(u, v)


def test_against_paper_formula_with_far_sub_centres() -> None:
    """A sample nearest a non-first sub-centre: the paper's max, not the first column."""
    torch.manual_seed(3)
    loss = SubCenterArcFaceLoss(4, 6, 0.5, 10.0, 3).double()
    y = torch.tensor([0, 1, 2, 3])
    x = loss.W.detach().t()[y * 3 + 2] + 0.01 * torch.randn(4, 6, dtype=torch.float64)
    cos = class_cosine(x, loss.W.detach(), 3)
    rows = torch.arange(4)
    expected = target_softmax_cross_entropy(10 * cos, y, 10 * arcface_cos(cos[rows, y], 0.5))
    torch.testing.assert_close(loss(x, y), expected.mean(), rtol=1e-12, atol=1e-12)


# --- get_outliers --------------------------------------------------------------------
@pytest.mark.parametrize("degrees", [0.0, 30.0, 60.0, 75.0, 90.0, 180.0])
def test_get_outliers_equals_pml(degrees: float) -> None:
    torch.manual_seed(4)
    pml, ours = _pair()
    x = torch.randn(60, D)
    y = torch.arange(60) % C
    pml_outliers, pml_centres = pml.get_outliers(x, y, threshold=degrees)
    outliers, centres = ours.get_outliers(x, y, threshold=math.radians(degrees))
    assert torch.equal(outliers, pml_outliers)
    assert torch.equal(centres, pml_centres)
    only = ours.get_outliers(x, y, math.radians(degrees), return_dominant_centers=False)
    assert isinstance(only, torch.Tensor) and torch.equal(only, pml_outliers)


def test_get_outliers_planted() -> None:
    """Class 0's samples sit on sub-centre 1, except one far from it: that one is the outlier."""
    loss = SubCenterArcFaceLoss(2, 3, sub_centers=2)
    with torch.no_grad():
        loss.W.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0, 0, 0, 1.0]]))
    x = torch.tensor([[0.0, 1.0, 0.1], [0.1, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 0, 0])
    outliers, centres = loss.get_outliers(x, y, threshold=math.radians(45))
    assert outliers.tolist() == [3]
    assert torch.equal(centres[:, 0], loss.W[:, 1])
    assert torch.isnan(centres[:, 1]).all()  # class 1 has no sample: no dominant sub-centre
    assert loss.get_outliers(x, y, threshold=3.1)[0].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_get_outliers_centres_in_the_embeddings_dtype_as_pml(dtype) -> None:
    """PML's centres come in the embeddings' dtype, so that a user multiplies them
    (PML's own test: mm(normalize(x), centres)); W keeps its dtype."""
    torch.manual_seed(5)
    pml, ours = _pair()
    x = torch.randn(40, D).to(dtype)
    y = torch.arange(40) % C
    _, centres = ours.get_outliers(x, y, threshold=math.radians(60))
    assert ours.W.dtype == torch.float32 and centres.dtype == dtype
    assert torch.equal(centres, ours.W.detach()[:, _dominant_columns(ours, x, y)].to(dtype))
    cosines = torch.mm(torch.nn.functional.normalize(x), centres)  # PML's usage runs
    assert cosines.dtype == dtype
    if dtype == torch.float64:  # PML casts W to float64 exactly: the same centres
        assert torch.equal(centres, pml.get_outliers(x, y, threshold=60.0)[1])


def _dominant_columns(loss, x, y):
    """The dominant sub-centre's column of each class, by the paper's vote."""
    k = loss.sub_centers
    w = torch.nn.functional.normalize(loss.W.detach().double(), dim=0)
    cos = (torch.nn.functional.normalize(x.double()) @ w).view(len(x), -1, k)
    own = cos[torch.arange(len(y)), y]
    votes = torch.zeros(loss.num_classes, k, dtype=torch.long)
    votes.index_put_((y, own.argmax(1)), torch.ones_like(y), accumulate=True)
    return torch.arange(loss.num_classes) * k + votes.argmax(1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"threshold": 75.0}, ValueError, "radians.*math.radians"),
        ({"threshold": -0.1}, ValueError, "threshold must be >= 0"),
        ({"labels": torch.tensor([0, 12])}, ValueError, r"labels must lie in \[0, 12\)"),
        ({"embeddings": torch.randn(2, 5)}, ValueError, "width 5"),
    ],
)
def test_get_outliers_bad_input(kwargs, error, message: str) -> None:
    _, ours = _pair()
    args = {"embeddings": torch.randn(2, D), "labels": torch.tensor([0, 1]), **kwargs}
    with pytest.raises(error, match=message):
        ours.get_outliers(**args)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"sub_centers": 0}, ValueError, "sub_centers must be >= 1"),
        ({"sub_centers": 2.0}, TypeError, "sub_centers must be an int"),
        ({"margin": 28.6}, ValueError, "radians.*math.radians"),
        ({"scale": 0.0}, ValueError, "scale must be > 0"),
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1"),
    ],
)
def test_bad_hyperparameters(kwargs, error, message: str) -> None:
    args = {"num_classes": C, "embedding_size": D, **kwargs}
    with pytest.raises(error, match=message):
        SubCenterArcFaceLoss(**args)


def test_avg_angle_is_the_nearest_sub_centres_angle() -> None:
    """The fused path records the target angle from the class cosines (the maximum)."""
    torch.manual_seed(6)
    _, ours = _pair()
    plain = PlainSubCenter(C, D, math.radians(28.6), 64.0, K)
    plain.load_state_dict(ours.state_dict())
    ours.collect_stats = plain.collect_stats = True
    x = torch.randn(20, D, dtype=torch.float64)
    y = torch.arange(20) % C
    ours.double()(x, y)
    plain.double()(x, y)
    assert ours.avg_angle == pytest.approx(plain.avg_angle, rel=1e-12)
    expected = class_cosine(x, ours.W.detach(), K)[torch.arange(20), y]
    torch.testing.assert_close(ours.target_cosines(x, y), expected)


def test_plain_subclass_rejects_fused_only_options() -> None:
    """A subclass that redefines ``cosine`` without restating ``fused_logits`` is plain."""
    loss = PlainSubCenter(C, D, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size and sample_rate are not supported"):
        loss(torch.randn(3, D), torch.tensor([0, 1, 2]))


def test_get_outliers_refuses_an_angle_beyond_pi_naming_degrees() -> None:
    _, ours = _pair()
    x, y = torch.randn(6, D), torch.arange(6) % 2
    with pytest.raises(ValueError, match=r"\[0, pi\].*math.radians\(75"):
        ours.get_outliers(x, y, threshold=75)
