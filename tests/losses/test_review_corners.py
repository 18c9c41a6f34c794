"""Corners found by review: cosines beyond [-1, 1], meta tensors, zero-width rows, Circle
under forward-mode AD, duplicate positive keys."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import CosineSimilarity

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.functional import (
    angle_cosine,
    arcface_target,
    arcface_value_and_slope,
    circle_loss_dense_negatives,
    combined_margin_target,
    sphereface_psi,
    sphereface_value_and_slope,
)
from pml_margins.losses import (
    AdaCosLoss,
    AdaFaceLoss,
    ArcFaceLoss,
    CenterLoss,
    CircleLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    CurricularFaceLoss,
    ElasticFaceLoss,
    MagFaceLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from tests.losses.specs import SPEC_IDS, SPECS

MARGIN = 0.5
BEYOND = torch.tensor([-2.5, -1.0 - 1e-9, -1.0, -0.3, 0.0, 0.7, 1.0, 1.0 + 1e-9, 3.0])


def _arcface_by_angle(cosine: torch.Tensor, margin: float) -> torch.Tensor:
    """float64 ArcFace target from the angle, PML's way: theta = acos(clip(c, -1, 1)),
    cos(theta + m) where theta + m <= pi, else cos(theta) - m sin(m)."""
    theta = torch.acos(cosine.double().clamp(-1, 1))
    fallback = torch.cos(theta) - margin * math.sin(margin)
    return torch.where(theta <= math.pi - margin, torch.cos(theta + margin), fallback)


def _assert_equal_to_pml(ours, pml, x: torch.Tensor, y: torch.Tensor) -> None:
    """Same value, x gradient and W gradient (both losses hold the same W)."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours_value, pml_value = ours(x1, y), pml(x2, y)
    ours_value.backward()
    pml_value.backward()
    torch.testing.assert_close(ours_value, pml_value)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ours.W.grad, pml.W.grad)


def test_angle_targets_take_the_nearest_angle_beyond_the_cosine_range():
    """A cosine beyond [-1, 1] has no angle: the additive angular targets are evaluated
    at 0 or pi (PML's clamp), with no gradient there; inside, unchanged."""
    c = BEYOND.double()
    torch.testing.assert_close(arcface_target(c, MARGIN), _arcface_by_angle(c, MARGIN))
    torch.testing.assert_close(
        combined_margin_target(c, 1.0, MARGIN, 0.1), _arcface_by_angle(c, MARGIN) - 0.1
    )
    value, slope = arcface_value_and_slope(c, MARGIN)
    torch.testing.assert_close(value, arcface_target(c, MARGIN))
    outside = c.abs() > 1
    assert (slope[outside] == 0).all()
    leaf = c[~outside].clone().requires_grad_()
    (grad,) = torch.autograd.grad(arcface_target(leaf, MARGIN).sum(), leaf)
    torch.testing.assert_close(slope[~outside], grad)
    assert torch.equal(angle_cosine(c), c.clamp(-1, 1))


