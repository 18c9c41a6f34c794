"""The functional API called directly, as a researcher would: clear errors for bad
labels, scales and margins, NaN that stays NaN, and the degenerate shapes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

import pml_margins
from pml_margins.functional import (
    circle_loss_dense,
    circle_loss_dense_negatives,
    class_columns,
    fused_margin_softmax_cross_entropy,
    sample_classes,
    segment_logsumexp,
    sphereface_psi,
)
from pml_margins.functional.target_logits import sphereface_value_and_slope


@pytest.mark.parametrize("materialize", [None, True, False])
def test_labels_of_another_length_or_dtype_are_refused(materialize) -> None:
    x, w = torch.randn(5, 3), torch.randn(3, 6)
    kwargs = {"materialize": materialize}
    with pytest.raises(ValueError, match="labels has length 3 but there are 5 embeddings"):
        fused_margin_softmax_cross_entropy(x, w, torch.tensor([1, 2, 3]), None, 10.0, **kwargs)
    with pytest.raises(TypeError, match=r"labels must have an integer dtype, got torch\.float32"):
        fused_margin_softmax_cross_entropy(x, w, torch.ones(5), None, 10.0, **kwargs)


@pytest.mark.parametrize("scale", [float("nan"), -5.0, 0.0, float("inf")])
def test_a_scale_must_be_finite_and_positive(scale) -> None:
    with pytest.raises(ValueError, match=r"scale must be (finite|> 0)"):
        fused_margin_softmax_cross_entropy(
            torch.randn(4, 3), torch.randn(3, 6), torch.tensor([0, 1, 2, 3]), None, scale
        )


def test_an_empty_batch_with_sub_centres_on_the_blocked_path() -> None:
    out = fused_margin_softmax_cross_entropy(
        torch.randn(0, 8), torch.randn(8, 40), torch.zeros(0, dtype=torch.long), None, 64.0,
        sub_centers=2, materialize=False,
    )  # fmt: skip
    assert out.shape == (0,)


def test_sample_classes_and_class_columns_check_and_widen() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        sample_classes(torch.tensor([-1, 2]), 10, 0.5)
    wide = class_columns(torch.tensor([100, 200], dtype=torch.uint8), 3)
    assert wide.tolist() == [300, 301, 302, 600, 601, 602] and wide.dtype == torch.int64


def test_circle_rows_with_nan_are_refused_or_stay_nan_and_no_reference_is_zero() -> None:
    """NaN similarities are a ValueError; with the value checks off, only their rows are
    NaN (never hidden as 0)."""
    import pml_margins

    sim = torch.tensor([[0.5, float("nan"), -0.2, 0.1], [0.3, 0.2, -0.1, 0.4]])
    pos = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    keys = pos.view(-1).nonzero().squeeze(1)
    nan_values = torch.tensor([float("nan"), 1.0])
    calls = (
        lambda: circle_loss_dense(sim, pos, ~pos, 0.25, 80.0),
        lambda: circle_loss_dense_negatives(sim, ~pos, keys, 0.25, 80.0),
        lambda: segment_logsumexp(nan_values, torch.tensor([0, 1]), 3)[0],
    )
    for call in calls:
        with pytest.raises(ValueError, match=r"NaN or \+?Inf"):
            call()
    with pytest.raises(ValueError, match=r"values contains NaN or \+Inf"):
        segment_logsumexp(torch.tensor([0.5, math.inf]), torch.tensor([0, 1]), 2)
    with pml_margins.value_checks(False):
        dense, negatives, lse = (call() for call in calls)
        _, present = segment_logsumexp(nan_values, torch.tensor([0, 1]), 3)
    for losses in (dense, negatives):
        assert torch.isnan(losses[0]) and torch.isfinite(losses[1]) and losses[1] > 0
    assert torch.isnan(lse[0]) and present.tolist() == [True, True, False]
    empty = torch.zeros(3, 0, dtype=torch.bool)
    assert circle_loss_dense(torch.zeros(3, 0), empty, empty, 0.25, 80.0).tolist() == [0, 0, 0]


@pytest.mark.parametrize("margin", [1.5, -2, 0])
def test_sphereface_functions_need_an_integer_margin(margin) -> None:
    for fn in (sphereface_psi, sphereface_value_and_slope):
        with pytest.raises(ValueError, match="margin must be"):
            fn(torch.tensor([0.5]), margin)


def test_the_backward_error_names_what_to_call() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    loss = fused_margin_softmax_cross_entropy(
        x, torch.randn(3, 6), torch.tensor([0, 1, 2, 3]), None, 5.0
    ).sum()
    with pytest.raises(RuntimeError, match="margin_softmax_cross_entropy"):
        torch.autograd.grad(loss, x, create_graph=True)
    assert not pml_margins.autograd_only_enabled()


def test_center_alpha_and_circle_gamma_are_checked() -> None:
    from pml_margins.functional import center_ema_update

    for alpha in (float("nan"), -1.0, 5.0):
        with pytest.raises(ValueError, match="alpha must"):
            center_ema_update(torch.zeros(3, 2), torch.ones(2, 2), torch.tensor([0, 1]), alpha)
    eye = torch.eye(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        circle_loss_dense(torch.zeros(2, 2), eye, ~eye, 0.25, -1.0)


@pytest.mark.parametrize(
    ("m", "gamma", "match"),
    [
        (0.25, -80.0, "gamma must be > 0"),
        (0.25, float("nan"), "gamma must be finite"),
        (0.25, 1e20, "gamma must"),
        (3e3, 80.0, r"m must lie in \[-1000.0, 1000.0\]"),
        (-1e4, 80.0, r"m must lie in \[-1000.0, 1000.0\]"),
        (float("nan"), 80.0, "m must be finite"),
    ],
)
def test_every_functional_circle_loss_checks_m_and_gamma(m, gamma, match) -> None:
    """As the Circle losses do: the pair-list and whole-set forms returned 24.0 / 19.2 for
    gamma = -80 and NaN for a NaN m; m = 3 gave a silent 0."""
    from pml_margins.functional import circle_loss_dense_negatives, circle_loss_pairs
    from pml_margins.functional.circle import circle_loss_whole

    sim, eye = torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.eye(2, dtype=torch.bool)
    anchors, keys = torch.tensor([0, 1]), torch.tensor([0, 3])
    calls = [
        lambda: circle_loss_dense(sim, eye, ~eye, m, gamma),
        lambda: circle_loss_dense_negatives(sim, ~eye, keys, m, gamma),
        lambda: circle_loss_pairs(sim[eye], anchors, sim[~eye], anchors, 2, m, gamma),
        lambda: circle_loss_whole(sim[eye], sim[~eye], m, gamma),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


def _normalized_batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=dtype, generator=g)
    w = torch.randn(3, 5, dtype=dtype, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    logits = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=0)
    return x, w, y, logits


def test_plain_margin_softmax_with_only_a_non_target_function():
    """target_logit_fn=None left phi(z_y) at the target (25.12 for 15.34): None is the
    identity there, as in the fused core."""
    from pml_margins.functional import (
        fused_margin_softmax_cross_entropy,
        margin_softmax_cross_entropy,
    )

    x, w, y, logits = _normalized_batch()

    def phi(z):
        return 2 * z

    plain = margin_softmax_cross_entropy(logits, y, None, 10.0, non_target_logit_fn=phi)
    fused = fused_margin_softmax_cross_entropy(x, w, y, None, 10.0, non_target_logit_fn=phi)
    rows = torch.arange(4)
    expected = 10.0 * phi(logits)
    expected[rows, y] = 10.0 * logits[rows, y]
    torch.testing.assert_close(
        plain, torch.nn.functional.cross_entropy(expected, y, reduction="none")
    )
    torch.testing.assert_close(plain, fused)


def test_plain_margin_softmax_takes_functions_of_another_dtype():
    """A float64 margin tensor in psi, or a half psi/phi, raised scatter's dtype error on
    float32 logits; a float64 phi returned float64 losses."""
    from functools import partial

    from pml_margins.functional import cosface_target, margin_softmax_cross_entropy

    _, _, y, logits = _normalized_batch(torch.float32)
    margin = torch.full((4,), 0.35, dtype=torch.float64)
    expected = margin_softmax_cross_entropy(logits, y, partial(cosface_target, margin=0.35), 30.0)
    for psi, phi in [
        (partial(cosface_target, margin=margin), None),
        (lambda z: (z - 0.35).half(), None),
        (partial(cosface_target, margin=0.35), lambda z: z.double()),
    ]:
        got = margin_softmax_cross_entropy(logits, y, psi, 30.0, non_target_logit_fn=phi)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=0.05, rtol=1e-3)  # (half psi)
    got = margin_softmax_cross_entropy(
        logits, y, None, 30.0, non_target_logit_fn=lambda z: z.double()
    )
    assert got.dtype == torch.float32


def test_fused_bias_and_target_cosines_must_be_floating_tensors():
    """A list raised AttributeError; a complex bias dropped its imaginary part."""
    from pml_margins.functional import fused_margin_softmax_cross_entropy

    x, w, y, _ = _normalized_batch(torch.float32)
    for kwargs, name in [
        ({"bias": [0.0] * 5}, "bias must be a torch.Tensor"),
        ({"target_cosines": [0.0] * 4}, "target_cosines must be a torch.Tensor"),
        ({"bias": torch.zeros(5, dtype=torch.complex64)}, "bias must have dtype"),
        ({"bias": torch.zeros(5, dtype=torch.bool)}, "bias must have dtype"),
        ({"target_cosines": torch.zeros(4, dtype=torch.long)}, "target_cosines must have dtype"),
    ]:
        with pytest.raises(TypeError, match=name):
            fused_margin_softmax_cross_entropy(x, w, y, None, 10.0, **kwargs)


def test_fused_sample_rate_under_vmap_is_a_clear_error():
    """torch.unique has no vmap rule: vmap's internal RuntimeError; grad still works."""
    from torch.func import grad, vmap

    from pml_margins.functional import fused_margin_softmax_cross_entropy

    x, w, y, _ = _normalized_batch(torch.float32)

    def one(xi, yi):
        return fused_margin_softmax_cross_entropy(
            xi[None], w, yi[None], None, 10.0, sample_rate=0.5
        ).sum()

    with pytest.raises(ValueError, match=r"torch\.func\.vmap cannot batch"):
        vmap(grad(one))(x, y)

    # vmap over the embeddings alone draws from the same labels: it works (a first version
    # refused it)
    def per_set(xs):
        return fused_margin_softmax_cross_entropy(xs, w, y, None, 10.0, sample_rate=0.5).sum()

    both = vmap(per_set, randomness="same")(torch.stack([x, 2 * x + 1]))
    assert both.shape == (2,) and torch.isfinite(both).all()
    draw = torch.Generator().manual_seed(0)
    assert (
        grad(
            lambda xs: fused_margin_softmax_cross_entropy(
                xs, w, y, None, 10.0, sample_rate=0.5, generator=draw
            ).sum()
        )(x).shape
        == x.shape
    )


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


