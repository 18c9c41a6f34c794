"""Corners found by review (2026-12-01, third session): Center loss distances that overflow
from finite input, and PML's derived Circle loss attributes."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.losses import CircleLoss as PMLCircleLoss
from pytorch_metric_learning.reducers import DoNothingReducer, SumReducer

import pml_margins
from pml_margins.losses import CenterLoss, CircleLoss


def _far_centres(update: str = "ema") -> tuple[CenterLoss, torch.Tensor, torch.Tensor]:
    loss_fn = CenterLoss(2, 4, update=update)
    with torch.no_grad():
        loss_fn.centers.fill_(-7e18)
    return loss_fn, torch.full((2, 4), 7e18, requires_grad=True), torch.tensor([0, 1])


@pytest.mark.parametrize("update", ["ema", "sgd"])
def test_center_distances_overflowing_from_finite_input_are_refused(update):
    # 1/2 |x - c|^2 = 2 * (1.4e19)^2 overflows float32 although x and c are finite
    loss_fn, x, y = _far_centres(update)
    before = loss_fn.centers.detach().clone()
    with pytest.raises(ValueError, match=r"CenterLoss gave non-finite losses.*0\.5 \|x - c\|\^2"):
        loss_fn(x, y)
    assert torch.equal(loss_fn.centers.detach(), before)  # a refused step moves no centre


def test_center_mean_that_overflows_is_refused_as_the_reduction():
    # each row 1/2 (1.5e19)^2 = 1.1e38 fits float32, their sum does not
    x, y = torch.full((4, 1), 1.5e19), torch.arange(4)
    with pytest.raises(ValueError, match="CenterLoss's reduced loss is not finite"):
        CenterLoss(4, 1, reducer=SumReducer())(x, y)


def test_center_rows_checked_when_the_reducer_returns_them():
    x, y = torch.tensor([[3e19], [1.0]]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="CenterLoss gave non-finite losses"):
        CenterLoss(2, 1, reducer=DoNothingReducer())(x, y)


def test_center_huge_embeddings_near_their_centres_are_not_refused():
    # |x|^2 overflows float32, |x - c|^2 does not: no norm is taken, the loss is exact
    x = torch.full((2, 8), 1e19) + torch.tensor([[0.0] * 7 + [3e12], [0.0] * 8])
    y = torch.tensor([0, 1])
    loss_fn = CenterLoss(2, 8, update="sgd")
    with torch.no_grad():
        loss_fn.centers.fill_(1e19)
    got = loss_fn(x.requires_grad_(), y)
    want = 0.5 * ((x.detach().double() - loss_fn.centers.detach().double()) ** 2).sum(1).mean()
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-6)


def test_center_result_check_is_off_with_the_value_checks():
    loss_fn, x, y = _far_centres()
    with pml_margins.value_checks(False):
        assert torch.isinf(loss_fn(x, y))


@pytest.mark.parametrize("m", [0.0, 0.25, 0.4, 0.5])
def test_circle_has_pmls_derived_attributes(m):
    ours, pml = CircleLoss(m=m, gamma=80), PMLCircleLoss(m=m, gamma=80)
    for name in ("op", "on", "delta_p", "delta_n"):
        assert getattr(ours, name) == getattr(pml, name), name
    assert ours._record_these == pml._record_these
    assert ours.state_dict().keys() == pml.state_dict().keys() == set()


def test_circle_derived_attributes_follow_the_margin():
    loss_fn = CircleLoss(m=0.4)
    loss_fn.m = 0.1  # e.g. set by a schedule
    assert (loss_fn.op, loss_fn.on, loss_fn.delta_p, loss_fn.delta_n) == (1.1, -0.1, 0.9, 0.1)
    with pytest.raises(AttributeError, match=r"op is 1 \+ m, derived from m.*set m instead"):
        loss_fn.op = 2.0
    with pytest.raises(AttributeError, match="delta_n is m, derived from m"):

        class DecoupledOptima(CircleLoss):  # PML's loss reads an assigned op; this one
            def __init__(self) -> None:  # computes it from m: refused, not ignored
                super().__init__()
                self.delta_n = 0.1

        DecoupledOptima()


def test_center_update_of_large_close_values_keeps_the_centres_finite():
    # n c - sum x overflowed: an accepted step left NaN centres (its state dict then refused)
    loss_fn = CenterLoss(3, 4)
    with torch.no_grad():
        loss_fn.centers.fill_(3e38)
    assert loss_fn(torch.full((2, 4), 3e38), torch.tensor([0, 0])).item() == 0
    assert torch.equal(loss_fn.centers[0], torch.full((4,), 3e38))
    CenterLoss(3, 4).load_state_dict(loss_fn.state_dict())


def test_center_update_beyond_the_buffers_range_is_refused_before_it_moves():
    # float64 embeddings beyond float32's range: a finite loss, but inf float32 centres
    loss_fn = CenterLoss(3, 4)
    x = torch.full((2, 4), 1e40, dtype=torch.float64)  # the new centres: 3.3e39
    with pytest.raises(ValueError, match=r"center update left torch\.float32's range"):
        loss_fn(x, torch.tensor([0, 0]))
    assert torch.equal(loss_fn.centers, torch.zeros(3, 4))


def _raw_cosine():
    from pytorch_metric_learning.distances import CosineSimilarity

    distance = CosineSimilarity()
    distance.normalize_embeddings = False  # (set in place: PML's constructor fixes it True)
    return distance


def test_circle_with_a_cosine_that_does_not_normalize_takes_raw_dot_products_as_pml():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (8,), generator=g)
    ours, pml = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = CircleLoss(m=0.4, gamma=80, distance=_raw_cosine())(ours, y)
    want = PMLCircleLoss(m=0.4, gamma=80, distance=_raw_cosine())(pml, y)
    (got + want).backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours.grad, pml.grad)
    normalized = CircleLoss(m=0.4, gamma=80)(x, y)
    assert not torch.isclose(got, normalized)  # (the fast path normalized them before)


def test_circle_raw_dot_products_that_overflow_are_refused():
    x, y = torch.randn(8, 4) * 1e10, torch.arange(8) % 3
    with pytest.raises(ValueError, match="does not give L2 cosines"):
        CircleLoss(distance=_raw_cosine())(x, y)


@pytest.mark.parametrize("power", [0.5, 3])
def test_circle_with_a_power_that_leaves_the_cosines_reads_its_result_back(power):
    loss_fn = CircleLoss(m=0.4, gamma=80)
    loss_fn.distance.power = power  # (in place; 0.5 of a negative cosine: NaN)
    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(1)), torch.arange(10) % 3
    if power == 0.5:
        with pytest.raises(ValueError, match="does not give L2 cosines"):
            loss_fn(x, y)  # (AvgNonZeroReducer dropped the NaN rows: a silent 0.0)
    else:
        pml = PMLCircleLoss(m=0.4, gamma=80)
        pml.distance.power = power
        torch.testing.assert_close(loss_fn(x, y), pml(x, y))


@pytest.mark.parametrize("loss_name", ["NormSoftmaxLoss", "SoftmaxLoss"])
def test_a_similarity_made_a_distance_in_place_is_negated_as_in_pml(loss_name):
    import pytorch_metric_learning.losses as pml_losses

    import pml_margins.losses as ours_losses

    ours = getattr(ours_losses, loss_name)(5, 4).double()
    if loss_name == "NormSoftmaxLoss":
        pml = pml_losses.NormalizedSoftmaxLoss(5, 4, temperature=1 / ours.scale).double()
        with torch.no_grad():
            pml.W.copy_(ours.W)
    for distance in (ours.distance, pml.distance if loss_name == "NormSoftmaxLoss" else None):
        if distance is not None:
            distance.is_inverted = False
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(8, 4, dtype=torch.float64, generator=g),
        torch.randint(0, 5, (8,), generator=g),
    )
    got = ours(x, y)
    # the loss's own logits (PML's rule: a distance's values negated) give the same loss
    want = torch.nn.functional.cross_entropy(ours.get_logits(x), y)
    torch.testing.assert_close(got, want)
    if loss_name == "NormSoftmaxLoss":
        torch.testing.assert_close(got, pml(x, y))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: setattr(d, "power", 1),
        lambda d: setattr(d, "normalize_embeddings", True),
        lambda d: setattr(d, "p", 1),
    ],
)
def test_center_distance_changed_in_place_is_refused_at_the_forward(change):
    loss_fn = CenterLoss(3, 4).eval()
    change(loss_fn.distance)
    with pytest.raises(TypeError, match="distance may only be LpDistance"):
        loss_fn(torch.randn(6, 4), torch.arange(6) % 3)
    loss_fn.distance = torch.nn.Identity()  # replaced outright
    with pytest.raises(TypeError, match="got Identity"):
        loss_fn(torch.randn(6, 4), torch.arange(6) % 3)


def test_a_similarity_not_inverted_keeps_the_fused_modes_of_the_margin_losses():
    # PML's ArcFace, CosFace, SphereFace read no is_inverted: only Softmax and NSL negate
    from pml_margins.losses import ArcFaceLoss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    plain = ArcFaceLoss(5, 6).double()
    chunked = ArcFaceLoss(5, 6, chunk_size=2).double()
    chunked.load_state_dict(plain.state_dict())
    for loss_fn in (plain, chunked):
        loss_fn.distance.is_inverted = False
    torch.testing.assert_close(chunked(x, y), plain(x, y))


@pytest.mark.parametrize("loss_name", ["NormSoftmaxLoss", "SoftmaxLoss"])
def test_a_raw_inner_product_not_inverted_takes_no_norm(loss_name):
    from pytorch_metric_learning.distances import DotProductSimilarity

    import pml_margins.losses as ours_losses

    kwargs = {"bias": False} if loss_name == "SoftmaxLoss" else {}
    loss_fn = getattr(ours_losses, loss_name)(
        5, 3, distance=DotProductSimilarity(normalize_embeddings=False), **kwargs
    )
    loss_fn.distance.is_inverted = False
    x, y = torch.randn(4, 3) * 1e19, torch.tensor([0, 1, 2, 3])  # |x|^2 overflows float32
    got = loss_fn(x, y)  # (refused as a row whose norm a normalization would take)
    want = torch.nn.functional.cross_entropy(loss_fn.get_logits(x.double()), y)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-4)


def test_circle_with_a_hook_on_its_distance_reads_its_result_back():
    from pytorch_metric_learning.distances import CosineSimilarity

    distance = CosineSimilarity()
    distance.register_forward_hook(lambda module, inputs, out: out * 1e200)
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="does not give L2 cosines"):
        CircleLoss(m=0.4, gamma=80, distance=distance)(x, torch.arange(12) % 3)


def test_nsl_records_no_angle_from_negated_cosines():
    import math

    from pml_margins.losses import NormSoftmaxLoss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 7, (9,), generator=g)
    loss_fn = NormSoftmaxLoss(7, 5, collect_stats=True).double()
    loss_fn.distance.is_inverted = False  # (logits: the cosines negated)
    loss_fn(x, y)
    w = torch.nn.functional.normalize(loss_fn.W.detach(), dim=0)
    cosines = (torch.nn.functional.normalize(x, dim=1) @ w)[torch.arange(9), y]
    true_angle = math.degrees(torch.acos(cosines).mean().item())
    assert getattr(loss_fn, "avg_angle", 0) != pytest.approx(180 - true_angle)


def test_circle_with_a_hook_that_removes_itself_is_still_checked():
    from pytorch_metric_learning.distances import CosineSimilarity

    distance, handle = CosineSimilarity(), {}

    def once(module, inputs, out):
        handle["hook"].remove()
        return out * 1e200

    handle["hook"] = distance.register_forward_hook(once)
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="does not give L2 cosines"):
        CircleLoss(m=0.4, gamma=80, distance=distance)(x, torch.arange(12) % 3)


def test_nsl_records_no_angle_through_a_hooked_distance():
    from pml_margins.losses import NormSoftmaxLoss

    loss_fn = NormSoftmaxLoss(7, 5, collect_stats=True).double()
    loss_fn.distance.register_forward_hook(lambda module, inputs, out: -out)
    assert not loss_fn.logits_are_cosines