def test_sphereface_keeps_pmls_form_beyond_the_cosine_range():
    """SphereFace's psi stays PML's LargeMarginSoftmaxLoss form there (the polynomial at
    the given cosine, k from the clamped angle): clamping it too (a first version of the
    ArcFace fix) moved the loss away from PML's (9.2676 vs 9.2118)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    distance = CosineSimilarity(p=3, power=2)
    for margin in (3, 4):
        ours = SphereFaceLoss(5, 8, margin=margin, distance=distance).double()
        pml = pml_losses.SphereFaceLoss(5, 8, margin=margin, scale=1, distance=distance).double()
        pml.load_state_dict(ours.state_dict())
        cos = distance(x, ours.W.t())[torch.arange(24), y]
        assert (cos > 1).any()  # the case under test is there
        _assert_equal_to_pml(ours, pml, x, y)
    c = BEYOND.double()
    value, slope = sphereface_value_and_slope(c, 4)
    torch.testing.assert_close(value, sphereface_psi(c, 4))
    leaf = c.clone().requires_grad_()
    (grad,) = torch.autograd.grad(sphereface_psi(leaf, 4).sum(), leaf)
    torch.testing.assert_close(slope, grad)


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5])
def test_sphereface_below_minus_one_takes_pmls_region(margin: int):
    """Below -1 (CosineSimilarity(p=3)) the region is PML's, k = m from the clamped angle:
    capped at m - 1 the loss was 295.25 where PML's is 0.0 (a row opposite its class, m = 4);
    at -1 itself the value is the same either way and the slope stays increasing."""
    w = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w[:, 0] = 1.0
    x = torch.cat([-torch.ones(2, 8), torch.randn(30, 8, generator=torch.Generator())]).double()
    y = torch.cat([torch.zeros(2, dtype=torch.long), torch.randint(0, 3, (30,))])
    distance = CosineSimilarity(p=3)
    ours = SphereFaceLoss(3, 8, margin=margin, distance=distance).double()
    pml = pml_losses.SphereFaceLoss(3, 8, margin=margin, distance=distance).double()
    with torch.no_grad():
        ours.W.copy_(w)
        pml.W.copy_(w)
    assert (distance(x, w.t())[torch.arange(32), y] < -1).sum() >= 2  # the case under test
    _assert_equal_to_pml(ours, pml, x, y)
    c = torch.tensor([-3.0, -1.0 - 1e-9, -1.0, -1.0 + 1e-9], dtype=torch.float64)
    k = torch.tensor([margin, margin, margin - 1, margin - 1], dtype=torch.float64)
    chebyshev = torch.cos(margin * torch.acos(c.clamp(-1, 1)))  # T_m on [-1, 1]
    expected = (-1) ** k * torch.where(c < -1, _chebyshev(c, margin), chebyshev) - 2 * k
    value, slope = sphereface_value_and_slope(c, margin)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(sphereface_psi(c, margin), expected)
    assert slope[2] > 0  # at -1: (-1)^(m-1) m U_(m-1)(-1) = m^2


def _chebyshev(c: torch.Tensor, m: int) -> torch.Tensor:
    """T_m(c) by its recurrence (any c)."""
    prev, curr = torch.ones_like(c), c
    for _ in range(m - 1):
        prev, curr = curr, 2 * c * curr - prev
    return curr


def _p3_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    cos = CosineSimilarity(p=3)(x, w.t())
    assert (cos[torch.arange(24), y].abs() > 1).any()  # the case under test is there
    return x, w, y


@pytest.mark.parametrize(
    "ours",
    [
        lambda: ArcFaceLoss(5, 8, margin=MARGIN, scale=4.0, distance=CosineSimilarity(p=3)),
        lambda: CombinedMarginLoss(5, 8, 1.0, MARGIN, 0.0, 4.0, distance=CosineSimilarity(p=3)),
        lambda: ElasticFaceLoss(5, 8, MARGIN, 0.0, 4.0, distance=CosineSimilarity(p=3)),
        lambda: SubCenterArcFaceLoss(5, 8, MARGIN, 4.0, 1, distance=CosineSimilarity(p=3)),
    ],
    ids=["arcface", "combined", "elastic", "subcenter"],
)
def test_arcface_family_with_a_non_l2_cosine_equals_pml(ours):
    """CosineSimilarity(p=3) gives "cosines" beyond 1: ours took cos(theta + m) of them
    as c cos m - sin m sqrt(1 - c^2) (0.0231 vs PML's 0.0547 on one case; dL 0.27 on a
    batch); PML's ArcFace clamps to the angle 0 or pi."""
    x, w, y = _p3_batch()
    loss = ours().double()
    pml = pml_losses.ArcFaceLoss(
        5, 8, margin=math.degrees(MARGIN), scale=4.0, distance=CosineSimilarity(p=3)
    ).double()
    with torch.no_grad():
        loss.W.copy_(w)
        pml.W.copy_(w)
    _assert_equal_to_pml(loss, pml, x, y)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_a_meta_loss_is_refused_before_it_computes(spec):
    """A loss on the meta device with CPU embeddings returned uninitialized numbers
    (torch.mm of a CPU and a meta tensor gives a CPU tensor: 3e27 for ArcFace); meta
    embeddings raised NotImplementedError from the value read-back."""
    loss = spec.build(6, 8).to("meta")
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="meta device"):
        loss(x, y)
    with pytest.raises(ValueError, match="meta device"):
        loss.get_logits(x)
    for reader in (loss.cosine, loss.weights_for):  # the public readers of W (a first
        with pytest.raises(ValueError, match="meta device"):  # fix checked the forward's
            reader(x)  # entry only: a sharded loss on meta still returned numbers)
    with pytest.raises(ValueError, match="meta device"):
        loss.target_cosines(x, y)
    with pytest.raises(ValueError, match="meta device"):
        spec.build(6, 8)(x.to("meta"), y.to("meta"))
    sharded = ShardedMarginSoftmaxLoss(spec.cls, 6, 8, rank=0, world_size=1, **spec.kwargs)
    with pytest.raises(ValueError, match="class weights W: a tensor on the meta device"):
        sharded.to("meta")(x, y)


def test_center_and_circle_refuse_meta_tensors():
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="centers: a tensor on the meta device"):
        CenterLoss(3, 4).to("meta")(x, y)
    with pytest.raises(ValueError, match="embeddings: a tensor on the meta device"):
        CircleLoss()(x.to("meta"), y.to("meta"))
    with pytest.raises(ValueError, match="meta device"):
        CosFaceLoss(3, 4)(x.to("meta"), y.to("meta"))


