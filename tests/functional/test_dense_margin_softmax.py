"""The one-node dense margin softmax (small problems) against autograd on torch ops."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from pml_margins.functional import (
    TargetWithSlope,
    arcface_target,
    arcface_value_and_slope,
    cosface_target,
    fused_margin_softmax_cross_entropy,
    sphereface_psi,
    sphereface_value_and_slope,
)
from pml_margins.functional.dense_margin_softmax import dense_margin_softmax_cross_entropy

B, D, C = 9, 6, 13


def reference(x, w, labels, psi, scale, normalize_x, normalize_w, bias=None):
    """The loss with torch ops, differentiated by autograd (float64 in, float64 out)."""
    x = F.normalize(x, dim=1) if normalize_x else x
    w = F.normalize(w, dim=0) if normalize_w else w
    z = x @ w
    z_y = z.gather(1, labels[:, None]).squeeze(1)
    s = scale[:, None] if isinstance(scale, torch.Tensor) else scale
    logits = z * s + (0 if bias is None else bias)
    target = (z_y if psi is None else psi(z_y)) * (s.squeeze(1) if torch.is_tensor(s) else s)
    if bias is not None:
        target = target + bias[labels]
    logits = logits.scatter(1, labels[:, None], target[:, None])
    return F.cross_entropy(logits, labels, reduction="none")


def inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    w = torch.randn(D, C, generator=g, dtype=dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    return x, w, labels


ARC = TargetWithSlope(arcface_target, arcface_value_and_slope, margin=0.5, easy_margin=False)


@pytest.mark.parametrize("normalize_x", [True, False])
@pytest.mark.parametrize("normalize_w", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("psi", [None, ARC, partial(cosface_target, margin=0.35)])
def test_values_and_gradients_equal_autograd(normalize_x, normalize_w, with_bias, psi):
    x, w, labels = inputs()
    bias = torch.randn(C, dtype=torch.float64) if with_bias else None
    weights = torch.rand(B, dtype=torch.float64)
    results = []
    for fn in (dense_margin_softmax_cross_entropy, reference):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = None if bias is None else bias.clone().requires_grad_()
        loss = fn(xs, ws, labels, psi, 7.0, normalize_x, normalize_w, bs)
        (loss * weights).sum().backward()
        results.append((loss.detach(), xs.grad, ws.grad, None if bs is None else bs.grad))
    for ours, ref in zip(*results, strict=True):
        if ref is not None:
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_a_tensor_scale_a_bias_and_per_row_margins():
    """Every input with a graph: x, W, a (B,) scale, the bias and a per-row margin the
    target function closes over (its gradient flows through the target logits)."""
    x, w, labels = inputs(1)
    x.requires_grad_()
    w.requires_grad_()
    scale = (torch.rand(B, dtype=torch.float64) + 1).requires_grad_()
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True)
    margins = (torch.rand(B, dtype=torch.float64) * 0.3).requires_grad_()

    def loss(x, w, scale, bias, margins):
        return dense_margin_softmax_cross_entropy(
            x, w, labels, lambda z: z - margins, scale, True, True, bias
        )

    assert torch.autograd.gradcheck(loss, (x, w, scale, bias, margins))


def test_zero_rows_and_columns_follow_f_normalize():
    """Norms under eps are clamped, as F.normalize: no projection in their gradient."""
    x, w, labels = inputs(2)
    x[0] = 0
    x[1] = 1e-14  # positive, below eps
    w[:, 3] = 0
    results = []
    for fn in (dense_margin_softmax_cross_entropy, reference):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xs, ws, labels, ARC, 5.0, True, True)
        loss.sum().backward()
        results.append((loss.detach(), xs.grad, ws.grad))
    for ours, ref in zip(*results, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_a_norm_of_exactly_eps_keeps_the_radial_term_as_f_normalize():
    """``F.normalize``'s clamp passes the gradient where the norm equals eps, so the radial
    component is projected out there (found by review: the dense backward skipped it for
    norms <= eps; dL/dx of such a row was 1.97e12 instead of 0)."""
    x, w, labels = inputs(3)
    x[0] = 0
    x[0, 0] = 1e-12  # norm exactly eps
    w[:, 2] = 0
    w[1, 2] = 1e-12
    assert torch.linalg.vector_norm(x[0]).item() == 1e-12
    assert torch.linalg.vector_norm(w[:, 2]).item() == 1e-12
    results = []
    for fn in (dense_margin_softmax_cross_entropy, reference):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xs, ws, labels, None, 10.0, True, True).sum().backward()
        results.append((xs.grad, ws.grad))
    for ours, ref in zip(*results, strict=True):  # (entries up to ~1e12 = 1/eps: relative)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize(
    "mode",
    [{"materialize": False}, {"chunk_size": 2}, {"chunk_size": 3, "sub_centers": 2}],
    ids=["blocked", "chunked", "sub-centres"],
)
def test_the_blocked_function_agrees_at_a_column_norm_of_exactly_eps(mode):
    """The blocked function took columns of norm up to 1.001 eps as clamped (no radial
    term; found by review): ``dL/dW`` of a column of norm exactly 1e-12 was 1.99e12
    off ``F.normalize``'s. Now ``|w_j| >= eps`` is kept from the squared norms."""
    x, w, labels = inputs(3)
    per_class = mode.get("sub_centers", 1)
    w = w[:, : C - C % per_class] if per_class > 1 else w
    w[:, 2] = 0
    w[1, 2] = 1e-12
    labels = labels % (w.shape[1] // per_class)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    fused_margin_softmax_cross_entropy(xs, ws, labels, None, 10.0, **mode).sum().backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    z = F.normalize(xr, dim=1) @ F.normalize(wr, dim=0)
    if per_class > 1:
        z = z.unflatten(1, (-1, per_class)).amax(2)
    F.cross_entropy(10.0 * z, labels, reduction="sum").backward()
    for ours, ref in ((xs.grad, xr.grad), (ws.grad, wr.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


def test_backward_twice_with_retain_graph_and_no_grad_forward():
    x, w, labels = inputs(3, torch.float32)
    x.requires_grad_()
    loss = dense_margin_softmax_cross_entropy(x, w, labels, ARC, 30.0, True, True).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    with torch.no_grad():
        again = dense_margin_softmax_cross_entropy(x, w, labels, ARC, 30.0, True, True)
    assert again.grad_fn is None
    torch.testing.assert_close(again.sum(), loss.detach())


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"),
    [
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ],
)
def test_mixed_dtypes_compute_in_the_wider_and_return_each_dtype(x_dtype, w_dtype):
    x, w, labels = inputs(4)
    xs = x.to(x_dtype).requires_grad_()
    ws = w.to(w_dtype).requires_grad_()
    loss = dense_margin_softmax_cross_entropy(xs, ws, labels, ARC, 16.0, True, True)
    loss.sum().backward()
    wide = torch.float64 if torch.float64 in (x_dtype, w_dtype) else torch.float32
    assert loss.dtype == wide
    assert xs.grad.dtype == x_dtype and ws.grad.dtype == w_dtype
    ref = reference(xs.detach().double(), ws.detach().double(), labels, ARC, 16.0, True, True)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_cpu_autocast_runs_the_product_in_bfloat16(monkeypatch):
    """The forward product and both backward products take bfloat16 operands (checked on
    the calls themselves: found by review, the value alone also passed with float32
    products), and the loss and gradients come back float32."""
    x, w, labels = inputs(5, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    operands = []
    mm = torch.mm

    def recording_mm(a, b, *args, **kwargs):
        operands.append((a.dtype, b.dtype))
        return mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dense_margin_softmax_cross_entropy(x, w, labels, ARC, 16.0, True, True)
    loss.sum().backward()
    assert operands == [(torch.bfloat16, torch.bfloat16)] * 3
    assert loss.dtype == x.grad.dtype == w.grad.dtype == torch.float32
    ref = reference(x.detach().double(), w.double(), labels, ARC, 16.0, True, True)
    torch.testing.assert_close(loss.double(), ref, rtol=0.05, atol=0.05)


def test_small_default_problems_take_the_dense_function():
    x, w, labels = inputs(6, torch.float32)
    x.requires_grad_()
    loss = fused_margin_softmax_cross_entropy(x, w, labels, ARC, 16.0)
    assert type(loss.grad_fn).__name__ == "_DenseMarginSoftmaxBackward"
    # sub-centres and a non-target function stay on the autograd path
    phi = fused_margin_softmax_cross_entropy(
        x, w, labels, ARC, 16.0, non_target_logit_fn=lambda z: 1.1 * z
    )
    assert "Dense" not in type(phi.grad_fn).__name__
    sub = fused_margin_softmax_cross_entropy(x, w[:, :12], labels // 2, ARC, 16.0, sub_centers=2)
    assert "Dense" not in type(sub.grad_fn).__name__


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("changed", ["W", "embeddings", "scale"])
def test_an_input_changed_in_place_before_backward_raises_as_autograd_does(w_dtype, changed):
    """An optimizer step between forward and backward: autograd's error, never gradients
    of another W (the blocked function and plain torch ops behave the same)."""
    x, w, labels = inputs(7, torch.float32)
    leaf = torch.randn(B, D, requires_grad=True)
    x = leaf * 1.0  # a non-leaf, as a model's output
    w = w.to(w_dtype).requires_grad_()
    scale = torch.full((B,), 16.0, requires_grad=True)
    loss = dense_margin_softmax_cross_entropy(x, w, labels, ARC, scale, True, True).sum()
    with torch.no_grad():
        {"W": w, "embeddings": x, "scale": scale}[changed].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("tensor_scale", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mean_equals_torch_mean_of_the_losses_bit_for_bit(dtype, tensor_scale, with_bias):
    """``mean=True``: the value and every gradient of ``torch.mean`` of the losses."""
    x, w, labels = inputs(2, dtype)
    scale = torch.rand(B, dtype=dtype) + 1 if tensor_scale else 7.0
    bias = torch.randn(C, dtype=dtype) if with_bias else None
    results = []
    for mean in (False, True):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        leaves += [t.clone().requires_grad_() for t in (scale, bias) if torch.is_tensor(t)]
        xs, ws, *rest = leaves
        ss = rest.pop(0) if tensor_scale else scale
        bs = rest.pop(0) if with_bias else None
        loss = dense_margin_softmax_cross_entropy(
            xs, ws, labels, ARC, ss, True, True, bs, mean=mean
        )
        loss = loss if mean else torch.mean(loss)
        results.append((loss, *torch.autograd.grad(loss * 3, leaves)))
    for a, b in zip(*results, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():
        value = dense_margin_softmax_cross_entropy(x, w, labels, ARC, 7.0, True, True, mean=True)
        whole = dense_margin_softmax_cross_entropy(x, w, labels, ARC, 7.0, True, True)
    assert value.shape == () and torch.equal(value, torch.mean(whole))


SPHERE4 = TargetWithSlope(sphereface_psi, sphereface_value_and_slope, margin=4)


@pytest.mark.parametrize("number", [1.0, 1.5])
@pytest.mark.parametrize("mean", [False, True])
def test_scale_by_norm_equals_the_norms_through_autograd(number, mean):
    """``scale_by_norm``: the scale ``s |x_i|`` formed and differentiated inside equals the
    norms handed in as a tensor scale with their graph (SphereFace), zero rows included."""
    x, w, labels = inputs(4)
    x[2] = 0.0
    x[5] *= 1e-13 / x[5].norm()  # below F.normalize's eps: d|x|/dx is still x / |x|
    results = []
    for inside in (True, False):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        if inside:
            loss = dense_margin_softmax_cross_entropy(
                xs, ws, labels, SPHERE4, number, True, True, scale_by_norm=True, mean=mean
            )
        else:
            scale = torch.linalg.vector_norm(xs, dim=1) * number
            loss = dense_margin_softmax_cross_entropy(
                xs, ws, labels, SPHERE4, scale, True, True, mean=mean
            )
        weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
        total = loss * 2 if mean else (loss * weights).sum()
        results.append((loss.detach(), *torch.autograd.grad(total, [xs, ws])))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    xs = x.clone().requires_grad_()
    ws = w.clone().requires_grad_()

    def loss_of(a, b):
        return dense_margin_softmax_cross_entropy(
            a, b, labels, SPHERE4, number, True, True, scale_by_norm=True, mean=mean
        )

    torch.testing.assert_close(loss_of(xs, ws), results[0][0])
    xs.data[2] = xs.data[5] = 0.1  # gradcheck away from the norm's kink and F.normalize's eps
    assert torch.autograd.gradcheck(loss_of, (xs, ws))


def test_scale_by_norm_needs_its_form():
    x, w, labels = inputs(5)
    for kwargs in (
        {"normalize_x": False},
        {"bias": torch.zeros(C, dtype=torch.float64)},
        {"scale": torch.ones(B, dtype=torch.float64)},
    ):
        args = {"normalize_x": True, "bias": None, "scale": 1.0, **kwargs}
        with pytest.raises(ValueError, match="scale_by_norm needs"):
            dense_margin_softmax_cross_entropy(
                x,
                w,
                labels,
                None,
                args["scale"],
                args["normalize_x"],
                True,
                args["bias"],
                scale_by_norm=True,
            )
        with pytest.raises(ValueError, match="scale_by_norm needs"):
            fused_margin_softmax_cross_entropy(
                x,
                w,
                labels,
                None,
                args["scale"],
                normalize_embeddings=args["normalize_x"],
                bias=args["bias"],
                scale_by_norm=True,
            )
    with pytest.raises(TypeError, match="scale_by_norm"):
        fused_margin_softmax_cross_entropy(x, w, labels, None, 1.0, scale_by_norm="yes")


@pytest.mark.parametrize(
    "mode",
    [{"chunk_size": 4}, {"materialize": False}, {"sample_rate": 1.0, "chunk_size": None}],
    ids=["bounded", "blocked", "default"],
)
def test_scale_by_norm_in_every_mode_of_the_core(mode):
    x, w, labels = inputs(6)
    results = []
    for by_norm in (True, False):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        scale = 1.0 if by_norm else torch.linalg.vector_norm(xs, dim=1)
        loss = fused_margin_softmax_cross_entropy(
            xs, ws, labels, SPHERE4, scale, scale_by_norm=by_norm, **mode
        )
        results.append((loss.detach(), *torch.autograd.grad(loss.sum(), [xs, ws])))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
