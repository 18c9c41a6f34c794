from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pml_margins.losses import (
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    CurricularFaceLoss,
    SphereFaceLoss,
)
from pml_margins.schedules import MarginScheduler, SphereFaceLambdaScheduler


def test_linear_ramp_sets_the_loss_margin_then_holds() -> None:
    loss = ArcFaceLoss(5, 8, margin=0.5)
    sched = MarginScheduler(loss, start=0.1, end=0.8, total_steps=7)
    assert loss.margin == pytest.approx(0.1)
    values = [sched.step() for _ in range(9)]
    assert values == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8])
    assert loss.margin == pytest.approx(0.8) and sched.get_last_value() == pytest.approx(0.8)


def test_cosine_ramp_and_warmup() -> None:
    loss = CosFaceLoss(5, 8)
    sched = MarginScheduler(loss, 0.0, 0.4, total_steps=4, mode="cosine", warmup_steps=2)
    values = [sched.step() for _ in range(6)]
    expected = [0.0, 0.0] + [0.4 * (1 - math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4)]
    assert values == pytest.approx(expected)


def test_state_dict_round_trip_restores_the_margin() -> None:
    loss = ArcFaceLoss(5, 8)
    sched = MarginScheduler(loss, 0.1, 0.5, total_steps=10)
    for _ in range(4):
        sched.step()
    state = sched.state_dict()
    assert "loss" not in state
    fresh_loss = ArcFaceLoss(5, 8)
    fresh = MarginScheduler(fresh_loss, 0.1, 0.5, total_steps=10)
    fresh.load_state_dict(state)
    assert fresh.last_step == 4 and fresh_loss.margin == pytest.approx(loss.margin)
    assert fresh.step() == pytest.approx(sched.step())


def test_drives_other_attributes() -> None:
    loss = CombinedMarginLoss(5, 8, m1=1.0, m2=0.3, m3=0.2)
    MarginScheduler(loss, 0.0, 0.2, total_steps=2, attr="m3").step()
    assert loss.m3 == pytest.approx(0.1)


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="mode must be"):
        MarginScheduler(ArcFaceLoss(5, 8), 0.1, 0.5, 10, mode="step")
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        MarginScheduler(ArcFaceLoss(5, 8), 0.1, 0.5, 0)
    with pytest.raises(ValueError, match="has no hyper-parameter 'gamma'"):
        MarginScheduler(ArcFaceLoss(5, 8), 0.1, 0.5, 10, attr="gamma")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        MarginScheduler(ArcFaceLoss(5, 8), -0.1, 0.5, 10)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        MarginScheduler(CosFaceLoss(5, 8), 0.1, -0.2, 10)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        MarginScheduler(CurricularFaceLoss(5, 8), -0.1, 0.5, 10)


def test_sphereface_lambda_annealing() -> None:
    loss = SphereFaceLoss(5, 8)
    sched = SphereFaceLambdaScheduler(loss)
    # the official layer: iter_ += 1, then lambda = base (1 + gamma iter_)^-power
    official = [max(5.0, 1000 * (1 + 0.12 * it) ** -1) for it in range(1, 4)]
    seen = [loss.lambda_, sched.step(), sched.step()]
    assert seen == pytest.approx(official) and seen[0] == pytest.approx(1000 / 1.12)
    for _ in range(10000):
        sched.step()
    assert loss.lambda_ == 5.0


def test_an_invalid_end_is_refused_at_construction_and_the_loss_left_as_it_was() -> None:
    loss = ArcFaceLoss(10, 4, margin=0.3)
    with pytest.raises(ValueError, match="radians"):
        MarginScheduler(loss, 0.1, 4.0, total_steps=1000)  # 4 rad: would fail at step ~780
    assert loss.margin == 0.3
    with pytest.raises(TypeError, match="warmup_steps must be an int"):
        MarginScheduler(loss, 0.1, 0.5, total_steps=10, warmup_steps=1.7)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        MarginScheduler(loss, 0.1, 0.5, total_steps=10, warmup_steps=-1)


