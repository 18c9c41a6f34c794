"""Hyper-parameters set after construction are checked as the constructor checks them
(or refused where the loss's tensors were shaped by them), and schedulers set exactly
what they promise (found by review)."""

from __future__ import annotations

import pytest
import torch

from pml_margins.losses import (
    AdaCosLoss,
    AdaFaceLoss,
    ArcFaceLoss,
    CenterLoss,
    CircleLoss,
    MagFaceLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.schedules import MarginScheduler
from pml_margins.validation import check_non_negative


@pytest.mark.parametrize(
    ("make", "name", "value", "error", "match"),
    [
        (lambda: SubCenterArcFaceLoss(10, 4), "sub_centers", 2, AttributeError, "fixed at"),
        (lambda: SubCenterArcFaceLoss(10, 4), "sub_centers", 0, ValueError, ">= 1"),
        (lambda: CenterLoss(3, 4), "update", "sgd", AttributeError, "fixed at construction"),
        (lambda: CenterLoss(3, 4), "update", "EMA", ValueError, "update must be one of"),
        (lambda: AdaCosLoss(5, 4), "dynamic", "False", TypeError, "dynamic must be a bool"),
        (lambda: CircleLoss(), "per_anchor", "False", TypeError, "per_anchor must be a bool"),
        (lambda: ArcFaceLoss(5, 4), "sample_rate", 0, ValueError, "sample_rate must lie"),
        (lambda: ArcFaceLoss(5, 4), "sample_rate", float("nan"), ValueError, "sample_rate"),
        (lambda: ArcFaceLoss(5, 4), "chunk_size", -1, ValueError, "chunk_size must be >= 1"),
        (lambda: AdaCosLoss(5, 4), "scale", torch.tensor(-5.0), ValueError, "scale must be > 0"),
        (lambda: AdaCosLoss(5, 4), "scale", torch.tensor(float("nan")), ValueError, "finite"),
        (lambda: AdaCosLoss(5, 4), "scale", None, TypeError, "running statistic: give a tensor"),
    ],
)
def test_a_bad_value_set_later_is_refused_as_at_construction(make, name, value, error, match):
    loss = make()
    before = getattr(loss, name)
    with pytest.raises(error, match=match):
        setattr(loss, name, value)
    after = getattr(loss, name)
    assert torch.equal(after, before) if isinstance(before, torch.Tensor) else after == before


def test_a_refused_sample_rate_no_longer_moves_running_statistics():
    """The forward refused it only after prepare_step had moved AdaFace's statistics."""
    loss = AdaFaceLoss(5, 4)
    before = loss.batch_mean.clone()
    with pytest.raises(ValueError, match="sample_rate"):
        loss.sample_rate = 1.5
    loss(torch.randn(8, 4), torch.randint(0, 5, (8,)))
    assert loss.sample_rate == 1.0 and not torch.equal(loss.batch_mean, before)


def test_a_fixed_adacos_scale_set_by_hand_keeps_its_buffer():
    loss = AdaCosLoss(5, 4, dynamic=False)
    loss.scale = 7
    assert loss.scale.dtype == torch.float64 and float(loss.scale) == 7.0
    assert "scale" in dict(loss.named_buffers())


def test_an_unset_hyperparameter_reads_as_an_attribute_error():
    class Loss:
        margin = Hyperparameter(check_non_negative)

    loss = Loss()
    assert not hasattr(loss, "margin") and getattr(loss, "margin", None) is None


@pytest.mark.parametrize(("start", "end"), [(0.1, 0.45), (0.7, 2.9), (0.13, 0.57)])
@pytest.mark.parametrize("mode", ["linear", "cosine"])
def test_a_ramp_ends_exactly_at_end(start, end, mode):
    loss = ArcFaceLoss(5, 4)
    sched = MarginScheduler(loss, start, end, total_steps=7, mode=mode, warmup_steps=2)
    assert loss.margin == start
    for _ in range(12):
        sched.step()
    assert loss.margin == end  # 0.44999999999999996 and 2.9000000000000004 before


def test_an_integer_ramp_with_whole_steps_is_accepted():
    loss = SphereFaceLoss(5, 4, margin=1)
    sched = MarginScheduler(loss, 1, 23, total_steps=22)  # +1 a step: 15.999... before
    assert [sched.step() for _ in range(22)] == list(range(2, 24))


@pytest.mark.parametrize("bad", [True, "0.1", float("inf"), None])
def test_scheduler_ends_are_real_numbers(bad):
    with pytest.raises((TypeError, ValueError), match="start must be"):
        MarginScheduler(ArcFaceLoss(5, 4), bad, 0.5, total_steps=3)


def test_a_refused_step_changes_neither_the_value_nor_the_count():
    loss = MagFaceLoss(5, 4)
    upper = MarginScheduler(loss, 1.2, 0.6, total_steps=8, attr="u_m")
    lower = MarginScheduler(loss, 0.45, 0.7, total_steps=8, attr="l_m")
    with pytest.raises(ValueError, match="u_m must be >= l_m"):
        for _ in range(8):
            upper.step()
            lower.step()
    assert loss.u_m == upper.value_at(upper.last_step)


def test_adacos_scale_loaded_with_assign_keeps_the_state_dicts_tensor():
    source = AdaCosLoss(5, 4, dynamic=False).float()
    state = source.state_dict()
    with torch.device("meta"):
        target = AdaCosLoss(5, 4, dynamic=False)
    target.load_state_dict(state, assign=True)
    assert target.scale is state["scale"] and target.scale.dtype == torch.float32


def test_a_loss_pickled_before_its_attributes_were_checked_still_works():
    loss = ArcFaceLoss(5, 4)
    for name in ("chunk_size", "sample_rate"):  # the plain keys of an older pickle
        loss.__dict__[name] = loss.__dict__.pop(f"_hp_{name}")
    assert loss.chunk_size is None and loss.sample_rate == 1.0
    loss(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0]))


