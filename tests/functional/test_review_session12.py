"""Corners of the public functions found by review (2026-12-01, third session): results
that overflow from finite input, refusals for a norm never taken, empty problems,
integer cosines and a huge class count."""

from __future__ import annotations

import pytest
import torch

import pml_margins
import pml_margins.functional as F


def test_center_distances_take_no_norm_and_keep_what_float32_holds():
    y = torch.tensor([0])
    # (x - c)^2 = 4e38 overflowed before the halving; 2e38 fits float32
    got = F.center_distances(torch.tensor([[1e19]]), torch.tensor([[-1e19]]), y)
    assert torch.isfinite(got).all() and got.item() == pytest.approx(2e38, rel=1e-6)
    # |x|^2 overflows, |x - c|^2 is 0: refused before for a normalization never made
    assert F.center_distances(torch.tensor([[6e19]]), torch.tensor([[6e19]]), y).item() == 0


def test_center_distances_that_overflow_are_refused_unless_value_checks_are_off():
    x, c, y = torch.tensor([[3e19]]), torch.tensor([[-1e19]]), torch.tensor([0])
    with pytest.raises(ValueError, match=r"center_distances gave non-finite values"):
        F.center_distances(x, c, y)
    with pml_margins.value_checks(False):
        assert torch.isinf(F.center_distances(x, c, y)).all()


def test_center_ema_update_is_the_papers_sum_of_gaps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    c = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 3, 0, 3, 1])
    want = c.clone()
    for j in range(4):  # Wen et al., Eq. 4: sum of (c_j - x_i) over (1 + n_j)
        rows = y == j
        want[j] = c[j] - 0.5 * (c[j] - x[rows]).sum(0) / (1 + rows.sum())
    before = c.clone()
    torch.testing.assert_close(F.center_ema_update(c, x, y, 0.5), want, rtol=0, atol=1e-15)
    assert torch.equal(c, before)


def test_center_ema_update_of_large_close_values_stays_finite():
    # n c - sum x overflowed (NaN centres) where every c - x is 0
    c, x = torch.full((1, 4), 3e38), torch.full((2, 4), 3e38)
    new = F.center_ema_update(c, x, torch.tensor([0, 0]), 0.5)
    assert torch.equal(new, c)


def test_center_ema_update_that_leaves_the_range_is_refused():
    c, x = torch.full((1, 2), -3e38), torch.full((2, 2), 3e38)  # gaps of -6e38
    with pytest.raises(ValueError, match="center_ema_update gave non-finite values"):
        F.center_ema_update(c, x, torch.tensor([0, 0]), 0.5)


@pytest.mark.parametrize("kwargs", [{}, {"materialize": False}, {"chunk_size": 2}])
def test_unnormalized_fused_logits_that_overflow_are_refused(kwargs):
    x, w = torch.full((3, 4), 1e12), torch.full((4, 5), 1e12)  # x.w = 4e24, s x.w = 4e39
    y = torch.tensor([0, 4, 2])
    with pytest.raises(ValueError, match=r"logits s x\.w are not bounded and overflowed"):
        F.fused_margin_softmax_cross_entropy(
            x, w, y, None, 1e15, normalize_embeddings=False, normalize_weight=False, **kwargs
        )
    got = F.fused_margin_softmax_cross_entropy(
        x / 1e12, w / 1e12, y, None, 2.0, normalize_embeddings=False, normalize_weight=False
    )
    assert torch.isfinite(got).all()


def _circle_calls():
    sim = torch.tensor([[-1e19, 1e19]])
    pos, neg = torch.tensor([[True, False]]), torch.tensor([[False, True]])
    s_p, s_n, anchors = torch.tensor([-1e19]), torch.tensor([1e19]), torch.tensor([0])
    return {
        "dense": lambda: F.circle_loss_dense(sim, pos, neg, 0.25, 80.0),
        "masked": lambda: F.circle_loss_masked(sim, pos, neg, 0.25, 80.0),
        "dense_negatives": lambda: F.circle_loss_dense_negatives(
            sim, neg, torch.tensor([0]), 0.25, 80.0
        ),
        "pairs": lambda: F.circle_loss_pairs(s_p, anchors, s_n, anchors, 1, 0.25, 80.0),
        "whole": lambda: F.circle_loss_whole(s_p, s_n, 0.25, 80.0),
    }


