"""What PML's calls of a loss's reducer and distance do, where our losses skip the call:
hooks on them fire, methods replaced on them run, a duck-typed reducer is called, and
the distance's statistics are recorded (``pml_margins.losses.pml_calls``)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.reducers import MeanReducer

import pml_margins.losses as ours
from pml_margins.losses.pml_calls import runs_as_its_class

#: ours and PML's, same weights where PML has the loss (PML's margins in degrees)
LOSSES = {
    "arcface": lambda **k: ours.ArcFaceLoss(3, 4, **k),
    "cosface": lambda **k: ours.CosFaceLoss(3, 4, **k),
    "nsl": lambda **k: ours.NormSoftmaxLoss(3, 4, **k),
    "curricular": lambda **k: ours.CurricularFaceLoss(3, 4, **k),
    "circle": lambda **k: ours.CircleLoss(**k),
    "center": lambda **k: ours.CenterLoss(3, 4, **k),
    "proxy_circle": lambda **k: ours.ProxyCircleLoss(3, 4, **k),
}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


@pytest.mark.parametrize("name", LOSSES)
def test_a_hook_on_the_mean_reducer_fires_once(name) -> None:
    """PML's ``forward`` calls its reducer; skipping a plain ``MeanReducer`` for
    ``torch.mean`` must not skip a hook on it (0 calls before)."""
    x, y = _batch()
    loss = LOSSES[name](reducer=MeanReducer())
    plain = loss(x, y)
    seen = []
    handle = loss.reducer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    hooked = loss(x, y)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], hooked.detach())
    if name not in ("curricular", "center"):  # (their running statistics moved)
        torch.testing.assert_close(hooked, plain)


@pytest.mark.parametrize("name", LOSSES)
def test_a_global_module_hook_sees_the_reducer(name) -> None:
    x, y = _batch()
    loss = LOSSES[name](reducer=MeanReducer())
    called = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: called.append(type(m).__name__)
    )
    try:
        loss(x, y)
    finally:
        handle.remove()
    assert "MeanReducer" in called


def test_a_method_replaced_on_the_reducer_runs() -> None:
    x, y = _batch()
    for name in ("arcface", "circle", "center"):
        loss = LOSSES[name](reducer=MeanReducer())
        loss.reducer.element_reduction = lambda losses, *a: losses.sum()  # a sum, not a mean
        per_element = LOSSES[name](reducer=pml_sum())
        per_element.load_state_dict(loss.state_dict())
        torch.testing.assert_close(loss(x, y), per_element(x, y))


def pml_sum():
    from pytorch_metric_learning.reducers import SumReducer

    return SumReducer()


class DuckReducer(torch.nn.Module):
    """A reducer with PML's call signature that is not a ``BaseReducer``."""

    def forward(self, loss_dict, embeddings, labels):
        return sum(v["losses"].sum() for v in loss_dict.values())


@pytest.mark.parametrize("name", ["arcface", "circle", "center", "proxy_circle"])
def test_a_duck_typed_reducer_is_called_as_pml_calls_it(name) -> None:
    """An ``nn.Module`` with PML's reducer signature: PML calls it; ours raised
    ``AttributeError: ... 'collect_stats'``."""
    x, y = _batch()
    loss = LOSSES[name](reducer=DuckReducer())
    summed = LOSSES[name](reducer=pml_sum())
    summed.load_state_dict(loss.state_dict())
    torch.testing.assert_close(loss(x, y), summed(x, y))


def test_a_duck_typed_reducer_matches_pmls_arcface() -> None:
    x, y = _batch()
    loss, reference = ours.ArcFaceLoss(3, 4), pml.ArcFaceLoss(3, 4, margin=28.6478897565412)
    reference.load_state_dict(loss.state_dict())
    loss.reducer, reference.reducer = DuckReducer(), DuckReducer()
    torch.testing.assert_close(loss(x, y), reference(x, y))


@pytest.mark.parametrize("name", ["arcface", "cosface", "nsl", "circle"])
def test_a_hook_on_the_distance_fires_as_in_pml(name) -> None:
    """The fused core and Circle's own cosines skip the distance's call: with a hook on
    it the loss calls it (0 calls before), with the same value."""
    x, y = _batch()
    loss = LOSSES[name]()
    plain = loss(x, y)
    seen = []
    handle = loss.distance.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked = loss(x, y)
    handle.remove()
    assert seen == [(8, 8 if name == "circle" else 3)]
    torch.testing.assert_close(hooked, plain)


def test_bounded_mode_keeps_its_core_with_a_hooked_distance() -> None:
    """``chunk_size`` never forms the ``B x C`` matrix (its documented contract): a hook
    on the distance does not move it to the plain path, which refuses the mode."""
    x, y = _batch()
    loss = ours.ArcFaceLoss(3, 4, chunk_size=2)
    plain = loss(x, y)
    loss.distance.register_forward_hook(lambda m, i, o: None)
    torch.testing.assert_close(loss(x, y), plain)


def test_center_loss_records_its_distance_statistics() -> None:
    """PML's distance records the query and reference norms when it collects statistics;
    Center computes its distances itself and recorded nothing (all 0)."""
    x, y = _batch()
    loss = ours.CenterLoss(3, 4)
    with torch.no_grad():
        loss.centers.copy_(torch.randn(3, 4))
    loss.distance = LpDistance(p=2, power=2, normalize_embeddings=False, collect_stats=True)
    direct = LpDistance(p=2, power=2, normalize_embeddings=False, collect_stats=True)
    direct(3 * x, loss.centers.detach().clone())  # (the centres before the step's update)
    loss(3 * x, y)
    names = direct._record_these_stats
    recorded = [getattr(loss.distance, n) for n in names]
    assert recorded == pytest.approx([getattr(direct, n) for n in names])
    assert recorded[0] > 1


def test_runs_as_its_class() -> None:
    distance = CosineSimilarity()
    assert runs_as_its_class(distance)
    handle = distance.register_forward_pre_hook(lambda m, i: None)
    assert not runs_as_its_class(distance)
    handle.remove()
    assert runs_as_its_class(distance)
    distance.compute_mat = lambda q, r: q @ r.t()
    assert not runs_as_its_class(distance)
    reducer = MeanReducer()
    handle = reducer.register_full_backward_hook(lambda m, gi, go: None)
    assert not runs_as_its_class(reducer)
    handle.remove()
    reducer.collect_stats = True  # data, not a method
    assert runs_as_its_class(reducer)