class _Float16Run(NamedTuple):
    """A loss under float16 autocast and its float64 copy on the same inputs."""

    loss: torch.Tensor
    x_grad: torch.Tensor
    w_grad: torch.Tensor
    reference_loss: torch.Tensor
    reference_x_grad: torch.Tensor
    reference_w_grad: torch.Tensor


def _float16_against_float64(
    make: Callable[..., torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    opts: dict,
    seed: int = 1,
) -> _Float16Run:
    """``make(**opts)`` (built after ``torch.manual_seed(seed)``) run forward and backward
    under CPU float16 autocast, and ``make()`` in float64 with its state, on ``x``, ``y``."""
    torch.manual_seed(seed)
    loss_fn = make(**opts)
    reference_fn = make().double()
    reference_fn.load_state_dict(loss_fn.state_dict())
    x64 = x.double().requires_grad_(True)
    reference = reference_fn(x64, y)
    reference.backward()
    xs = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_fn(xs, y)
    loss.backward()
    return _Float16Run(
        loss, xs.grad, loss_fn.W.grad, reference.detach(), x64.grad, reference_fn.W.grad
    )


@pytest.mark.parametrize("opts", [{}, {"materialize": False}, {"chunk_size": 64}])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_float16_products_take_a_scale_beyond_their_range(opts: dict, as_tensor: bool):
    """Scale 1e5 under float16 autocast: the blocked paths refused a number (the products
    took s x, beyond 65504) and gave NaN losses and gradients for the same scale as a (B,)
    tensor; the materialized path gave the losses but non-finite gradients (g s x and
    g s P in float16). Now every path gives the float64 values and gradients to float16's
    rounding of the cosines; 3e4 as before."""
    from pml_margins.functional import fused_margin_softmax_cross_entropy

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 4, generator=g), torch.randn(4, 600, generator=g)
    y = torch.randint(0, 600, (8,), generator=g)
    for value in (3e4, 1e5, 1e7):
        scale = torch.full((8,), value) if as_tensor else value
        x64 = x.double().requires_grad_(True)
        w64 = w.double().requires_grad_(True)
        reference = fused_margin_softmax_cross_entropy(x64, w64, y, None, value)
        reference.sum().backward()
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16):
            got = fused_margin_softmax_cross_entropy(xs, ws, y, None, scale, **opts)
        got.sum().backward()
        torch.testing.assert_close(got.double(), reference.detach(), rtol=4e-3, atol=0)
        assert _relative_error(xs.grad, x64.grad) < 2e-2, value
        assert _relative_error(ws.grad, w64.grad) < 2e-2, value