@pytest.mark.parametrize("path", list(_circle_calls()))
def test_circle_similarities_far_outside_the_cosines_are_refused_on_every_path(path):
    # the pair logits overflow: NaN on some paths, inf on others, without an error
    with pytest.raises(ValueError, match="similarities far outside the cosines"):
        _circle_calls()[path]()


def test_cosface_margin_bound_takes_a_class_count_beyond_a_float():
    assert F.cosface_margin_upper_bound(10**400, 2) == 0.0
    assert F.cosface_margin_upper_bound(4, 2) == pytest.approx(1.0)
    assert F.cosface_margin_upper_bound(1000, 2) == pytest.approx(2 * torch.pi**2 / 1e6, 1e-5)


@pytest.mark.parametrize(
    "kwargs", [{}, {"materialize": False}, {"chunk_size": 2}, {"chunk_size": "auto"}]
)
def test_no_class_and_no_row_give_no_loss_on_every_path(kwargs):
    x = torch.zeros(0, 4, requires_grad=True)
    w = torch.zeros(4, 0, requires_grad=True)
    losses = F.fused_margin_softmax_cross_entropy(
        x, w, torch.zeros(0, dtype=torch.long), None, 2.0, **kwargs
    )
    losses.sum().backward()
    assert losses.shape == (0,) and w.grad.shape == (4, 0) and x.grad.shape == (0, 4)


def test_integer_cosines_give_floating_polynomials_and_results_are_new_tensors():
    c = torch.tensor([0, 1])
    assert F.cos_multiple_angle(c, 2.5).dtype == torch.get_default_dtype()
    torch.testing.assert_close(F.cos_multiple_angle(c, 2.5), F.cos_multiple_angle(c.float(), 2.5))
    assert F.sphereface_psi(c, 2).dtype == torch.get_default_dtype()
    value, slope = F.sphereface_value_and_slope(c, 2)
    assert value.is_floating_point() and slope.is_floating_point()
    cosine = torch.tensor([0.3, -0.2])
    once = F.cos_multiple_angle(cosine, 1)
    once.add_(1.0)  # the caller's tensor is not the result
    assert torch.equal(cosine, torch.tensor([0.3, -0.2]))


def test_center_ema_update_is_batched_by_vmap():
    g = torch.Generator().manual_seed(2)
    c, x = torch.randn(3, 4, generator=g), torch.randn(5, 8, 4, generator=g)
    y = torch.randint(0, 3, (5, 8), generator=g)
    batched = torch.func.vmap(F.center_ema_update, in_dims=(None, 0, 0, None))(c, x, y, 0.5)
    one_by_one = torch.stack([F.center_ema_update(c, x[i], y[i], 0.5) for i in range(5)])
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=0)


def test_center_ema_update_takes_its_gaps_in_the_embeddings_precision():
    # float64 gaps of 6e38 between float32 centres and embeddings: the new centre fits
    c, x = torch.full((1, 2), 3e38), torch.full((1, 2), -3e38, dtype=torch.float64)
    new = F.center_ema_update(c, x, torch.tensor([0]), 0.5)
    assert new.dtype == torch.float32 and torch.equal(new, torch.full((1, 2), 1.5e38))


def test_raw_rows_whose_squared_norm_overflows_are_not_refused_where_none_is_taken():
    x = torch.randn(3, 4)
    x[0] = 1e19  # |x|^2 overflows float32; x.w = 4e9 does not
    w, y = torch.full((4, 5), 1e-10), torch.tensor([0, 1, 2])
    raw = {"normalize_embeddings": False, "normalize_weight": False}
    got = F.fused_margin_softmax_cross_entropy(x, w, y, None, 1.0, **raw)
    want = F.fused_margin_softmax_cross_entropy(x.double(), w.double(), y, None, 1.0, **raw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="its square overflows"):  # (normalized: taken)
        F.fused_margin_softmax_cross_entropy(x, w, y, None, 1.0)
