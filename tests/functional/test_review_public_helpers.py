"""The public helpers' contracts at their edges, found by an independent review: a clear
``TypeError``/``ValueError`` instead of another exception or a silently broadcast slope."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pml_margins.functional import (
    auto_chunk_size,
    class_columns,
    cosface_scale_lower_bound,
    fused_margin_softmax_cross_entropy,
    sample_classes,
)


def test_sample_classes_refuses_a_generator_that_is_not_one():
    labels = torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator, got int"):
        sample_classes(labels, 10, 0.5, generator=5)
    g = torch.Generator().manual_seed(0)
    index, local = sample_classes(labels, 10, 0.5, generator=g)
    assert torch.equal(index[local], labels)


def test_class_columns_refuses_a_list():
    with pytest.raises(TypeError, match=r"classes must be a torch\.Tensor, got list"):
        class_columns([1, 2], 2)
    assert class_columns(torch.tensor([1, 2]), 2).tolist() == [2, 3, 4, 5]


def test_cosface_scale_bound_for_any_integer_class_count():
    """A class count beyond float's range overflowed (the formula is finite: its log)."""
    c = 10**400
    expected = math.log(c - 1) + math.log(0.9 / 0.1)  # (C - 1)/C is 1.0 in float
    assert cosface_scale_lower_bound(c, 0.9) == pytest.approx(expected, rel=1e-12)
    assert cosface_scale_lower_bound(10, 0.9) == pytest.approx(0.9 * math.log(81), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((-5, 3), ValueError, "batch_size must be >= 0"),
        ((4, -3), ValueError, "embedding_size must be >= 0"),
        ((4.0, 3), TypeError, "batch_size must be an int"),
        ((4, 3, "bogus"), ValueError, "device must name a torch device"),
    ],
)
def test_auto_chunk_size_checks_its_arguments(args, error, message):
    with pytest.raises(error, match=message):
        auto_chunk_size(*args)


def test_auto_chunk_size_values():
    assert auto_chunk_size(0, 0) == auto_chunk_size(1, 1) >= 256
    assert auto_chunk_size(256, 512, torch.device("cpu")) == auto_chunk_size(256, 512)


class _WrongSlope:
    """phi(z) = 1.5 z whose slope has the wrong shape (a user's error)."""

    def __init__(self, form: str) -> None:
        self.form = form

    def __call__(self, z):
        return 1.5 * z

    def slope(self, z):
        return torch.ones(1, dtype=z.dtype)

    def value_and_slope(self, z):
        return 1.5 * z, torch.ones(1, dtype=z.dtype)

    def scaled_value_and_slope(self, z, s, _target_columns):
        return s * 1.5 * z, torch.ones(z.shape[0], 1, dtype=z.dtype)


def _wrong(form: str):
    """A non-target function with only ``form`` among its slope methods."""
    names = {"slope": ("slope",), "value_and_slope": ("value_and_slope",)}
    names["scaled_value_and_slope"] = ("slope", "scaled_value_and_slope")
    kept = names[form]
    attrs = {name: getattr(_WrongSlope, name) for name in kept}
    return type(f"Wrong_{form}", (), {"__call__": _WrongSlope.__call__, **attrs})()


