"""Bad input raises a clear TypeError/ValueError naming the problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pml_margins.losses import (
    AdaCosLoss,
    AdaFaceLoss,
    ArcFaceLoss,
    CircleLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    NormSoftmaxLoss,
    SoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from tests.losses.specs import SPEC_IDS, SPECS, LossSpec


def _ok(batch: int = 4):
    return torch.randn(batch, 8), torch.tensor([0, 1, 2, 3][:batch])


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
class TestForwardInput:
    def test_label_above_range(self, spec: LossSpec) -> None:
        x, _ = _ok()
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).*\[0, 5\]"):
            spec.build(5, 8)(x, torch.tensor([0, 1, 2, 5]))

    def test_negative_label(self, spec: LossSpec) -> None:
        x, _ = _ok()
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
            spec.build(5, 8)(x, torch.tensor([0, -1, 2, 3]))

    def test_float_labels(self, spec: LossSpec) -> None:
        x, _ = _ok()
        with pytest.raises(TypeError, match="labels must have an integer dtype"):
            spec.build(5, 8)(x, torch.tensor([0.0, 1.0, 2.0, 3.0]))

    def test_missing_labels(self, spec: LossSpec) -> None:
        with pytest.raises(ValueError, match="requires labels"):
            spec.build(5, 8)(torch.randn(4, 8))

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_non_finite_embeddings(self, spec: LossSpec, bad: float) -> None:
        x, y = _ok()
        x[1, 3] = bad
        with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
            spec.build(5, 8)(x, y)

    def test_wrong_width(self, spec: LossSpec) -> None:
        with pytest.raises(ValueError, match="embeddings has width 7 but embedding_size is 8"):
            spec.build(5, 8)(torch.randn(4, 7), torch.tensor([0, 1, 2, 3]))

    def test_length_mismatch(self, spec: LossSpec) -> None:
        with pytest.raises(ValueError, match="labels has length 3 but there are 4 embeddings"):
            spec.build(5, 8)(torch.randn(4, 8), torch.tensor([0, 1, 2]))

    def test_empty_batch(self, spec: LossSpec) -> None:
        with pytest.raises(ValueError, match="embeddings is empty"):
            spec.build(5, 8)(torch.randn(0, 8), torch.tensor([], dtype=torch.long))

    def test_one_dimensional_embeddings(self, spec: LossSpec) -> None:
        with pytest.raises(ValueError, match="embeddings must be 2-D"):
            spec.build(5, 8)(torch.randn(8), torch.tensor([0]))

    def test_integer_embeddings(self, spec: LossSpec) -> None:
        with pytest.raises(TypeError, match="embeddings must have a floating dtype"):
            spec.build(5, 8)(torch.ones(4, 8, dtype=torch.long), torch.tensor([0, 1, 2, 3]))

    def test_ref_emb(self, spec: LossSpec) -> None:
        x, y = _ok()
        with pytest.raises(ValueError, match="ref_emb/ref_labels are not supported"):
            spec.build(5, 8)(x, y, ref_emb=x.clone(), ref_labels=y)
        with pytest.raises(ValueError, match="ref_emb/ref_labels are not supported"):
            spec.build(5, 8)(x, y, ref_emb=x)  # ref_labels missing: PML refuses it too

    def test_ref_emb_that_is_the_batch_is_accepted_as_pml_does(self, spec: LossSpec) -> None:
        x, y = _ok()
        loss_fn = spec.build(5, 8).eval()  # no buffer moves between the two calls
        torch.manual_seed(0)
        alone = loss_fn(x, y)
        torch.manual_seed(0)
        torch.testing.assert_close(loss_fn(x, y, None, x, y), alone, rtol=0, atol=0)

    def test_bad_indices_tuple_arity(self, spec: LossSpec) -> None:
        x, y = _ok()
        with pytest.raises(ValueError, match="indices_tuple must have 3 elements"):
            spec.build(5, 8)(x, y, (torch.tensor([0]), torch.tensor([1])))

    def test_indices_out_of_range(self, spec: LossSpec) -> None:
        x, y = _ok()
        bad = (torch.tensor([0]), torch.tensor([9]), torch.tensor([1]))
        with pytest.raises(ValueError, match=r"indices_tuple\[p\] .* must lie in \[0, 4\)"):
            spec.build(5, 8)(x, y, bad)

    def test_sparse_or_nested_input(self, spec: LossSpec) -> None:
        """Sparse and nested tensors are named, not left to an op that lacks their kernel."""
        x, y = _ok()
        loss_fn = spec.build(5, 8)
        with pytest.raises(TypeError, match="embeddings must be a dense tensor, got layout"):
            loss_fn(x.to_sparse(), y)
        with pytest.raises(TypeError, match="embeddings must be a dense tensor, got layout"):
            loss_fn(x.to_sparse_csr(), y)
        with pytest.raises(TypeError, match="labels must be a dense tensor, got layout"):
            loss_fn(x, y.to_sparse())
        with pytest.raises(TypeError, match="embeddings must be a dense tensor, got a nested"):
            loss_fn(torch.nested.nested_tensor([x]), y)
        rows = torch.nested.nested_tensor(list(x))  # 2-D: B rows of width D, no sizes
        with pytest.raises(TypeError, match="embeddings must be a dense tensor, got a nested"):
            loss_fn(rows, y)
        sparse_miner = (torch.tensor([0]), torch.tensor([1]).to_sparse(), torch.tensor([2]))
        with pytest.raises(TypeError, match=r"indices_tuple\[p\] must be a dense tensor"):
            loss_fn(x, y, sparse_miner)

    def test_get_logits_checks_width(self, spec: LossSpec) -> None:
        with pytest.raises(ValueError, match="width 3"):
            spec.build(5, 8).get_logits(torch.randn(2, 3))


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: CosFaceLoss(5, 8, margin=-0.1), ValueError, "margin must be >= 0"),
        (lambda: CosFaceLoss(5, 8, margin=2e15), ValueError, "margin must be at most 1e"),
        (lambda: CosFaceLoss(5, 8, scale=0), ValueError, "scale must be > 0"),
        (lambda: CosFaceLoss(5, 8, scale=math.nan), ValueError, "scale must be finite"),
        (lambda: CosFaceLoss(5, 8, scale=10**400), ValueError, "scale must be finite"),
        (lambda: ArcFaceLoss(5, 8, margin=-(10**400)), ValueError, "margin must be finite"),
        (lambda: NormSoftmaxLoss(5, 8, scale=-30), ValueError, "scale must be > 0"),
        (lambda: ArcFaceLoss(5, 8, margin=-0.5), ValueError, "margin must be >= 0"),
        (lambda: SubCenterArcFaceLoss(5, 8, margin=-0.1), ValueError, "margin must be >= 0"),
        (lambda: ArcFaceLoss(5, 8, margin=28.6), ValueError, "radians.*math.radians"),
        (lambda: ArcFaceLoss(5, 8, margin="0.5"), TypeError, "margin must be a real number"),
        (lambda: SphereFaceLoss(5, 8, margin=2.5), ValueError, "margin must be an integer"),
        (lambda: SphereFaceLoss(5, 8, margin=0), ValueError, "margin must be > 0"),
        (lambda: SphereFaceLoss(5, 8, lambda_=-1), ValueError, "lambda_ must be >= 0"),
        (lambda: CombinedMarginLoss(5, 8, m1=0.5), ValueError, r"m1 must lie in \[1, 100\]"),
        # float32 logits s (cos - m) would overflow: a NaN loss or an inf, never an error
        (lambda: ArcFaceLoss(5, 8, scale=1e39), ValueError, r"scale must be at most 1e\+15"),
        (lambda: CosFaceLoss(5, 8, margin=1e308), ValueError, r"margin must be at most 1e\+15"),
        (lambda: SphereFaceLoss(5, 8, scale=1e16), ValueError, r"scale must be at most"),
        (lambda: CombinedMarginLoss(5, 8, m3=1e20), ValueError, r"m3 must be at most"),
        (lambda: NormSoftmaxLoss(5, 8, scale=1e308), ValueError, r"scale must be at most"),
        (lambda: CircleLoss(gamma=1e20), ValueError, r"gamma must be at most"),
        (lambda: AdaCosLoss(5, 8, scale=1e300), ValueError, r"scale must be at most"),
        # cos(m theta) of an integer m is m recurrence steps: 1e308 overflowed, 1e6 hung
        (lambda: SphereFaceLoss(5, 8, margin=1e308), ValueError, r"margin must lie in \[1, 100\]"),
        (lambda: SphereFaceLoss(5, 8, margin=101), ValueError, r"margin must lie in \[1, 100\]"),
        (lambda: CombinedMarginLoss(5, 8, m1=1e308), ValueError, r"m1 must lie in \[1, 100\]"),
        (lambda: CombinedMarginLoss(5, 8, m3=-0.2), ValueError, "m3 must be >= 0"),
        (lambda: CosFaceLoss(0, 8), ValueError, "num_classes must be >= 1"),
        (lambda: CosFaceLoss(5, 8.0), TypeError, "embedding_size must be an int"),
        # a string or a number would switch the option by its truthiness ("False" is true)
        (lambda: ArcFaceLoss(5, 8, easy_margin="False"), TypeError, "easy_margin must be a bool"),
        (lambda: SubCenterArcFaceLoss(5, 8, easy_margin=1), TypeError, "easy_margin must be"),
        (lambda: SoftmaxLoss(5, 8, bias="False"), TypeError, "bias must be a bool"),
        (lambda: AdaCosLoss(5, 8, dynamic="False"), TypeError, "dynamic must be a bool"),
        (lambda: CircleLoss(per_anchor=0), TypeError, "per_anchor must be a bool"),
    ],
)
def test_invalid_hyperparameters(make, error, message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_invalid_margin_assignment_is_rejected_after_construction() -> None:
    loss = ArcFaceLoss(5, 8)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        loss.margin = -0.1
    assert loss.margin == 0.5


def test_easy_margin_assignment_is_checked_and_numpy_bools_are_taken() -> None:
    loss = ArcFaceLoss(5, 8, easy_margin=np.bool_(True))
    assert loss.easy_margin is True
    with pytest.raises(TypeError, match="easy_margin must be a bool"):
        loss.easy_margin = "False"
    assert loss.easy_margin is True


def test_blend_weights_that_cannot_overflow_are_not_bounded() -> None:
    """SphereFace's lambda_ blends (lambda cos + psi) / (1 + lambda) and AdaFace's h only
    scales a clipped ratio: large values are valid (unlike a scale or an additive margin)."""
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.isfinite(SphereFaceLoss(5, 8, lambda_=1e20)(x, y))
    assert torch.isfinite(AdaFaceLoss(5, 8, h=1e20)(x, y))


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("lambda_", [1e39, 1e300])
def test_sphereface_lambda_beyond_float32_is_its_limit(lambda_, chunk_size) -> None:
    """lambda cos overflowed float32 above 3.4e38 and the loss was NaN; any finite lambda
    is valid, and a huge one gives the annealing's limit, the plain |x| cos softmax
    (margin 1), in float32 and float64, values and gradients."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x, y = torch.randn(6, 8, dtype=dtype), torch.tensor([0, 1, 2, 3, 4, 0])
        annealed = SphereFaceLoss(5, 8, margin=4, lambda_=lambda_, chunk_size=chunk_size)
        limit = SphereFaceLoss(5, 8, margin=1, chunk_size=chunk_size)
        limit.load_state_dict(annealed.state_dict())
        values, grads = [], []
        for loss in (annealed, limit):
            leaf = x.clone().requires_grad_(True)
            value = loss(leaf, y)
            value.backward()
            values.append(value)
            grads.append(leaf.grad)
        assert torch.isfinite(values[0])
        torch.testing.assert_close(values[0], values[1])
        torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("wrap", [np.int64, np.int32, torch.tensor], ids=["np64", "np32", "tensor"])