@pytest.mark.parametrize(
    "value",
    [
        torch.tensor(5),
        torch.tensor([5.0]),
        torch.tensor(5.0, dtype=torch.float16),
    ],
)
def test_an_adacos_scale_tensor_is_held_as_a_statistic(value):
    """One real value becomes a 0-dim statistic, float32 at least (a first version refused
    these mid-load under assign=True, after W had been replaced); a graph (a Parameter: a
    learned scale would silently not train), a bool or several values are refused, also
    before a load changes anything."""
    loss = AdaCosLoss(5, 4)
    loss.scale = value
    assert loss.scale.shape == () and not loss.scale.requires_grad
    assert loss.scale.dtype == torch.float32 and float(loss.scale) == 5.0
    bad_values = (
        torch.tensor([5.0, 6.0]),
        torch.tensor(5 + 0j),
        torch.tensor(True),
        torch.tensor(5.0, requires_grad=True),
        torch.nn.Parameter(torch.tensor(7.0)),
    )
    for bad in bad_values:
        with pytest.raises(ValueError, match=r"scale must be (one real value without grad|real)"):
            loss.scale = bad
        fresh = AdaCosLoss(5, 4)
        weight = fresh.W.detach().clone()
        refused = r"scale must be one real value without grad|must be real"
        with pytest.raises(ValueError, match=refused):
            fresh.load_state_dict({"W": torch.zeros(4, 5), "scale": bad}, assign=True)
        assert torch.equal(fresh.W, weight)


def _real_hyperparameters():
    """(loss class, name) of every loss's real-valued hyper-parameter (a float after checks)."""
    import pml_margins.losses as losses

    found = []
    for cls_name in losses.__all__:
        cls = getattr(losses, cls_name)
        if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
            continue
        loss = _make(cls)
        for name in dir(cls):
            if isinstance(getattr(cls, name, None), Hyperparameter):
                if type(getattr(loss, name, None)) is float:
                    found.append(pytest.param(cls, name, id=f"{cls_name}.{name}"))
    return found


def _make(cls):
    return cls() if cls is CircleLoss else cls(5, 4)


@pytest.mark.parametrize(("cls", "name"), _real_hyperparameters())
def test_a_hyperparameter_tensor_that_requires_grad_is_refused_not_cut(cls, name):
    """PML keeps a ``scale`` tensor's graph; ours keeps numbers, so a tensor that requires
    grad (a Parameter too, which nn.Module used to intercept with a KeyError) is refused
    with a TypeError instead of training nothing (found by review)."""
    loss = _make(cls)
    value = getattr(loss, name)
    for learnable in (
        torch.tensor(value, requires_grad=True, dtype=torch.float64),
        torch.nn.Parameter(torch.tensor(value)),
    ):
        with pytest.raises(TypeError, match=f"{name} is kept as a number.*requires grad"):
            setattr(loss, name, learnable)
        assert getattr(loss, name) == value and name not in loss._parameters
    setattr(loss, name, torch.tensor(value, dtype=torch.float64))  # no grad: its number
    assert type(getattr(loss, name)) is float and getattr(loss, name) == value


def test_a_scale_tensor_that_requires_grad_is_refused_by_the_constructor():
    from pml_margins.losses import CosFaceLoss

    with pytest.raises(TypeError, match="scale is kept as a number"):
        CosFaceLoss(5, 4, scale=torch.tensor(20.0, requires_grad=True))
    with pytest.raises(TypeError, match="margin is kept as a number"):
        ArcFaceLoss(5, 4, margin=torch.nn.Parameter(torch.tensor(0.3)))
