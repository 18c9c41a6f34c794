"""PML's machinery around a loss, as PML's own losses meet it: distance statistics,
``collect_stats`` on the sharded loss, ``MultipleLosses`` with a sharded loss, module
casts that keep running statistics, and hyper-parameters checked together."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity

import pml_margins.losses as ours
from pml_margins.distributed import ShardedMarginSoftmaxLoss

PAIRS = {
    "arcface": (lambda **k: ours.ArcFaceLoss(4, 3, **k), lambda **k: pml.ArcFaceLoss(4, 3, **k)),
    "cosface": (lambda **k: ours.CosFaceLoss(4, 3, **k), lambda **k: pml.CosFaceLoss(4, 3, **k)),
    "nsl": (
        lambda **k: ours.NormSoftmaxLoss(4, 3, **k),
        lambda **k: pml.NormalizedSoftmaxLoss(4, 3, **k),
    ),
}


def _stats(distance) -> list[float]:
    return [float(getattr(distance, n)) for n in distance._record_these_stats]


@pytest.mark.parametrize("mode", [{}, {"chunk_size": 2}], ids=["default", "chunked"])
@pytest.mark.parametrize("name", PAIRS)
def test_distance_statistics_are_pmls(name, mode) -> None:
    """The fused core never calls the distance: the statistics PML's distance records
    (query and reference norms before and after normalizing) are recorded for it."""
    make_ours, make_pml = PAIRS[name]
    distances = [lambda: CosineSimilarity(collect_stats=True)]
    if name == "nsl":
        distances.append(lambda: DotProductSimilarity(collect_stats=True))
    for distance in distances:
        torch.manual_seed(0)
        loss = make_ours(distance=distance(), **mode)
        reference = make_pml(distance=distance())
        reference.load_state_dict(loss.state_dict())
        x, y = 3 * torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
        for scale in (1.0, 10.0):  # a later call replaces the values of an earlier one
            loss(scale * x, y), reference(scale * x, y)
            assert _stats(loss.distance) == pytest.approx(_stats(reference.distance))
        assert _stats(loss.distance)[0] > 10


def test_sharded_loss_records_avg_angle_and_fits_in_multiple_losses() -> None:
    torch.manual_seed(0)
    sharded = ShardedMarginSoftmaxLoss(ours.ArcFaceLoss, 5, 4, collect_stats=True, scale=8.0)
    single = ours.ArcFaceLoss(5, 4, collect_stats=True, scale=8.0)
    single.load_state_dict(sharded.loss.state_dict())
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(sharded(x, y), single(x, y))
    assert sharded.loss.avg_angle == pytest.approx(single.avg_angle) and single.avg_angle > 0
    joint = pml.MultipleLosses([sharded, ours.CenterLoss(5, 4)], weights=[1.0, 0.1])
    assert torch.isfinite(joint(x, y))
    with pytest.raises(ValueError, match=r"miners .* not supported"):
        sharded(x, y, (torch.tensor([0]), torch.tensor([5]), torch.tensor([1])))


@pytest.mark.parametrize("mode", ["plain", "chunked"])
def test_norm_softmax_avg_angle_with_every_normalizing_distance(mode) -> None:
    """PML's default DotProductSimilarity() normalizes: its logits are cosines, and the
    statistic is the angle (it stayed 0); a non-normalizing one records none."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 3, 3, 7, 8, 0])
    kwargs = {"collect_stats": True} | ({"chunk_size": 4} if mode == "chunked" else {})
    angles = {}
    for name, distance in (
        ("cosine", CosineSimilarity()),
        ("dot", DotProductSimilarity()),
        ("raw", DotProductSimilarity(normalize_embeddings=False)),
    ):
        torch.manual_seed(1)
        loss = ours.NormSoftmaxLoss(9, 4, distance=distance, **kwargs).double()
        loss(x, y)
        angles[name] = loss.avg_angle
    torch.manual_seed(1)
    w = ours.NormSoftmaxLoss(9, 4).double().W.detach()
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=0)
    expected = torch.rad2deg(torch.acos(cos[torch.arange(6), y])).mean().item()
    assert angles["cosine"] == pytest.approx(expected, rel=1e-9)
    assert angles["dot"] == pytest.approx(expected, rel=1e-9)
    assert angles["raw"] == 0


def test_half_casts_keep_running_statistics() -> None:
    adacos = ours.AdaCosLoss(10575, 4, dynamic=False)
    exact = float(adacos.scale)
    adacos.half()
    assert adacos.scale.dtype == torch.float32
    assert float(adacos.scale) == pytest.approx(exact, rel=1e-7)  # not half's 13.1016
    curricular = ours.CurricularFaceLoss(5, 4)
    curricular.t.fill_(0.123456)
    curricular.bfloat16()
    assert curricular.t.dtype == torch.float32 and float(curricular.t) == pytest.approx(0.123456)


def test_elasticface_variant_is_checked_with_its_margin() -> None:
    loss = ours.ElasticFaceLoss(4, 3, variant="cos", margin=4.0, sigma=0.0)
    with pytest.raises(ValueError, match=r"variant .arc. does not take the margin 4\.0"):
        loss.variant = "arc"
    assert loss.variant == "cos"
