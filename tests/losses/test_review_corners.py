"""Corners found by review: cosines beyond [-1, 1], meta tensors, zero-width rows, Circle
under forward-mode AD, duplicate positive keys."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import CosineSimilarity

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
    ArcFaceLoss,
    CenterLoss,
    CircleLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    ElasticFaceLoss,
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


def test_angle_targets_take_the_nearest_angle_beyond_the_cosine_range():
    """A cosine beyond [-1, 1] has no angle: the angle-based targets are evaluated at 0
    or pi (PML's clamp), with no gradient there; inside, unchanged."""
    c = BEYOND.double()
    torch.testing.assert_close(arcface_target(c, MARGIN), _arcface_by_angle(c, MARGIN))
    torch.testing.assert_close(
        combined_margin_target(c, 1.0, MARGIN, 0.1), _arcface_by_angle(c, MARGIN) - 0.1
    )
    m = 4  # psi(0) = 1, psi(pi) = 1 - 2m (the paper's psi at the ends of [0, pi])
    psi = sphereface_psi(c, m)
    assert psi[0].item() == pytest.approx(1 - 2 * m) and psi[-1].item() == pytest.approx(1)
    torch.testing.assert_close(psi, sphereface_psi(angle_cosine(c), m))
    for value_and_slope, target in [
        (lambda z: arcface_value_and_slope(z, MARGIN), lambda z: arcface_target(z, MARGIN)),
        (lambda z: sphereface_value_and_slope(z, m), lambda z: sphereface_psi(z, m)),
    ]:
        value, slope = value_and_slope(c)
        torch.testing.assert_close(value, target(c))
        outside = c.abs() > 1
        assert (slope[outside] == 0).all()
        leaf = c[~outside].clone().requires_grad_()
        (grad,) = torch.autograd.grad(target(leaf).sum(), leaf)
        torch.testing.assert_close(slope[~outside], grad)


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
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours_value, pml_value = loss(x1, y), pml(x2, y)
    ours_value.backward()
    pml_value.backward()
    torch.testing.assert_close(ours_value, pml_value)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(loss.W.grad, pml.W.grad)


def test_sphereface_beyond_the_cosine_range_takes_psi_at_pi():
    """SphereFace's psi of a "cosine" below -1 was the Chebyshev polynomial there
    (loss 289.9 on one row); now psi(pi) = 1 - 2m, as the paper's domain gives."""
    loss = SphereFaceLoss(2, 8, margin=4, distance=CosineSimilarity(p=3)).double()
    with torch.no_grad():
        loss.W.zero_()
        loss.W[:, 0], loss.W[:, 1] = 1.0, -1.0
    x = -torch.ones(1, 8, dtype=torch.float64)
    norm = math.sqrt(8)
    other = CosineSimilarity(p=3)(x, loss.W.t())[0, 1].item()
    target, rest = norm * (1 - 2 * 4), norm * other
    expected = math.log(math.exp(target) + math.exp(rest)) - target
    assert loss(x, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)


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
    with pytest.raises(ValueError, match="meta device"):
        spec.build(6, 8)(x.to("meta"), y.to("meta"))


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
