"""The public functions check what a researcher passes them as the losses do: a clear
``ValueError``/``TypeError`` instead of a wrong number, a silent NaN or an error from
inside torch; inside a loss's forward, which has checked the same tensors, they read no
value again (found by review)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import pml_margins.validation as validation
from pml_margins.distributed import shard_range, shard_ranges
from pml_margins.evaluation import exact_knn
from pml_margins.functional import (
    arcface_target,
    arcface_value_and_slope,
    center_distances,
    center_ema_update,
    circle_loss_dense,
    circle_loss_dense_negatives,
    circle_loss_masked,
    circle_loss_pairs,
    circle_loss_whole,
    circle_negative_logits,
    circle_positive_logits,
    class_columns,
    combined_margin_target,
    cos_multiple_angle,
    cosface_target,
    fused_margin_softmax_cross_entropy,
    margin_softmax_cross_entropy,
    sample_classes,
    segment_logsumexp,
)
from pml_margins.losses import ArcFaceLoss, CenterLoss, CircleLoss

X, W = torch.randn(4, 3), torch.randn(3, 5)
S4, A4, SIM = torch.rand(4), torch.tensor([0, 1, 2, 0]), torch.rand(3, 4)
Y4 = torch.tensor([0, 1, 2, 4])


def _i(*values: int) -> torch.Tensor:
    return torch.tensor(values)


def _mask(rows: int, cols: int) -> torch.Tensor:
    return torch.eye(rows, cols, dtype=torch.bool)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: center_distances(X, torch.zeros(5, 3), torch.tensor([1])), ValueError, "length 1"),
        (
            lambda: center_distances(X, torch.zeros(5, 3), torch.tensor([0.5] * 4)),
            TypeError,
            "integer",
        ),
        (
            lambda: center_distances(X, torch.zeros(5, 3), torch.tensor([0, 1, 2, 5])),
            ValueError,
            r"\[0, 5\)",
        ),
        (
            lambda: center_distances(X, torch.zeros(5, 2), torch.tensor([0, 1, 2, 3])),
            ValueError,
            "width",
        ),
        (
            lambda: center_ema_update(
                torch.zeros(5, 3), X.clone().fill_(math.nan), torch.arange(4), 0.5
            ),
            ValueError,
            "NaN",
        ),
        (
            lambda: margin_softmax_cross_entropy(
                torch.randn(4, 5), torch.tensor([0, 1, 2, -100]), None
            ),
            ValueError,
            r"\[0, 5\)",
        ),
        (
            lambda: margin_softmax_cross_entropy(torch.randn(4, 5), torch.arange(4), None, 1e300),
            ValueError,
            "scale",
        ),
        (
            lambda: fused_margin_softmax_cross_entropy(
                X, W, torch.tensor([0, 1, 2, 5]), None, 30.0
            ),
            ValueError,
            r"\[0, 5\)",
        ),
        (
            lambda: fused_margin_softmax_cross_entropy(X, W, torch.arange(4), None, 1e300),
            ValueError,
            "scale",
        ),
        (
            lambda: fused_margin_softmax_cross_entropy(X, W, torch.arange(4), None, True),
            TypeError,
            "scale",
        ),
        (
            lambda: fused_margin_softmax_cross_entropy(
                X.clone().fill_(math.inf), W, torch.arange(4), None, 30.0
            ),
            ValueError,
            "NaN or Inf",
        ),
        (lambda: arcface_target(torch.zeros(3), 28.6), ValueError, "margin"),
        (lambda: cosface_target(torch.zeros(3), math.nan), ValueError, "margin must be finite"),
        (lambda: combined_margin_target(torch.zeros(3), 0, 0.3, 0.0), ValueError, "m1"),
        (lambda: class_columns(torch.tensor([0, 1]), 2.5), TypeError, "per_class"),
        (lambda: class_columns(torch.tensor([0.0, 1.0]), 2), TypeError, "integer dtype"),
        (lambda: sample_classes(torch.tensor([0, 1]), 0, 0.5), ValueError, "num_classes"),
        (lambda: shard_ranges(10.5, 2), TypeError, "num_classes"),
        (lambda: shard_range(10, 2, 1.0), ValueError, "rank"),
        (lambda: exact_knn(X, X, 2, normalize="no"), TypeError, "normalize must be a bool"),
        # a tensor scale: NaN/Inf values and other shapes (NaN losses, broadcasting)
        (
            lambda: fused_margin_softmax_cross_entropy(X, W, Y4, None, torch.tensor(math.nan)),
            ValueError,
            "scale contains NaN or Inf",
        ),
        (
            lambda: margin_softmax_cross_entropy(
                X @ W, Y4, None, torch.tensor([1.0, 2, math.inf, 3])
            ),
            ValueError,
            "scale contains NaN or Inf",
        ),
        (
            lambda: margin_softmax_cross_entropy(X @ W, Y4, None, torch.ones(5)),
            ValueError,
            "one entry or one per row \\(4,\\)",
        ),
        # the Circle functions (found by review: torch's index/size errors, silent numbers)
        (
            lambda: circle_loss_pairs(S4, A4, S4, _i(0, 1, 2, 5), 3, 0.25, 64.0),
            ValueError,
            "neg_anchors must lie in \\[0, 3\\) for num_anchors=3",
        ),
        (
            lambda: circle_loss_pairs(S4, _i(0, 1, 2), S4, A4, 3, 0.25, 64.0),
            ValueError,
            "pos_anchors has length 3 but s_p has 4",
        ),
        (
            lambda: circle_loss_pairs(S4, A4.float(), S4, A4, 3, 0.25, 64.0),
            TypeError,
            "pos_anchors must have an integer dtype",
        ),
        (
            lambda: circle_loss_pairs(S4[None], A4, S4, A4, 3, 0.25, 64.0),
            ValueError,
            "s_p must be 1-D",
        ),
        (
            lambda: circle_loss_pairs(S4, A4, S4, A4, -1, 0.25, 64.0),
            ValueError,
            "num_anchors must be >= 0",
        ),
        (
            lambda: circle_loss_pairs(S4, A4, S4, A4, 3.0, 0.25, 64.0),
            TypeError,
            "num_anchors must be an int",
        ),
        (lambda: segment_logsumexp(S4, A4, True), TypeError, "num_segments must be an int"),
        (
            lambda: circle_loss_dense(SIM, _mask(3, 3), ~_mask(3, 4), 0.25, 64.0),
            ValueError,
            "pos_mask has shape \\(3, 3\\), expected \\(3, 4\\)",
        ),
        (
            lambda: circle_loss_dense(SIM, _mask(3, 4).float(), ~_mask(3, 4), 0.25, 64.0),
            TypeError,
            "pos_mask must be a torch.bool tensor",
        ),
        (
            lambda: circle_loss_dense(SIM, ~_mask(3, 4), ~_mask(3, 4), 0.25, 64.0),
            ValueError,
            "pos_mask and neg_mask share pairs",
        ),
        (
            lambda: circle_loss_dense(SIM * math.nan, _mask(3, 4), ~_mask(3, 4), 0.25, 64.0),
            ValueError,
            "sim contains NaN or Inf",
        ),
        (
            lambda: circle_loss_masked(SIM[0], _mask(3, 4), ~_mask(3, 4), 0.25, 64.0),
            ValueError,
            "sim must be 2-D",
        ),
        (
            lambda: circle_loss_dense_negatives(SIM, _mask(3, 4), _i(0, 99), 0.25, 64.0),
            ValueError,
            "pos_keys must lie in \\[0, 12\\)",
        ),
        (
            lambda: circle_loss_dense_negatives(SIM, ~_mask(3, 4), _i(0, 1), 0.25, 64.0),
            ValueError,
            "pos_keys and neg_mask share pairs",
        ),
        (lambda: circle_loss_whole(S4, S4 / 0, 0.25, 64.0), ValueError, "s_n contains NaN or Inf"),
        (lambda: circle_positive_logits(S4, 0.25, -64.0), ValueError, "gamma must be > 0"),
        (
            lambda: circle_loss_dense(SIM[:, :0], _mask(3, 0), _mask(3, 0), 3e3, 64.0),
            ValueError,
            "m must lie in",
        ),
        (
            lambda: circle_loss_dense_negatives(SIM[:, :0], _mask(3, 0), _i(), 0.25, 0.0),
            ValueError,
            "gamma must be > 0",
        ),
        (lambda: circle_negative_logits(S4, -5e3, 64.0), ValueError, "m must lie in"),
        (
            lambda: segment_logsumexp(S4, A4, 2),
            ValueError,
            "segments must lie in \\[0, 2\\) for num_segments=2",
        ),
        # flags and a generator of the functional API (found by review: "no" was truthy,
        # and an int generator failed inside sampling with an AttributeError)
        (
            lambda: fused_margin_softmax_cross_entropy(X, W, A4, None, normalize_weight="no"),
            TypeError,
            "normalize_weight must be a bool",
        ),
        (
            lambda: fused_margin_softmax_cross_entropy(X, W, A4, None, normalize_embeddings=0),
            TypeError,
            "normalize_embeddings must be a bool",
        ),
        (
            lambda: fused_margin_softmax_cross_entropy(X, W, A4, None, materialize="yes"),
            TypeError,
            "materialize must be a bool",
        ),
        (
            lambda: fused_margin_softmax_cross_entropy(
                X, W, A4, None, sample_rate=0.5, generator=3
            ),
            TypeError,
            "generator must be a torch.Generator, got int",
        ),
        (lambda: arcface_target(S4, 0.5, easy_margin="no"), TypeError, "easy_margin must be"),
        # a function returning another shape: scatter's or gather's internal error before
        *(
            (
                lambda materialize=materialize: fused_margin_softmax_cross_entropy(
                    X, W, A4, lambda c: c[:2], materialize=materialize
                ),
                ValueError,
                "target_logit_fn must return one value per input element, "
                "shape \\(4,\\), got \\(2,\\)",
            )
            for materialize in (True, False)
        ),
        (
            lambda: fused_margin_softmax_cross_entropy(
                X, W, A4, None, non_target_logit_fn=lambda c: c.sum(1), materialize=False
            ),
            ValueError,
            "non_target_logit_fn must return one value per input element",
        ),
        (
            lambda: margin_softmax_cross_entropy(SIM.t(), A4[:4] % 3, lambda c: c.mean()),
            ValueError,
            "target_logit_fn must return one value per input element, shape \\(4,\\), got \\(\\)",
        ),
        (lambda: cos_multiple_angle(S4, math.nan), ValueError, "multiplier must be a finite"),
        (lambda: cos_multiple_angle(S4, 10**6), ValueError, "\\|m\\| <= 100"),
        (lambda: cos_multiple_angle(S4, 10**400), ValueError, "\\|m\\| <= 100"),
        (lambda: cos_multiple_angle(S4, Fraction(10**400, 3)), ValueError, "\\|m\\| <= 100"),
        (lambda: cos_multiple_angle(S4, torch.tensor(101.0)), ValueError, "\\|m\\| <= 100"),
        (lambda: cos_multiple_angle(S4, torch.tensor(1e8)), ValueError, "\\|m\\| <= 100"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_circle_functions_take_logits_of_minus_inf_integer_sizes_and_an_empty_batch():
    """(found by review of their new checks) -inf is log 0 in segment_logsumexp; sizes
    may be numpy or 0-dim tensor integers; zero anchors give an empty result."""
    lse, present = segment_logsumexp(torch.tensor([0.5, -math.inf, 1.0]), _i(0, 0, 1), 2)
    torch.testing.assert_close(lse, torch.tensor([0.5, 1.0]))
    assert present.tolist() == [True, True]
    s_p, anchors = torch.tensor([0.5, 0.7]), _i(0, 1)
    expected = circle_loss_pairs(s_p, anchors, s_p - 0.4, anchors, 2, 0.25, 64.0)
    for size in (np.int64(2), torch.tensor(2)):
        got = circle_loss_pairs(s_p, anchors, s_p - 0.4, anchors, size, 0.25, 64.0)
        torch.testing.assert_close(got, expected)
    empty, none = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    assert circle_loss_pairs(empty, none, empty, none, 0, 0.25, 64.0).shape == (0,)
    no_positive = circle_loss_dense_negatives(SIM, ~_mask(3, 4), none, 0.25, 64.0)
    assert torch.equal(no_positive, torch.zeros(3))


def test_a_segment_of_minus_inf_only_is_log_0_with_zero_gradients():
    """(found by review) it read as an empty segment: log 1 = 0 and not present."""
    values = torch.tensor([-math.inf, 0.5, -math.inf, -math.inf, 2.0], requires_grad=True)
    lse, present = segment_logsumexp(values, _i(0, 0, 1, 1, 3), 4)
    assert present.tolist() == [True, True, False, True]
    assert lse[1] == -math.inf and lse[2] == 0
    torch.testing.assert_close(lse[[0, 3]], torch.tensor([0.5, 2.0]))
    (grad,) = torch.autograd.grad(lse[[0, 3]].sum(), values)
    assert torch.equal(grad, torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0]))


def test_circle_masks_batched_at_different_vmap_levels_are_compared_lane_by_lane():
    sim = torch.rand(3, 4)
    pos = torch.zeros(2, 3, 4, dtype=torch.bool)
    pos[:, 0, 0] = True
    neg = torch.zeros(3, 3, 4, dtype=torch.bool)
    neg[:, 1, 1] = True

    def nested(negatives):
        inner = torch.func.vmap(lambda n, p: circle_loss_masked(sim, p, n, 0.25, 16.0), (0, None))
        return torch.func.vmap(lambda p: inner(negatives, p))(pos)

    assert nested(neg).shape == (2, 3, 3)  # (positive lanes, negative lanes, rows)
    neg[1, 0, 0] = True  # overlaps every positive mask in one lane
    with pytest.raises(ValueError, match="share pairs"):
        nested(neg)


def test_an_integer_or_0_dim_tensor_scale_is_still_taken():
    fused = fused_margin_softmax_cross_entropy(X, W, Y4, None, 30.0)
    plain = margin_softmax_cross_entropy(X @ W, Y4, None, 30.0)
    for scale in (
        torch.tensor(30),
        torch.tensor(30.0),
        torch.full((4,), 30.0),
        torch.tensor([30.0]),  # one entry, as broadcasting reads it (found by review)
        torch.full((4, 1), 30.0),
    ):
        torch.testing.assert_close(fused_margin_softmax_cross_entropy(X, W, Y4, None, scale), fused)
        torch.testing.assert_close(margin_softmax_cross_entropy(X @ W, Y4, None, scale), plain)


def test_a_negative_multiplier_is_the_positive_one():
    """cos(-m theta) = cos(m theta): m = -2 returned cos(theta) itself."""
    c = torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64)
    assert torch.equal(cos_multiple_angle(c, -2), cos_multiple_angle(c, 2))
    torch.testing.assert_close(cos_multiple_angle(c, -2), torch.cos(2 * torch.acos(c)))


def test_an_empty_batch_is_still_an_empty_result():
    out = fused_margin_softmax_cross_entropy(
        torch.randn(0, 3), W, torch.zeros(0, dtype=torch.long), None, 30.0
    )
    assert out.shape == (0,)


def test_a_losss_forward_reads_its_inputs_once(monkeypatch):
    """The loss checks its inputs in one read; the functions it calls skip theirs."""
    reads = []
    run = validation.ValueChecks.run

    def counted(self):
        reads.append(self.enabled)
        return run(self)

    monkeypatch.setattr(validation.ValueChecks, "run", counted)
    monkeypatch.setattr(validation, "_host_array", lambda values: None)  # the device path
    monkeypatch.setattr(validation, "usual_cpu_batch_passes", lambda *args: False)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = (ArcFaceLoss(3, 4), ArcFaceLoss(3, 4, chunk_size=2), CenterLoss(3, 4), CircleLoss())
    for loss in losses:
        reads.clear()
        loss(x, y)
        assert reads.count(True) == 1, type(loss).__name__
    reads.clear()
    fused_margin_softmax_cross_entropy(x, torch.randn(4, 3), y, None, 30.0)
    assert reads.count(True) == 1  # called directly: it checks


def test_logits_may_mask_a_class_with_minus_inf():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    logits[:, 4] = -math.inf
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(margin_softmax_cross_entropy(logits, labels, None), expected)


def test_a_learnable_margin_keeps_its_gradient():
    margin = torch.nn.Parameter(torch.tensor(0.2))
    cosface_target(torch.tensor([0.5, 0.1]), margin).sum().backward()
    assert float(margin.grad) == -2.0
    per_row = torch.tensor([0.1, 0.3])
    got = cosface_target(torch.tensor([0.5, 0.1]), per_row)
    torch.testing.assert_close(got, torch.tensor([0.4, -0.2]))


def test_the_center_functions_take_an_empty_batch():
    centers = torch.randn(5, 3)
    empty, none = torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    assert center_distances(empty, centers, none).shape == (0,)
    assert torch.equal(center_ema_update(centers, empty, none, 0.5), centers)


def test_a_learnable_arcface_margin_gets_the_gradient_of_its_formula():
    """math.cos of a tensor margin cut its graph: the gradient came out 0."""
    c = torch.tensor([-0.9, 0.2, 0.7], dtype=torch.float64)
    margin = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    arcface_target(c, margin).sum().backward()
    ref = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    theta = torch.acos(c)
    fallback = c - ref * torch.sin(ref)
    torch.where(theta + ref < math.pi, torch.cos(theta + ref), fallback).sum().backward()
    torch.testing.assert_close(margin.grad, ref.grad)
    per_row = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64, requires_grad=True)
    combined_margin_target(c, 1.0, per_row, 0.0).sum().backward()
    assert per_row.grad is not None and bool((per_row.grad != 0).all())
    with pytest.raises(ValueError, match="radians"):
        arcface_target(c, torch.tensor(30.0))  # a CPU tensor's values are still checked


def test_checks_stay_when_compiled_and_in_user_code_inside_a_loss():
    """Only the value reads are skipped while torch.compile traces; a reducer's own call
    into a public function (inside a loss's forward) is checked."""
    from pytorch_metric_learning.reducers import MeanReducer

    compiled = torch.compile(margin_softmax_cross_entropy, backend="eager")
    with pytest.raises(TypeError, match="integer"):
        compiled(torch.randn(4, 5), torch.arange(4) + 0.5, None)
    seen = []

    class Probe(MeanReducer):
        def forward(self, loss_dict, embeddings, labels):
            try:
                arcface_target(torch.zeros(2), 30.0)
            except ValueError as err:
                seen.append(str(err))
            return super().forward(loss_dict, embeddings, labels)

    ArcFaceLoss(3, 4, reducer=Probe())(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert seen and "radians" in seen[0]


def test_an_empty_batch_still_checks_the_centers():
    with pytest.raises(TypeError, match="centers"):
        center_distances(torch.zeros(0, 3), torch.zeros(5, 3, dtype=torch.long), torch.zeros(0))
    with pytest.raises(ValueError, match="width 4 but the centers' width is 3"):
        center_distances(torch.zeros(0, 4), torch.zeros(5, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="embeddings must have dtype"):
        center_distances(torch.zeros(0, 3, dtype=torch.long), torch.zeros(5, 3), torch.zeros(0))


def test_tensor_margins_under_vmap_and_a_zero_tensor_m2():
    from pml_margins.functional.target_logits import combined_margin_value_and_slope

    cos = torch.tensor([0.1, 0.5, 0.9])
    out = torch.func.vmap(lambda m: cosface_target(cos, m))(torch.tensor([0.3, 0.5]))
    assert out.shape == (2, 3)
    with pytest.raises(ValueError, match="margin"):
        torch.func.vmap(lambda m: cosface_target(cos, m))(torch.tensor([0.3, float("nan")]))
    value, slope = combined_margin_value_and_slope(cos, 2.0, torch.tensor(0.0), 0.1)
    expected = combined_margin_value_and_slope(cos, 2.0, 0.0, 0.1)
    assert torch.equal(value, expected[0]) and torch.equal(slope, expected[1])


def test_sparse_or_nested_tensors_are_named():
    """The public functions name a sparse or nested input instead of failing inside an op."""
    x, w, y = torch.randn(2, 4), torch.randn(4, 3), torch.tensor([0, 1])
    rows = torch.nested.nested_tensor(list(x))
    with pytest.raises(TypeError, match="embeddings must be a dense tensor, got a nested"):
        fused_margin_softmax_cross_entropy(rows, w, y, None, 30.0)
    with pytest.raises(TypeError, match="weight must be a dense tensor, got layout"):
        fused_margin_softmax_cross_entropy(x, w.to_sparse(), y, None, 30.0)
    with pytest.raises(TypeError, match="logits must be a dense tensor, got layout"):
        margin_softmax_cross_entropy(x.to_sparse(), y, None)
    with pytest.raises(TypeError, match="labels must be a dense tensor, got layout"):
        margin_softmax_cross_entropy(x, y.to_sparse(), None)
    empty = torch.empty(0, 4).to_sparse()  # the empty batch's early return checks it too
    with pytest.raises(TypeError, match="embeddings must be a dense tensor, got layout"):
        fused_margin_softmax_cross_entropy(empty, w, y[:0], None, 30.0)


@pytest.mark.parametrize("margin", [-0.3, -1.2, 0.3])
def test_a_negative_arcface_margin_is_cos_theta_plus_m_everywhere(margin):
    """m < 0 (PML takes it): cos(theta + m) at every angle, pi included, as a number, a
    tensor, under vmap and with its slope; m > 0 keeps the fallback beyond pi - m."""
    c = torch.tensor([-1.0, -0.999, -0.9, -0.2, 0.0, 0.4, 0.95, 1.0], dtype=torch.float64)
    theta = torch.acos(c)
    expected = torch.cos(theta + margin)
    if margin > 0:
        expected = torch.where(theta + margin <= math.pi, expected, c - margin * math.sin(margin))
    torch.testing.assert_close(arcface_target(c, margin), expected)
    torch.testing.assert_close(arcface_target(c, torch.tensor(margin).double()), expected)
    value, slope = arcface_value_and_slope(c, margin)
    torch.testing.assert_close(value, expected)
    inner = c.abs() < 1
    by_autograd = torch.func.vmap(torch.func.grad(lambda z: torch.cos(torch.acos(z) + margin)))
    if margin < 0:
        torch.testing.assert_close(slope[inner], by_autograd(c[inner]))
    lanes = torch.func.vmap(lambda m: arcface_target(c, m))(torch.tensor([margin, 0.0]).double())
    torch.testing.assert_close(lanes[0], expected)


def test_logits_of_another_kind_are_named_by_their_dtype_or_type():
    """(found by review: an integer tensor was "got Tensor")"""
    labels = torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"logits must be a floating tensor, got torch.int64"):
        margin_softmax_cross_entropy(torch.ones(2, 3, dtype=torch.long), labels, None)
    with pytest.raises(TypeError, match=r"logits must be a floating tensor, got list"):
        margin_softmax_cross_entropy([[1.0, 2.0]] * 2, labels, None)