def test_zero_width_embeddings_are_refused():
    """CircleLoss on (4, 0) embeddings returned 224.69 (every cosine 0)."""
    with pytest.raises(ValueError, match="width 0"):
        CircleLoss()(torch.zeros(4, 0), torch.tensor([0, 0, 1, 1]))


def test_circle_loss_under_forward_mode_ad_gives_the_directional_derivative():
    """A usual batch (few positives per anchor) took the dense-negatives path, whose
    hand-written backward refused forward-mode AD with a ValueError."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    tangent = torch.randn(32, 8, generator=g, dtype=torch.float64)
    y = torch.arange(32) % 8
    loss = CircleLoss()
    with fwAD.dual_level():
        dual = loss(fwAD.make_dual(x, tangent), y)
        forward = fwAD.unpack_dual(dual).tangent
    leaf = x.clone().requires_grad_()
    loss(leaf, y).backward()
    torch.testing.assert_close(forward, (leaf.grad * tangent).sum())


def test_dense_negatives_refuses_duplicate_positive_keys():
    """Each duplicate positive key counted once more (every loss high by log 2)."""
    sim = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pos = torch.zeros(4, 5, dtype=torch.bool)
    pos[:, 0] = True
    keys = pos.view(-1).nonzero().squeeze(1)
    with pytest.raises(ValueError, match="duplicates"):
        circle_loss_dense_negatives(sim, ~pos, torch.cat([keys, keys]), 0.25, 256)


def test_meta_arguments_of_the_functional_entry_points_are_named():
    """bias, scale, target_cosines, masks and margin tensors on the meta device raised
    torch's device errors or NotImplementedError (a SoftmaxLoss bias too)."""
    from pml_margins.functional import (
        circle_loss_dense,
        fused_margin_softmax_cross_entropy,
        margin_softmax_cross_entropy,
    )
    from pml_margins.losses import SoftmaxLoss

    x, w, y = torch.randn(4, 8), torch.randn(8, 6), torch.tensor([0, 1, 2, 3])
    meta = {"device": "meta"}
    eye = torch.eye(4, dtype=torch.bool)
    calls = {
        "bias": lambda: fused_margin_softmax_cross_entropy(
            x, w, y, None, 30.0, bias=torch.zeros(6, **meta)
        ),
        "scale": lambda: fused_margin_softmax_cross_entropy(x, w, y, None, torch.ones(4, **meta)),
        "target_cosines": lambda: fused_margin_softmax_cross_entropy(
            x, w, y, None, 30.0, target_cosines=torch.zeros(4, **meta), chunk_size=2
        ),
        "scale ": lambda: margin_softmax_cross_entropy(
            torch.randn(4, 6), y, None, torch.ones(4, **meta)
        ),
        "pos_mask": lambda: circle_loss_dense(torch.rand(4, 4), eye.to("meta"), ~eye, 0.25, 64),
        "margin": lambda: arcface_target(torch.rand(4), torch.tensor(0.5, **meta)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name.strip()}: a tensor on the meta device"):
            call()
    loss = SoftmaxLoss(6, 8)
    loss.bias = torch.nn.Parameter(torch.zeros(6, **meta))
    with pytest.raises(ValueError, match="SoftmaxLoss's bias: a tensor on the meta device"):
        loss(x, y)


@pytest.mark.parametrize(
    ("make", "key", "value", "match"),
    [
        (lambda: AdaCosLoss(5, 4, dynamic=False), "scale", math.nan, "scale must be finite"),
        (lambda: AdaCosLoss(5, 4), "scale", -3.0, "scale must be > 0"),
        (lambda: AdaCosLoss(5, 4), "scale", 0.0, "scale must be > 0"),
        (lambda: AdaFaceLoss(5, 4), "batch_std", math.nan, "non-finite batch_std"),
        (lambda: AdaFaceLoss(5, 4), "batch_std", -1.0, "batch_std must be >= 0"),
        (lambda: AdaFaceLoss(5, 4), "batch_mean", math.inf, "non-finite batch_mean"),
        (lambda: CurricularFaceLoss(5, 4), "t", math.nan, "non-finite t"),
        (lambda: CenterLoss(5, 4), "centers", math.nan, "non-finite centers"),
    ],
)
def test_a_state_dict_cannot_load_a_statistic_that_breaks_the_loss(make, key, value, match):
    """load_state_dict copied any value into the running statistics (a NaN scale: NaN
    losses; -3: an inverted softmax, 2.19), where the setter and assign=True refused it."""
    loss = make()
    state = loss.state_dict()
    before = state[key].clone()
    state[key] = torch.full_like(state[key], value)
    with pytest.raises(ValueError, match=match):
        loss.load_state_dict(state)
    assert torch.equal(loss.state_dict()[key], before)  # nothing loaded
    state[key] = before + 1.0  # a valid value loads
    loss.load_state_dict(state)
    assert torch.equal(loss.state_dict()[key], before + 1.0)


def test_norm_hyper_parameters_beyond_float32_are_refused():
    """MagFace u_a = 1e39 failed in clamp (float32 overflow), l_a = 1e-50 gave an inf loss
    for a zero row; AdaFace h = 1e39 gave NaN (0 * inf)."""
    for make, name in [
        (lambda: MagFaceLoss(5, 4, u_a=1e39), "u_a"),
        (lambda: MagFaceLoss(5, 4, l_a=1e-50), "l_a"),
        (lambda: AdaFaceLoss(5, 4, h=1e39), "h"),  # (1e20 is valid: test_bad_input.py)
    ]:
        with pytest.raises(ValueError, match=f"{name} must lie in"):
            make()


def test_an_integer_statistic_is_checked_too():
    """An int64 scale of -5 skipped the (floating-only) check and loaded as -5.0."""
    loss = AdaCosLoss(5, 4)
    state = loss.state_dict()
    state["scale"] = torch.tensor(-5)
    with pytest.raises(ValueError, match="scale must be > 0"):
        loss.load_state_dict(state)
    adaface = AdaFaceLoss(5, 4)
    state = adaface.state_dict()
    state["batch_std"] = torch.tensor(-3)
    with pytest.raises(ValueError, match="batch_std must be >= 0"):
        adaface.load_state_dict(state)


def test_a_refused_sharded_load_changes_nothing():
    """The sharded loss loaded its sampler state before its inner loss refused a NaN
    scale; load_into restored the shard's hyper-parameters before the refusal."""
    import copy

    from pml_margins.distributed import load_into, shard_checkpoint

    sharded = ShardedMarginSoftmaxLoss(AdaCosLoss, 100, 4, sample_rate=0.5, rank=0, world_size=1)
    before = copy.deepcopy(sharded.state_dict())
    state = copy.deepcopy(before)
    state["loss.scale"] = torch.tensor(math.nan, dtype=torch.float64)
    sharded(torch.randn(8, 4), torch.randint(0, 100, (8,)))  # the sampler moves on
    moved = copy.deepcopy(sharded.state_dict())
    with pytest.raises(ValueError, match="scale must be finite"):
        sharded.load_state_dict(state)
    after = sharded.state_dict()
    sampler_states = (s["_extra_state"]["sampler_state"] for s in (after, moved, before))
    now, then, initial = sampler_states
    assert torch.equal(now, then) and not torch.equal(now, initial)
    assert torch.equal(after["loss.scale"], moved["loss.scale"])

    adaface = ShardedMarginSoftmaxLoss(AdaFaceLoss, 10, 4, margin=0.4, rank=0, world_size=1)
    shard = shard_checkpoint(adaface)
    shard["loss_kwargs"]["margin"] = 0.3
    shard["state_dict"]["batch_std"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="batch_std must be >= 0"):
        load_into(adaface, shard)
    assert adaface.loss.margin == 0.4


def test_a_sharded_elasticface_keeps_no_process_group():
    """The inner loss held a broadcast bound to the process group: deepcopy and pickle of
    it failed on a subgroup (ProcessGroup does not pickle)."""
    import copy
    import pickle

    sharded = ShardedMarginSoftmaxLoss(ElasticFaceLoss, 10, 4, rank=0, world_size=1)
    sharded(torch.randn(6, 4), torch.arange(6))
    assert sharded.loss.share_draws is None and sharded.loss.last_margins is not None
    pickle.dumps(sharded.loss)
    copy.deepcopy(sharded.loss)


def test_circle_with_class_weights_is_the_class_weighted_mean():
    """Documented difference: PML's (B, 1) per-anchor losses broadcast against the
    weights (a B x B mean); ours are (B,), so the reducer gives the weighted mean."""
    from pytorch_metric_learning.reducers import ClassWeightedReducer, DoNothingReducer

    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    weights = torch.tensor([1.0, 2.0, 3.0, 0.5])
    losses = CircleLoss(m=0.4, gamma=80, reducer=DoNothingReducer())(x, y)["loss"]["losses"]
    assert losses.shape == (16,)
    weighted = CircleLoss(m=0.4, gamma=80, reducer=ClassWeightedReducer(weights))(x, y)
    torch.testing.assert_close(weighted, (losses * weights[y]).mean())


def test_complex_statistics_are_refused_and_assigned_ones_stay_float():
    """A complex NaN t loaded (its real part copied, unchecked); with assign=True an int64
    or bfloat16 statistic replaced the float buffer, where a moving average stalls (an
    int64 t stayed 0 over 50 steps)."""
    loss = CurricularFaceLoss(10, 4)
    state = loss.state_dict()
    with pytest.raises(ValueError, match="t must be real"):
        loss.load_state_dict({**state, "t": torch.tensor(complex(math.nan, 0))})
    for dtype in (torch.int64, torch.bfloat16):
        for assign in (False, True):
            fresh = CurricularFaceLoss(10, 4)
            fresh.load_state_dict({**state, "t": torch.tensor(0).to(dtype)}, assign=assign)
            assert fresh.t.dtype == torch.float32 or fresh.t.dtype == state["t"].dtype
            assert fresh.t.is_floating_point() and fresh.t.dtype != torch.bfloat16
    adaface = AdaFaceLoss(5, 4)
    adaface.load_state_dict({**adaface.state_dict(), "batch_mean": torch.tensor(20)}, assign=True)
    adaface(torch.randn(6, 4) * 30, torch.arange(6) % 5)
    assert adaface.batch_mean.is_floating_point() and float(adaface.batch_mean) != 20.0


def test_statistics_are_checked_as_they_will_be_held():
    """1e300 checked in float64 loaded as inf into a float32 buffer (NaN losses); 1e-300
    as an AdaCos scale of 0 in a half loss (a constant loss), also set as a number; an
    int scale under assign=True failed mid-load after W was replaced; a statistic with a
    graph loaded and failed in the next forward's in-place update."""
    curricular = CurricularFaceLoss(5, 4)
    with pytest.raises(ValueError, match=r"non-finite t|t must lie in \[-1, 1\]"):
        curricular.load_state_dict(
            {**curricular.state_dict(), "t": torch.tensor(1e300, dtype=torch.float64)}
        )
    with pytest.raises(ValueError, match="non-finite centers"):
        CenterLoss(5, 4).load_state_dict(
            {"centers": torch.full((5, 4), 1e300, dtype=torch.float64)}
        )
    half = AdaCosLoss(5, 4, dynamic=False).half()
    with pytest.raises(ValueError, match="scale must be > 0"):
        half.load_state_dict({**half.state_dict(), "scale": torch.tensor(1e-300).double()})
    with pytest.raises(ValueError, match="scale must be > 0"):
        half.scale = 1e-300
    adacos = AdaCosLoss(5, 4)
    adacos.load_state_dict({"W": torch.zeros(4, 5), "scale": torch.tensor(5)}, assign=True)
    assert adacos.scale.dtype == torch.float32 and float(adacos.scale) == 5.0
    curricular.load_state_dict(
        {**curricular.state_dict(), "t": torch.tensor(0.1, requires_grad=True)}, assign=True
    )
    assert not curricular.t.requires_grad
    curricular(torch.randn(6, 4), torch.arange(6) % 5)  # the in-place update runs


@pytest.mark.parametrize("mode", [{}, {"chunk_size": 2}], ids=["default", "chunked"])
def test_a_raw_dot_product_takes_rows_whose_squared_norm_overflows(mode) -> None:
    """SoftmaxLoss's logits ``x . w + b`` take no norm: a float32 row of norm 2e19 (its
    square overflows) has finite logits, and the loss is plain cross-entropy's (it was
    refused: "normalizing it gives a wrong number"). Where the loss normalizes the rows
    the refusal stays."""
    from pytorch_metric_learning.distances import DotProductSimilarity

    from pml_margins.losses import NormSoftmaxLoss, SoftmaxLoss

    torch.manual_seed(0)
    x, y = torch.randn(4, 8) * 1e-3, torch.tensor([0, 1, 2, 3])
    x[0, 0] = 2e19
    loss = SoftmaxLoss(5, 8, **mode)
    expected = torch.nn.functional.cross_entropy(x.double() @ loss.W.double() + loss.bias, y)
    torch.testing.assert_close(loss(x, y).double(), expected, rtol=1e-5, atol=0)
    raw = DotProductSimilarity(normalize_embeddings=False)
    nsl = NormSoftmaxLoss(5, 8, scale=20.0, distance=raw, **mode)
    reference = pml_losses.NormalizedSoftmaxLoss(5, 8, distance=raw)
    reference.load_state_dict(nsl.state_dict())
    torch.testing.assert_close(nsl(x, y), reference(x, y))
    for normalized in (CosFaceLoss(5, 8, **mode), NormSoftmaxLoss(5, 8, **mode)):
        with pytest.raises(ValueError, match=r"row 0 has norm .*: its square overflows"):
            normalized(x, y)


def test_a_random_parametrization_of_w_is_drawn_once_per_forward() -> None:
    """A DropConnect-style parametrization of ``W`` ran at each of a forward's reads
    (CurricularFace: 4 on the default path, 6 on the plain one), and the loss matched no
    single draw (6.4476 / 5.3390 against 4.1382 for the first): one draw per call now."""
    from pml_margins import autograd_only

    draws: list[torch.Tensor] = []

    class DropConnect(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            kept = weight * (torch.rand_like(weight) > 0.3)
            draws.append(kept.detach().clone())
            return kept

    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    for plain in (False, True):
        for make in (CurricularFaceLoss, CosFaceLoss, AdaCosLoss):
            loss = make(5, 4)
            torch.nn.utils.parametrize.register_parametrization(loss, "W", DropConnect())
            fixed = make(5, 4)
            draws.clear()
            with autograd_only() if plain else contextlib.nullcontext():
                value = loss(x, y)
                assert len(draws) == 1, (make.__name__, plain)
                with torch.no_grad():
                    fixed.W.copy_(draws[0])
                torch.testing.assert_close(value, fixed(x, y))


def test_compiled_code_sees_the_methods_python_sees() -> None:
    """``getattr(bound, "__func__", None)`` gave ``None`` under torch.compile: every loss's
    logits looked redefined there (a compiled forward took the plain path), and SphereFace's
    norm scale undeclared."""
    from pml_margins.losses.class_weight_loss import _BASE_METHODS, _redefined

    def flags(loss) -> list[bool]:
        hooks = [_redefined(loss, name) for name in _BASE_METHODS]
        return [loss._logits_redefined(), loss._fused_form(torch.zeros(2, 4)) is None, *hooks]

    for loss in (ArcFaceLoss(3, 4), SphereFaceLoss(3, 4), AdaCosLoss(3, 4)):
        for patched in (False, True):
            if patched:
                loss.base_logits = lambda embeddings: None
            compiled = torch.compile(lambda loss=loss: flags(loss), backend="eager")
            torch._dynamo.reset()
            assert compiled() == flags(loss), (type(loss).__name__, patched)
            assert flags(loss)[0] is patched


@pytest.mark.parametrize("mode", [{}, {"chunk_size": 2}, {"sample_rate": 0.5}])
def test_a_w_that_does_not_fit_the_loss_is_refused_before_anything_changes(mode) -> None:
    """``loss.W`` of another width trained an 11-way softmax on a 10-class loss; a
    narrower one (or ``num_classes`` raised) failed in an index error; AdaFace moved its
    statistics before failing."""
    x, y = 3 * torch.randn(16, 8), torch.randint(0, 10, (16,))
    for make in (ArcFaceLoss, AdaFaceLoss, SubCenterArcFaceLoss):
        for shape in ((8, 11), (8, 9), (9, 10)):
            loss = make(10, 8, **mode)
            before = {k: v.clone() for k, v in loss.state_dict().items() if k != "W"}
            loss.W = torch.nn.Parameter(torch.randn(*shape))
            with pytest.raises(ValueError, match=r"class weights W have shape .* need \(8, "):
                loss(x, y)
            after = {k: v for k, v in loss.state_dict().items() if k != "W"}
            assert all(torch.equal(before[k], after[k]) for k in before)
            with pytest.raises(ValueError, match="class weights W have shape"):
                loss.get_logits(x)
        loss = make(10, 8, **mode)
        loss.num_classes = 20
        with pytest.raises(ValueError, match=r"num_classes=20 need \(8, "):
            loss(x, torch.full((16,), 15))


def test_elasticface_margin_none_is_the_papers_for_the_variant() -> None:
    """The constructor takes ``margin=None`` (the paper's for the variant); the setter
    refused it with a TypeError."""
    loss = ElasticFaceLoss(5, 4, margin=0.3, variant="cos")
    loss.margin = None
    assert loss.margin == ElasticFaceLoss(5, 4, variant="cos").margin == 0.35
    loss = ElasticFaceLoss(5, 4, margin=0.2)
    loss.margin = None
    assert loss.margin == ElasticFaceLoss(5, 4).margin == 0.5


def _sub_centre_class(base: type) -> type:
    """A user's sub-centre loss on ``base`` per ClassWeightLoss's extension point:
    ``cosine`` takes the maximum over ``K`` columns per class, ``fused_logits`` declares
    them, and ``K`` is named ``sub_centers`` (which the check of W's shape reads)."""

    class SubCentres(base):
        def __init__(self, num_classes, embedding_size, k=2, **kwargs):
            self.sub_centers = k
            super().__init__(num_classes * k, embedding_size, **kwargs)
            self.num_classes = num_classes

        def cosine(self, embeddings):
            per_column = super().cosine(embeddings)
            return per_column.unflatten(1, (-1, self.sub_centers)).max(dim=2).values

        def fused_logits(self, embeddings):
            form = super().fused_logits(embeddings)
            k = self.sub_centers
            return None if form is None else dataclasses.replace(form, sub_centers=k)

    return SubCentres


_SubCenterCosFace = _sub_centre_class(CosFaceLoss)


def test_a_sub_centre_subclass_declared_by_fused_logits_keeps_its_wide_w() -> None:
    """The extension point: a class whose ``cosine`` takes the maximum over ``K`` columns
    per class and whose ``fused_logits`` declares ``sub_centers=K`` holds ``W`` of ``C K``
    columns; the W-shape check refused it (``need (8, 10)``)."""
    torch.manual_seed(0)
    loss = _SubCenterCosFace(10, 8)
    x, y = torch.randn(16, 8), torch.arange(16) % 10
    assert torch.isfinite(loss(x, y)) and loss.get_logits(x).shape == (16, 10)
    loss.W = torch.nn.Parameter(torch.randn(8, 21))
    with pytest.raises(ValueError, match=r"need \(8, 20\)"):
        loss(x, y)


def test_the_w_shape_check_knows_sub_centres_on_every_path() -> None:
    """With a distance that moves Sub-center ArcFace to the plain path its (D, C K) W was
    refused (``need (16, 5)``); a narrow (D, C) W passed the check and failed in an index
    error (or gave logits of C / K classes)."""
    from pytorch_metric_learning.distances import CosineSimilarity

    class MyCosine(CosineSimilarity):
        pass

    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.arange(8) % 5
    plain = SubCenterArcFaceLoss(5, 16, sub_centers=3, distance=MyCosine())
    fused = SubCenterArcFaceLoss(5, 16, sub_centers=3)
    fused.load_state_dict(plain.state_dict())
    torch.testing.assert_close(plain(x, y), fused(x, y))
    assert plain.get_logits(x).shape == (8, 5)
    for loss in (plain, fused):
        loss.W = torch.nn.Parameter(torch.randn(16, 5))
        with pytest.raises(ValueError, match="class weights W have shape"):
            loss(x, y)
        with pytest.raises(ValueError, match="class weights W have shape"):
            loss.get_logits(x)


def test_a_wide_w_is_refused_on_the_plain_path_too() -> None:
    """With a distance that moves ArcFace to the plain path a (4, 20) W on 10 classes was
    taken (a multiple of the classes): 20-way logits."""
    from pytorch_metric_learning.distances import CosineSimilarity

    class MyCosine(CosineSimilarity):
        pass

    loss = ArcFaceLoss(10, 4, distance=MyCosine())
    loss.W = torch.nn.Parameter(torch.randn(4, 20))
    with pytest.raises(ValueError, match=r"need \(4, 10\)"):
        loss(torch.randn(8, 4), torch.arange(8))


def test_a_declared_sub_centre_count_is_checked_for_a_narrow_w_and_sharded() -> None:
    """A user's sub-centre class (K declared by fused_logits) took a narrow (D, C) W past
    the check (index errors; get_logits gave C / K classes); the sharded loss had no check
    of W's shape at all (a wider W trained)."""
    from pml_margins.distributed import ShardedMarginSoftmaxLoss

    loss = _SubCenterCosFace(10, 8)
    loss.W = torch.nn.Parameter(torch.randn(8, 10))
    x, y = torch.randn(16, 8), torch.arange(16) % 10
    with pytest.raises(ValueError, match=r"need \(8, 20\)"):
        loss(x, y)
    with pytest.raises(ValueError, match=r"need \(8, 20\)"):
        loss.get_logits(x)
    for loss_type, kwargs, shape in (
        (ArcFaceLoss, {}, (8, 11)),
        (SubCenterArcFaceLoss, {"sub_centers": 3, "sample_rate": 0.5}, (8, 31)),
    ):
        sharded = ShardedMarginSoftmaxLoss(loss_type, 10, 8, **kwargs)
        sharded.loss.W = torch.nn.Parameter(torch.randn(*shape))
        with pytest.raises(ValueError, match="class weights W have shape"):
            sharded(x, y)


def test_a_class_whose_declaration_reads_the_steps_state_is_not_asked_before_the_step() -> None:
    """The W-shape check asked a class's own fused_logits at the forward's entry, before
    prepare_step set the state it reads (AttributeError; 20.19 before); a fused_logits
    whose __module__ is None (made by exec) crashed the check."""
    import contextlib as ctx

    class StepScaled(CosFaceLoss):
        _step_scale = None

        @ctx.contextmanager
        def prepare_step(self, embeddings, labels, statistics):
            self._step_scale = torch.full((embeddings.shape[0],), 16.0)
            try:
                yield
            finally:
                self._step_scale = None

        def logit_scale(self, embeddings):
            return self._step_scale.expand(embeddings.shape[0])

        def fused_logits(self, embeddings):
            return super().fused_logits(embeddings)

    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.arange(16) % 10
    loss = StepScaled(10, 8)
    reference = CosFaceLoss(10, 8, scale=16.0)
    reference.load_state_dict(loss.state_dict())
    torch.testing.assert_close(loss(x, y), reference(x, y))
    namespace: dict = {}
    exec("def fused_logits(self, embeddings):\n    return base(self, embeddings)", namespace)
    namespace["base"] = CosFaceLoss.fused_logits
    generated = type("Generated", (CosFaceLoss,), {"fused_logits": namespace["fused_logits"]})
    assert generated.fused_logits.__module__ is None
    loss = generated(10, 8)
    assert torch.isfinite(loss(x, y))


def test_a_wrong_w_of_a_class_with_its_own_declaration_is_refused_before_anything() -> None:
    """The entry check took any multiple of the classes for a class with a fused_logits of
    its own: the sharded loss trained a (8, 40) W for 10 classes x 2, and CurricularFace's
    t moved before the refusal; a buffer named sub_centers could not be registered."""
    from pml_margins.distributed import ShardedMarginSoftmaxLoss

    x, y = torch.randn(16, 8), torch.arange(16) % 10
    sharded = ShardedMarginSoftmaxLoss(_SubCenterCosFace, 10, 8)
    sharded.loss.W = torch.nn.Parameter(torch.randn(8, 40))
    with pytest.raises(ValueError, match=r"need \(8, 20\)"):
        sharded(x, y)

    loss = _sub_centre_class(CurricularFaceLoss)(10, 8)
    loss.W = torch.nn.Parameter(torch.randn(8, 40))
    with pytest.raises(ValueError, match=r"need \(8, 20\)"):
        loss(x, y)
    assert float(loss.t) == 0.0

    class Tagged(CosFaceLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("sub_centers", torch.tensor(1))

    assert torch.isfinite(Tagged(10, 8)(x, y))


def test_a_sub_centre_class_may_keep_its_k_under_another_name() -> None:
    """A user's sub-centre class with its own fused_logits and K kept as ``self.k`` (W of
    C K columns) worked before the exact entry check (55.21) and was refused there; a
    wrong multiple still fails where the declaration is read, sharded too."""
    from pml_margins.distributed import ShardedMarginSoftmaxLoss

    class KeptAsK(ArcFaceLoss):
        def __init__(self, num_classes, embedding_size, k=3, **kwargs):
            self.k = k
            super().__init__(num_classes * k, embedding_size, **kwargs)
            self.num_classes = num_classes

        def cosine(self, embeddings):
            return super().cosine(embeddings).unflatten(1, (-1, self.k)).max(dim=2).values

        def fused_logits(self, embeddings):
            form = super().fused_logits(embeddings)
            return None if form is None else dataclasses.replace(form, sub_centers=self.k)

    torch.manual_seed(0)
    x, y = torch.randn(12, 8), torch.arange(12) % 10
    loss = KeptAsK(10, 8)
    sharded = ShardedMarginSoftmaxLoss(KeptAsK, 10, 8)
    sharded.loss.load_state_dict(loss.state_dict())
    torch.testing.assert_close(sharded(x, y), loss(x, y))
    assert loss.get_logits(x).shape == (12, 10)
    for module in (loss, sharded.loss):
        module.W = torch.nn.Parameter(torch.randn(8, 20))
    with pytest.raises(ValueError, match=r"need \(8, 30\)"):
        loss(x, y)
    with pytest.raises(ValueError, match="class weights W have shape"):
        sharded(x, y)


def test_nsl_column_below_eps_documented_split() -> None:
    """NSL with a ``W`` column of norm below ``F.normalize``'s eps (1e-14 here): PML
    normalizes ``W`` twice (a unit column), the fused core once (divided by 1e-12), as the
    class docstring says; ``autograd_only`` follows PML, and a column at 1e-12 or above
    gives PML's value on every path (found by review: the split was undocumented)."""
    from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

    import pml_margins
    from pml_margins.losses import NormSoftmaxLoss

    torch.manual_seed(0)
    pml = NormalizedSoftmaxLoss(3, 3, temperature=0.05).double()
    ours = NormSoftmaxLoss(3, 3, scale=20.0).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    for norm, fused_equal in ((1e-14, False), (1e-12, True), (1e-3, True)):
        with torch.no_grad():
            pml.W[:, 0] *= norm / pml.W[:, 0].norm()
        ours.load_state_dict(pml.state_dict())
        want = pml(x, labels)
        with pml_margins.autograd_only():
            torch.testing.assert_close(ours(x, labels), want)
        for chunk_size in (None, 2):
            ours.chunk_size = chunk_size
            assert torch.allclose(ours(x, labels), want) is fused_equal, (norm, chunk_size)
        ours.chunk_size = None
