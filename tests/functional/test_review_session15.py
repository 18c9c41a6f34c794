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