@pytest.mark.parametrize("opts", [{}, {"chunk_size": 3}])
def test_sphereface_feature_norm_scale_beyond_float16_under_autocast(opts: dict):
    """SphereFace's row scale s |x| = 96,000 (|x| = 1,500) under float16 autocast: NaN
    gradients in default mode, NaN losses with chunk_size, no error."""
    from pml_margins.losses import SphereFaceLoss

    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    run = _float16_against_float64(
        lambda **kw: SphereFaceLoss(7, 8, scale=64.0, **kw), 1500.0 * u, y, opts
    )
    torch.testing.assert_close(run.loss.double(), run.reference_loss, rtol=1e-3, atol=0)
    assert _relative_error(run.x_grad, run.reference_x_grad) < 2e-2
    assert _relative_error(run.w_grad, run.reference_w_grad) < 2e-2


def test_sharded_core_with_only_a_non_target_function_equals_the_single_process_one():
    """The sharded core kept phi(z_y) at the target too (8.715 for 12.617) and raised an
    index_put dtype error for a psi returning float32 on float64 logits."""
    from pml_margins.distributed import sharded_margin_softmax_cross_entropy
    from pml_margins.functional import margin_softmax_cross_entropy

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, dtype=torch.float64, generator=g).tanh()
    y = torch.tensor([0, 5, 2, 2])

    def phi(c):
        return c * 0.5 - 0.1

    for psi in (None, lambda c: (c - 0.2).float()):
        expected = margin_softmax_cross_entropy(z, y, psi, 10.0, non_target_logit_fn=phi)
        got = sharded_margin_softmax_cross_entropy(z, y, psi, 10.0, non_target_logit_fn=phi)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("opts", [{}, {"chunk_size": 3}])