@pytest.mark.parametrize("form", ["slope", "value_and_slope", "scaled_value_and_slope"])
def test_a_non_target_slope_of_the_wrong_shape_is_an_error(form):
    """A slope that broadcast (shape (1,) or (B, 1)) gave gradients off by several units
    on the blocked path, without a word; now a ValueError names it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    w = torch.randn(5, 8, generator=g)
    y = torch.randint(0, 8, (6,), generator=g)
    with pytest.raises(ValueError, match="non_target_logit_fn's slope must return one value"):
        fused_margin_softmax_cross_entropy(
            x, w, y, None, 10.0, non_target_logit_fn=_wrong(form), materialize=False
        ).sum().backward()


def test_a_constant_scaled_slope_may_be_zero_dim():
    """``scaled_value_and_slope`` may give a 0-dim slope (constant over the block)."""

    class Scaled:
        def __call__(self, z):
            return 1.5 * z

        def slope(self, z):
            return torch.full_like(z, 1.5)

        def scaled_value_and_slope(self, z, s, _target_columns):
            return s * 1.5 * z, torch.tensor(1.5 * s, dtype=z.dtype)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 8, (6,), generator=g)
    got = fused_margin_softmax_cross_entropy(
        x, w, y, None, 10.0, non_target_logit_fn=Scaled(), materialize=False
    )
    (grad,) = torch.autograd.grad(got.sum(), x)
    expected = fused_margin_softmax_cross_entropy(
        x, w, y, None, 10.0, non_target_logit_fn=lambda z: 1.5 * z, materialize=False
    )
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)


class _ConstantSlope:
    """phi(z) = 2 z with its slope as one number for the block (valid: constant)."""

    def __init__(self, slope):
        self.slope_value = slope

    def __call__(self, z):
        return 2.0 * z

    def slope(self, z):
        return self.slope_value


@pytest.mark.parametrize("slope", [2.0, torch.tensor(2.0)], ids=["float", "0-dim"])
@pytest.mark.parametrize(
    "mode",
    [{"chunk_size": 7}, {"materialize": False}, {"sub_centers": 2, "chunk_size": 3}],
    ids=["chunk", "blocked", "sub-centres"],
)
def test_a_constant_slope_for_the_block_is_accepted(slope, mode):
    """A number or 0-dim slope broadcasts correctly (it is constant): the wrong-shape check
    must not refuse it, and the gradients are autograd's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    columns = 14 if "sub_centers" in mode else 7
    w = torch.randn(5, columns, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (8,), generator=g)
    losses = []
    for phi in (_ConstantSlope(slope), lambda z: 2.0 * z):
        value = fused_margin_softmax_cross_entropy(
            x, w, y, None, 10.0, non_target_logit_fn=phi, **mode
        )
        losses.append((value, torch.autograd.grad(value.sum(), x)[0]))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    torch.testing.assert_close(losses[0][1], losses[1][1])


@pytest.mark.parametrize(
    ("slope", "message"),
    [
        (torch.tensor(2.0, device="meta"), "must be real and on cpu"),
        (torch.full((8, 7), 2.0, device="meta"), "must be real and on cpu"),
        (torch.full((8, 7), 2.0 + 0j), "must be real"),
        (torch.tensor(2.0 + 0j), "must be real"),
        (torch.tensor(True), "must be real"),
        (True, "must return one value per input element"),
        (10**400, "must be finite"),
    ],
    ids=["meta", "meta-full", "complex-full", "complex", "bool-tensor", "bool", "huge-int"],
)
def test_a_constant_slope_must_be_a_real_number_here(slope, message):
    """A 0-dim slope on the meta device gave wrong gradients silently; complex and bool
    ones failed inside torch or were taken as numbers (review)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, requires_grad=True)
    w = torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (8,), generator=g)
    with pytest.raises(ValueError, match=message):
        fused_margin_softmax_cross_entropy(
            x, w, y, None, 10.0, non_target_logit_fn=_ConstantSlope(slope), chunk_size=3
        ).sum().backward()


@pytest.mark.parametrize(
    "slope", [np.float32(2.0), torch.tensor(2), torch.tensor(2.0, dtype=torch.float64)]
)
def test_real_constant_slopes_of_any_real_dtype(slope):
    """An integer 0-dim slope worked before the device/dtype check and must still."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, requires_grad=True)
    w = torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (8,), generator=g)
    got = fused_margin_softmax_cross_entropy(
        x, w, y, None, 10.0, non_target_logit_fn=_ConstantSlope(slope), chunk_size=3
    )
    expected = fused_margin_softmax_cross_entropy(
        x, w, y, None, 10.0, non_target_logit_fn=lambda z: 2.0 * z, chunk_size=3
    )
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0]
    )


def test_a_numpy_float32_constant_slope_is_a_number():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (8,), generator=g)
    got = fused_margin_softmax_cross_entropy(
        x, w, y, None, 10.0, non_target_logit_fn=_ConstantSlope(np.float32(2.0)), chunk_size=3
    )
    expected = fused_margin_softmax_cross_entropy(
        x, w, y, None, 10.0, non_target_logit_fn=lambda z: 2.0 * z, chunk_size=3
    )
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0]
    )
