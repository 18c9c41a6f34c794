"""The default reduction taken without PML's reducer plumbing equals PML's ``forward``.

``CheckedForwardMixin.forward`` returns ``torch.mean`` of the element losses when the
reducer is exactly a ``MeanReducer`` collecting no statistics and no regularizer is set;
everything else goes through PML's ``BaseMetricLossFunction.forward``.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.reducers import MeanReducer, SumReducer
from pytorch_metric_learning.regularizers import LpRegularizer

from pml_margins.losses import (
    ArcFaceLoss,
    CenterLoss,
    CircleLoss,
    CosFaceLoss,
    SubCenterArcFaceLoss,
)

LOSSES = {
    "arcface": lambda **kw: ArcFaceLoss(7, 5, **kw),
    "cosface": lambda **kw: CosFaceLoss(7, 5, **kw),
    "subcenter": lambda **kw: SubCenterArcFaceLoss(7, 5, **kw),
    "center": lambda **kw: CenterLoss(7, 5, **kw),
    "circle": lambda **kw: CircleLoss(**kw),
}


class CountingMeanReducer(MeanReducer):
    """A MeanReducer subclass: may do more than the mean, so PML's plumbing runs."""

    calls = 0

    def element_reduction(self, losses, *args):
        CountingMeanReducer.calls += 1
        return super().element_reduction(losses, *args)


def _inputs(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    return x, torch.randint(0, 7, (12,))


@pytest.mark.parametrize("name", LOSSES)
def test_default_reduction_equals_pml_forward_bit_for_bit(name: str) -> None:
    loss_fn = LOSSES[name]().eval()  # no state update between the two calls (Center's EMA)
    x, y = _inputs()
    ours = loss_fn(x, y)
    (gx,) = torch.autograd.grad(ours, x)
    pml = BaseMetricLossFunction.forward(loss_fn, x, y)
    (gp,) = torch.autograd.grad(pml, x)
    assert torch.equal(ours, pml) and torch.equal(gx, gp)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reducer": SumReducer()},
        {"reducer": MeanReducer(collect_stats=True)},
        {"embedding_regularizer": LpRegularizer()},
        {"weight_regularizer": LpRegularizer()},
    ],
    ids=["sum", "mean-with-stats", "embedding-reg", "weight-reg"],
)
def test_other_reductions_go_through_pml(kwargs: dict) -> None:
    loss_fn = ArcFaceLoss(7, 5, **kwargs)
    x, y = _inputs()
    assert torch.equal(loss_fn(x, y), BaseMetricLossFunction.forward(loss_fn, x, y))
    if "reducer" in kwargs and kwargs["reducer"].collect_stats:
        assert loss_fn.reducer.losses_size == 12  # PML's reducer bookkeeping ran


def test_a_mean_reducer_subclass_is_called() -> None:
    loss_fn = ArcFaceLoss(7, 5, reducer=CountingMeanReducer())
    before = CountingMeanReducer.calls
    loss_fn(*_inputs())
    assert CountingMeanReducer.calls == before + 1


def test_miner_weights_and_stats_on_the_plain_mean() -> None:
    """A miner's indices_tuple and collect_stats keep PML's values on the short path."""
    x, y = _inputs(1)
    pairs = MultiSimilarityMiner()(x, y)
    loss_fn = ArcFaceLoss(7, 5, collect_stats=True)
    ours = loss_fn(x, y, pairs)
    angle = loss_fn.avg_angle
    loss_fn.avg_angle = 0
    assert torch.equal(ours, BaseMetricLossFunction.forward(loss_fn, x, y, pairs))
    assert angle == loss_fn.avg_angle != 0