def test_float16_gradients_of_rows_far_below_the_largest_keep_their_precision(opts: dict):
    """Rows of norm 0.05 beside a row of norm 1,500 (SphereFace's s |x|, float16
    autocast): every row's embedding gradient within float16 rounding of float64's, the
    small rows' too (a factor max |g s| taken out of their products would push them into
    float16's subnormal range)."""
    from pml_margins.losses import SphereFaceLoss

    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    norms = torch.tensor([1500.0, 0.05, 0.05, 1.0, 0.05, 3.0])[:, None]
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    run = _float16_against_float64(
        lambda **kw: SphereFaceLoss(7, 8, scale=64.0, **kw), norms * u, y, opts
    )
    for row in range(6):
        assert _relative_error(run.x_grad[row], run.reference_x_grad[row]) < 2e-2, row


@pytest.mark.parametrize("opts", [{}, {"chunk_size": 2}, {"sample_rate": 0.5}])
def test_float16_w_gradient_of_large_raw_rows_stays_in_range(opts: dict):
    """Softmax on raw rows of norm ~850 (256 rows of one class), float16 autocast: W's
    gradient was inf once its operand took the rows' factor g s out over its largest
    (x itself, 256 times x g s); the operand is divided only where its product needs it."""
    from pml_margins.losses import SoftmaxLoss

    x = 300.0 * torch.ones(256, 8)
    x[:, ::2] *= -1
    y = torch.zeros(256, dtype=torch.long)
    run = _float16_against_float64(lambda **kw: SoftmaxLoss(4, 8, **kw), x, y, opts, seed=0)
    assert torch.isfinite(run.w_grad).all()
    if "sample_rate" not in opts:  # (sampled: other columns)
        assert _relative_error(run.w_grad, run.reference_w_grad) < 1e-2


