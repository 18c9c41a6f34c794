"""Regressions found by the session-16 reviews (each test fails on the code before)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import pml_margins
from pml_margins.losses import ArcFaceLoss, CircleLoss
from pml_margins.schedules import MarginScheduler


def test_a_switch_object_shared_by_threads_restores_each_threads_own_setting():
    shared = pml_margins.value_checks(False)
    pml_margins.value_checks(True)
    with shared:  # (enters the constructor's switch)
        pass
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with shared:
            a_inside.set()
            b_inside.wait(5)
        a_left.set()
        seen["A"] = pml_margins.value_checks_enabled()

    def thread_b():
        pml_margins.value_checks(False)
        a_inside.wait(5)
        with shared:
            b_inside.set()
            a_left.wait(5)
        seen["B"] = pml_margins.value_checks_enabled()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"A": True, "B": False}  # was {"A": False, "B": True}
    assert pml_margins.value_checks_enabled()


def test_a_switch_built_in_one_thread_switches_another_threads_with():
    built = pml_margins.value_checks(False)
    pml_margins.value_checks(True)
    seen = []

    def other():
        with built:
            seen.append(pml_margins.value_checks_enabled())
        seen.append(pml_margins.value_checks_enabled())

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [False, True]
    assert pml_margins.value_checks_enabled()


def test_a_switch_refuses_coroutine_functions_and_takes_numpy_bools():
    with pytest.raises(TypeError, match="does not decorate coroutine functions"):

        @pml_margins.value_checks(False)
        async def step():
            return pml_margins.value_checks_enabled()

    with pytest.raises(TypeError, match="does not decorate coroutine functions"):

        @pml_margins.value_checks(False)
        async def batches():
            yield 1

    assert pml_margins.value_checks_enabled()
    with pml_margins.value_checks(np.bool_(False)):
        assert not pml_margins.value_checks_enabled()
    assert pml_margins.value_checks_enabled()
    with pytest.raises(TypeError, match=r"enabled must be a bool, got builtins\.str"):
        pml_margins.value_checks("False")


@pytest.mark.parametrize("attr", ["num_classes", "embedding_size", "training", "easy_margin"])
def test_a_scheduler_refuses_what_is_not_a_numeric_hyperparameter(attr):
    loss = ArcFaceLoss(5, 4)
    with pytest.raises(ValueError, match=f"ArcFaceLoss.{attr} is not a numeric hyper-parameter"):
        MarginScheduler(loss, 5, 3, total_steps=2, attr=attr)
    assert loss.num_classes == 5 and loss.training is True and loss.easy_margin is False
    # what it drives still works, on our losses and on a loss without a names list
    MarginScheduler(loss, 0.1, 0.5, total_steps=2).step()
    MarginScheduler(CircleLoss(), 0.1, 0.3, total_steps=2, attr="m").step()


@pytest.mark.parametrize(
    "key, value", [("start", "0.1"), ("total_steps", 2.5), ("warmup_steps", None)]
)
def test_a_scheduler_state_of_the_wrong_type_is_a_value_error_and_changes_nothing(key, value):
    loss = ArcFaceLoss(5, 4)
    scheduler = MarginScheduler(loss, 0.1, 0.5, total_steps=4)
    scheduler.step()
    state, margin = scheduler.state_dict(), loss.margin
    with pytest.raises(ValueError, match="the state cannot be loaded"):
        scheduler.load_state_dict({**state, key: value})
    assert loss.margin == margin and scheduler.state_dict() == state
    assert torch.isfinite(loss(torch.randn(8, 4), torch.arange(8) % 5))


def test_schedulers_drive_pmls_regularizer_weights():
    from pytorch_metric_learning.regularizers import LpRegularizer, RegularFaceRegularizer

    loss = ArcFaceLoss(
        5, 4, embedding_regularizer=LpRegularizer(), weight_regularizer=RegularFaceRegularizer()
    )
    for attr in ("embedding_reg_weight", "weight_reg_weight"):
        assert MarginScheduler(loss, 0.0, 1.0, total_steps=4, attr=attr).step() == 0.25


def test_switch_objects_copy_pickle_and_compile_in_one_graph():
    import copy
    import pickle

    switch = pml_margins.value_checks(True)
    module = torch.nn.Module()
    module.switch = pml_margins.autograd_only(False)
    copy.deepcopy(switch), pickle.loads(pickle.dumps(switch)), copy.deepcopy(module)

    def step(x):
        with pml_margins.value_checks(False):
            y = x * 2
        return y + 1

    torch._dynamo.reset()
    assert torch.compile(step, fullgraph=True)(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
    assert pml_margins.value_checks_enabled()


def test_a_switch_keeps_its_constructors_switch_when_a_decorated_function_ran_between():
    # the decorator's wrapper builds a switch per call: it replaced the one remembered
    # switch, and `s` then restored its own setting (checks left off)
    @pml_margins.value_checks(True)
    def helper():
        return pml_margins.value_checks_enabled()

    s = pml_margins.value_checks(False)
    assert helper()
    with s:
        assert not pml_margins.value_checks_enabled()
    assert pml_margins.value_checks_enabled()
    # as before: a switch built earlier keeps its constructor's switch at its first with
    later_off, later_on = pml_margins.value_checks(False), pml_margins.value_checks(True)
    with later_off:
        assert pml_margins.value_checks_enabled()  # (later_on's setting)
    with later_on:  # (its constructor found later_off's False: restored on exit)
        assert pml_margins.value_checks_enabled()
    assert not pml_margins.value_checks_enabled()
    pml_margins.value_checks(True)


@pytest.mark.parametrize("attr", ["seed", "rank", "class_start", "embedding_regularizer"])
def test_a_scheduler_refuses_layout_and_empty_module_slots(attr):
    loss = ArcFaceLoss(4, 3)
    if attr != "embedding_regularizer":
        setattr(loss, attr, 0)  # (as the sharded loss holds them)
    assert hasattr(loss, attr)
    with pytest.raises(ValueError, match="is not a numeric hyper-parameter"):
        MarginScheduler(loss, 0.1, 0.3, total_steps=2, attr=attr)


def test_norm_softmax_takes_scale_by_keyword_only():
    from pml_margins.losses import NormSoftmaxLoss

    with pytest.raises(TypeError):
        NormSoftmaxLoss(10, 8, 0.05)  # PML's positional temperature was read as a scale
    assert NormSoftmaxLoss(10, 8, scale=20.0).scale == 20.0
