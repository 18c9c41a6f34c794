"""Defects found by this session's review, each test failing on the code before its fix."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from pml_margins.distributed import sharded_margin_softmax_cross_entropy
from pml_margins.functional import cos_multiple_angle, margin_softmax_cross_entropy
from pml_margins.functional.target_logits import (
    TargetWithSlope,
    arcface_target,
    arcface_value_and_slope,
)


@pytest.mark.parametrize("value", [2.0, 3.0, 1.5])
def test_a_tensor_multiplier_keeps_its_gradient_at_whole_numbers(value) -> None:
    """A whole-number tensor multiplier took the recurrence through float(): no gradient
    (1.5 kept it); a two-element one failed in float() without naming the argument."""
    cosine = torch.tensor([0.3, -0.6], dtype=torch.float64)
    m = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    out = cos_multiple_angle(cosine, m)
    theta = torch.acos(cosine)
    torch.testing.assert_close(out, torch.cos(value * theta))
    out.sum().backward()
    expected = (-theta * torch.sin(value * theta)).sum()
    torch.testing.assert_close(m.grad, expected)
    per_row = cos_multiple_angle(cosine, torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(per_row, torch.cos(torch.tensor([2.0, 3.0]).double() * theta))


def test_target_with_slope_of_a_partial_has_a_repr() -> None:
    """repr() raised AttributeError: a functools.partial has no __name__."""
    target = TargetWithSlope(
        functools.partial(arcface_target, easy_margin=True),
        functools.partial(arcface_value_and_slope, easy_margin=True),
        margin=0.5,
    )
    assert "easy_margin=True" in repr(target) and "margin=0.5" in repr(target)
    value = float(target(torch.tensor([0.5], dtype=torch.float64)))
    assert math.isclose(value, math.cos(math.acos(0.5) + 0.5), rel_tol=1e-12)


@pytest.mark.parametrize(
    "function", [margin_softmax_cross_entropy, sharded_margin_softmax_cross_entropy]
)
def test_a_callable_scale_where_none_is_taken_is_refused_by_name(function) -> None:
    """A callable scale failed inside torch: "unsupported operand type(s) for *"."""
    logits, labels = torch.randn(4, 6).tanh(), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match="scale must be a number or a tensor here"):
        function(logits, labels, None, lambda blocks: 3.0)


def test_a_whole_number_tensor_multiplier_keeps_the_recurrence() -> None:
    """From the review of the change: every tensor multiplier went through the clamped
    angle, so a whole-number one lost the recurrence's values beyond |cos| = 1 (other
    distances give them) and its slope m^2 at cos = +-1."""
    cosine = torch.tensor([-1.2, -1.0, 0.3, 1.0, 1.3], dtype=torch.float64, requires_grad=True)
    m = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    value = cos_multiple_angle(cosine, m)
    torch.testing.assert_close(value, 2 * cosine.detach() ** 2 - 1)  # T_2
    (grad_cosine,) = torch.autograd.grad(value.sum(), cosine)
    torch.testing.assert_close(grad_cosine, 4 * cosine.detach())
    assert torch.equal(cos_multiple_angle(cosine, torch.tensor(1.0)), cosine)


def test_the_switch_module_s_former_path_still_imports() -> None:
    """From the review of the change: the rename to autograd_switch broke
    ``from pml_margins.functional.autograd_only import backward_once``."""
    import pml_margins.functional as functional
    from pml_margins.functional import autograd_switch
    from pml_margins.functional.autograd_only import autograd_only, backward_once

    assert backward_once is autograd_switch.backward_once
    assert functional.autograd_only is autograd_only is autograd_switch.autograd_only