class AlreadyReducedArcFace(ArcFaceLoss):
    """A subclass whose compute_loss reduces itself: PML's reducer must see it."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        loss_dict = super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        total = loss_dict["loss"]["losses"].sum()
        return {"loss": {"losses": total, "indices": None, "reduction_type": "already_reduced"}}


def test_losses_reduced_by_compute_loss_go_through_the_reducer() -> None:
    loss_fn = AlreadyReducedArcFace(7, 5)
    x, y = _inputs()
    ours = loss_fn(x, y)
    assert torch.equal(ours, BaseMetricLossFunction.forward(loss_fn, x, y))
    plain = ArcFaceLoss(7, 5)
    plain.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(ours, plain(x, y) * len(y))  # the sum, not the mean


class DoubledArcFace(ArcFaceLoss):
    """A subclass whose compute_loss changes the element losses (still one element entry)."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        loss_dict = super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        loss_dict["loss"]["losses"] = 2 * loss_dict["loss"]["losses"]
        return loss_dict


def test_a_compute_loss_of_a_subclass_or_the_instance_is_called() -> None:
    """The short path computes the element losses without the loss dict only where
    compute_loss is the class-weight loss's own: a subclass's or an instance's runs."""
    x, y = _inputs()
    plain = ArcFaceLoss(7, 5)
    doubled = DoubledArcFace(7, 5)
    doubled.load_state_dict(plain.state_dict())
    torch.testing.assert_close(doubled(x, y), 2 * plain(x, y), rtol=0, atol=0)
    patched = ArcFaceLoss(7, 5)
    patched.load_state_dict(plain.state_dict())
    calls = []

    def compute_loss(*args):
        calls.append(1)
        return ArcFaceLoss.compute_loss(patched, *args)

    patched.compute_loss = compute_loss
    assert torch.equal(patched(x, y), plain(x, y)) and calls == [1]


def test_a_prepare_step_of_a_subclass_or_the_instance_gets_the_statistics() -> None:
    """Without a prepare_step of its own the loss forms no StepStatistics; with one (a
    subclass's or set on the instance) it gets them, with the step's labels."""
    from pml_margins.losses import StepStatistics

    seen = []

    class Seeing(ArcFaceLoss):
        def prepare_step(self, embeddings, labels, statistics):
            seen.append(statistics)
            return super().prepare_step(embeddings, labels, statistics)

    x, y = _inputs()
    plain = ArcFaceLoss(7, 5)
    seeing = Seeing(7, 5)
    seeing.load_state_dict(plain.state_dict())
    assert torch.equal(seeing(x, y), plain(x, y))
    instance = ArcFaceLoss(7, 5)
    instance.load_state_dict(plain.state_dict())
    instance.prepare_step = lambda e, lab, statistics: (
        seen.append(statistics) or ArcFaceLoss.prepare_step(instance, e, lab, statistics)
    )
    assert torch.equal(instance(x, y), plain(x, y))
    assert len(seen) == 2 and all(isinstance(s, StepStatistics) for s in seen)
    assert all(torch.equal(s.target, y) for s in seen)


def test_the_base_methods_patched_on_the_class_are_called() -> None:
    """Patching ClassWeightLoss.compute_loss or prepare_step itself (a mock, a profiler's
    wrapper) counts as a redefinition: the forward calls them, as PML's forward would."""
    from unittest import mock

    from pml_margins.losses import ClassWeightLoss, StepStatistics

    x, y = _inputs()
    loss_fn = CosFaceLoss(7, 5)
    expected = BaseMetricLossFunction.forward(loss_fn, x, y)
    compute_loss, prepare_step = ClassWeightLoss.compute_loss, ClassWeightLoss.prepare_step
    seen = []

    def prepare(self, embeddings, labels, statistics):
        seen.append(statistics)
        return prepare_step(self, embeddings, labels, statistics)

    with (
        mock.patch.object(
            ClassWeightLoss, "compute_loss", autospec=True, side_effect=compute_loss
        ) as patched,
        mock.patch.object(ClassWeightLoss, "prepare_step", prepare),
    ):
        assert torch.equal(loss_fn(x, y), expected)
    assert patched.call_count == 1
    assert len(seen) == 1 and isinstance(seen[0], StepStatistics)