@pytest.mark.parametrize("opts", [{}, {"chunk_size": 3}])
def test_float16_w_gradient_of_columns_only_small_rows_touch(opts: dict):
    """SphereFace's s |x| over rows of norm 1,000 and 0.001 (float16 autocast): the columns
    only the small rows reach had 4-9% error once the operand was divided by the largest
    |g s| (pushed into float16's subnormals); within float16's rounding now."""
    from pml_margins.losses import SphereFaceLoss

    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=1)
    norms = torch.tensor([1000.0, 1000.0] + [0.001] * 6)[:, None]
    run = _float16_against_float64(
        lambda **kw: SphereFaceLoss(8, 8, scale=1.0, **kw), norms * u, torch.arange(8), opts
    )
    for column in range(8):
        got, want = run.w_grad[:, column], run.reference_w_grad[:, column]
        assert _relative_error(got, want) < 1e-2, column


@pytest.mark.parametrize("opts", [{}, {"chunk_size": 3}, {"sample_rate": 0.5}])
def test_float16_sphereface_one_row_of_a_large_norm(opts: dict):
    """One row of norm 573 at s = 64 (float16 autocast, a batch of 1): g s |x| = 36,672
    fits float16, but W's gradient product also takes the target entry's slope (up to
    m^2 = 16): inf. The range factor now bounds the logit gradient's entries too."""
    from pml_margins.losses import SphereFaceLoss

    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=1)
    x = (torch.rand(1, 1, generator=g) * 1e3 + 1) * u
    y = torch.randint(0, 10, (1,), generator=g)
    run = _float16_against_float64(
        lambda **kw: SphereFaceLoss(10, 16, scale=64.0, **kw), x, y, opts, seed=0
    )
    assert torch.isfinite(run.w_grad).all() and torch.isfinite(run.x_grad).all()
    if "sample_rate" not in opts:  # (sampled: another softmax)
        assert _relative_error(run.w_grad, run.reference_w_grad) < 1e-2
        assert _relative_error(run.x_grad, run.reference_x_grad) < 1e-2


@pytest.mark.parametrize("name", ["SubCenterArcFaceLoss", "CurricularFaceLoss", "ProxyCircleLoss"])
@pytest.mark.parametrize("opts", [{}, {"sample_rate": 0.5}])
def test_float16_materialized_logits_take_a_scale_beyond_float16(name: str, opts: dict):
    """The losses whose materialized logits autograd differentiates (sub-centres, a
    non-target function) at scale 1e5 under float16 autocast: torch's float16 backward of
    the product took g s itself, inf gradients without an error (also before this
    session). The product now keeps its backward's operands in range."""
    import pml_margins.losses as losses

    scale = {"gamma": 1e5} if name == "ProxyCircleLoss" else {"scale": 1e5}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, generator=g), torch.randint(0, 10, (1,), generator=g)  # g = 1
    run = _float16_against_float64(
        lambda **kw: getattr(losses, name)(10, 16, **scale, **kw), x, y, opts
    )
    assert torch.isfinite(run.x_grad).all() and torch.isfinite(run.w_grad).all()
    if not opts:
        assert _relative_error(run.x_grad, run.reference_x_grad) < 3e-2
        assert _relative_error(run.w_grad, run.reference_w_grad) < 3e-2