def test_numpy_and_tensor_integers_are_integers(wrap) -> None:
    """Counts and chunk sizes take numpy integers and one-element integer tensors, as PML
    and every real-valued hyper-parameter here do; stored as Python ints."""
    torch.manual_seed(0)
    sub = SubCenterArcFaceLoss(wrap(6), wrap(8), sub_centers=wrap(3), chunk_size=wrap(2))
    assert (sub.num_classes, sub.embedding_size, sub.sub_centers, sub.chunk_size) == (6, 8, 3, 2)
    assert all(type(v) is int for v in (sub.num_classes, sub.sub_centers, sub.chunk_size))
    plain = SubCenterArcFaceLoss(6, 8, sub_centers=3, chunk_size=2)
    plain.load_state_dict(sub.state_dict())
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 5])
    assert torch.equal(sub(x, y), plain(x, y))
    assert AdaCosLoss(wrap(10), wrap(8)).num_classes == 10
    loss = CosFaceLoss(10, 8)
    loss.chunk_size = wrap(4)
    assert loss.chunk_size == 4 and type(loss.chunk_size) is int
    for bad in (True, 2.0, torch.tensor([1, 2]), "4"):
        with pytest.raises(TypeError, match="chunk_size must be None, 'auto' or an int"):
            loss.chunk_size = bad