def test_step_counts_may_be_numpy_or_tensor_integers() -> None:
    """As ``total_steps`` (PML takes them; ``warmup_steps=np.int64(2)`` and a loaded
    ``last_step`` of ``np.int64`` were refused; found by review)."""
    loss = ArcFaceLoss(10, 4, margin=0.3)
    sched = MarginScheduler(loss, 0.1, 0.5, total_steps=np.int64(4), warmup_steps=np.int64(2))
    assert sched.warmup_steps == 2 and type(sched.warmup_steps) is int
    assert MarginScheduler(loss, 0.1, 0.5, 4, warmup_steps=torch.tensor(2)).warmup_steps == 2
    sched.load_state_dict({**sched.state_dict(), "last_step": np.int64(3)})
    assert sched.last_step == 3 and type(sched.last_step) is int
    assert loss.margin == pytest.approx(sched.value_at(3))


def test_state_of_another_attribute_or_keys_is_refused() -> None:
    margin = MarginScheduler(ArcFaceLoss(10, 4), 0.1, 0.5, total_steps=10)
    combined = CombinedMarginLoss(10, 4)
    m3 = MarginScheduler(combined, 0.0, 0.3, total_steps=10, attr="m3")
    with pytest.raises(ValueError, match=r"drives 'm3'.*the state drives 'margin'"):
        m3.load_state_dict(margin.state_dict())
    with pytest.raises(ValueError, match="keys"):
        m3.load_state_dict({**m3.state_dict(), "bogus": 1})
    m3.load_state_dict({**m3.state_dict(), "last_step": 10})
    assert combined.m3 == pytest.approx(0.3)


def test_tensor_buffers_and_wrapped_losses_get_clear_errors() -> None:
    from pml_margins.distributed import ShardedMarginSoftmaxLoss
    from pml_margins.losses import AdaCosLoss

    with pytest.raises(ValueError, match=r"a tensor .* AdaCos's scale"):
        MarginScheduler(AdaCosLoss(10, 4), 5.0, 10.0, total_steps=10, attr="scale")
    with pytest.raises(ValueError, match=r"its \.loss, a ArcFaceLoss, has it"):
        MarginScheduler(ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4), 0.1, 0.5, total_steps=10)


def test_every_value_of_the_ramp_is_checked_at_construction() -> None:
    """SphereFace's margin is an integer: a ramp through 2.5 fails when built, naming the
    step, not in mid-training; a ramp through integers only is accepted."""
    loss = SphereFaceLoss(10, 4, margin=1)
    with pytest.raises(ValueError, match=r"would set margin to 2.5 at step 1: .*integer"):
        MarginScheduler(loss, start=1, end=4, total_steps=2)
    with pytest.raises(ValueError, match=r"at step 3: .*integer"):
        MarginScheduler(loss, start=1, end=4, total_steps=3, mode="cosine", warmup_steps=2)
    assert loss.margin == 1
    scheduler = MarginScheduler(loss, start=1, end=4, total_steps=3)
    assert [scheduler.step() for _ in range(3)] == [2, 3, 4]


def test_a_loaded_state_is_checked_as_a_new_scheduler_and_a_refused_one_changes_nothing():
    """A ramp valid for CosFace passes SphereFace's integer margins through 1.5: loading it
    is refused (it failed at the first step), and the scheduler keeps its own state."""
    cosface_ramp = MarginScheduler(CosFaceLoss(10, 8), start=1, end=4, total_steps=6)
    loss = SphereFaceLoss(10, 8)
    sched = MarginScheduler(loss, start=1, end=4, total_steps=3)
    for _ in range(2):
        sched.step()
    kept = sched.state_dict()
    with pytest.raises(ValueError, match=r"would set margin to 1\.5 at step 1"):
        sched.load_state_dict(cosface_ramp.state_dict())
    assert sched.state_dict() == kept and loss.margin == 3
    bad_step = {**kept, "last_step": -1}
    with pytest.raises(ValueError, match="last_step must be an int >= 0"):
        sched.load_state_dict(bad_step)
    lam = SphereFaceLambdaScheduler(loss)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        lam.load_state_dict({**lam.state_dict(), "gamma": -1.0})
    assert lam.state_dict()["gamma"] == 0.12
    sched.load_state_dict(kept)  # its own state still loads
    assert sched.step() == 4 and loss.margin == 4
