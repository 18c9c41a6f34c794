"""Regressions from the 2026-12-02 parity review: the weight regularizer's dtype, and
out-of-range labels with the value checks off on the step-statistics paths."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.regularizers import (
    CenterInvariantRegularizer,
    LpRegularizer,
    RegularFaceRegularizer,
)

from pml_margins import value_checks
from pml_margins.losses import (
    AdaCosLoss,
    CosFaceLoss,
    CurricularFaceLoss,
    NormSoftmaxLoss,
    SubCenterArcFaceLoss,
)
from tests.losses.specs import SPECS

C, D = 20, 32


def _pair(regularizer: type, ours_cls: type = CosFaceLoss, pml_cls: type = pml_losses.CosFaceLoss):
    ours = ours_cls(C, D, weight_regularizer=regularizer(), reducer=pml_reducers.DoNothingReducer())
    pml = pml_cls(C, D, weight_regularizer=regularizer(), reducer=pml_reducers.DoNothingReducer())
    return ours, pml


@pytest.mark.parametrize("regularizer", [CenterInvariantRegularizer, RegularFaceRegularizer])
@pytest.mark.parametrize(
    ("ours_cls", "pml_cls"),
    [(CosFaceLoss, pml_losses.CosFaceLoss), (NormSoftmaxLoss, pml_losses.NormalizedSoftmaxLoss)],
)
def test_weight_regularizer_sees_w_in_the_compute_dtype_of_a_bf16_loss(
    regularizer, ours_cls, pml_cls
) -> None:
    """A bf16 loss with float32 embeddings: PML casts W to float32 before regularizing;
    ours handed the regularizer W in bf16 (CenterInvariant 19.5 for 19.5788, and W's
    gradient ~6% off with NSL)."""
    torch.manual_seed(0)
    ours, pml = _pair(regularizer, ours_cls, pml_cls)
    ours = ours.to(torch.bfloat16)
    pml.W.data = ours.W.detach().float().clone()
    x, y = torch.randn(8, D), torch.randint(0, C, (8,))
    got, want = ours(x, y)["weight_reg_loss"]["losses"], pml(x, y)["weight_reg_loss"]["losses"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # W's gradient through the regularizer alone (the loss term's is equal already)
    got.sum().backward()
    want.sum().backward()
    assert ours.W.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours.W.grad.float(), pml.W.grad.to(torch.bfloat16).float())


def test_weight_regularizer_of_float64_embeddings_under_bf16_autocast_runs_as_pml() -> None:
    """float64 embeddings, float32 loss, CPU bf16 autocast: PML regularizes W in float64
    (autocast leaves it alone); ours handed float32 W, whose RegularFace ran in bf16 and
    failed ("value cannot be converted to type c10::BFloat16 without overflow")."""
    torch.manual_seed(0)
    ours, pml = _pair(RegularFaceRegularizer)
    pml.W.data = ours.W.detach().clone()
    x, y = torch.randn(8, D, dtype=torch.float64), torch.randint(0, C, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x, y)["weight_reg_loss"]["losses"]
        want = pml(x, y)["weight_reg_loss"]["losses"]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("half_input", [True, False], ids=["half-embeddings", "float32-embeddings"])
def test_regularface_of_any_loss_under_cpu_autocast_is_its_float32_value(
    spec, dtype, half_input
) -> None:
    """A model's bf16/fp16 output (or float32 embeddings) under CPU autocast with
    RegularFace on W: the regularizer is W's, in float32 outside autocast. Before, every
    class-weight loss raised "value cannot be converted to type c10::BFloat16 without
    overflow" (RegularFace's products ran in the autocast dtype, its fill value was
    float32's; found by review). PML fails the same way for float32 embeddings."""
    torch.manual_seed(0)
    loss = spec.build(C, D, weight_regularizer=RegularFaceRegularizer(), weight_reg_weight=0.37)
    x, y = torch.randn(8, D), torch.randint(0, C, (8,))
    x = x.to(dtype) if half_input else x
    with torch.autocast("cpu", dtype=dtype):
        loss_dict = loss.compute_loss(x, y, None, x, y)
        total = loss(x, y)
    got = loss_dict["weight_reg_loss"]["losses"]
    want = RegularFaceRegularizer()(loss.W.detach().t().float()) * 0.37
    assert got.dtype == total.dtype == torch.float32 and torch.isfinite(total)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    total.backward()
    assert torch.isfinite(loss.W.grad).all()


def test_weight_regularizer_in_float64_for_float64_embeddings() -> None:
    torch.manual_seed(0)
    ours, pml = _pair(LpRegularizer)
    pml.W.data = ours.W.detach().double().clone()
    x, y = torch.randn(8, D, dtype=torch.float64), torch.randint(0, C, (8,))
    got, want = ours(x, y)["weight_reg_loss"]["losses"], pml(x, y)["weight_reg_loss"]["losses"]
    assert got.dtype == torch.float64 and ours.W.dtype == torch.float32
    torch.testing.assert_close(got, want)


#: classes and width where CPU default mode runs the blocked core for 4 rows
#: ((B + D / 4) C above 2^18; fused_margin_softmax._materializes)
_BLOCKED = (5000, 256)


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
@pytest.mark.parametrize(
    ("size", "mode"),
    [
        ((10, 64), {}),
        (_BLOCKED, {}),
        ((10, 64), {"chunk_size": 4}),
        ((10, 64), {"sample_rate": 0.5}),
    ],
    ids=["dense", "blocked", "chunked", "partial-fc"],
)
@pytest.mark.parametrize("where", ["below", "above"])
def test_unchecked_out_of_range_label_raises_an_index_error(spec, size, mode, where) -> None:
    """With the checks off, a label outside [0, C) fails as an index op does (as PML's
    losses do on the CPU). CurricularFace (blocked, chunked) took -1 and AdaCos (chunked)
    took -1 and C with a finite loss: their step statistics treated -1 as a class held
    by another rank and clamped the others."""
    classes, width = size
    loss = spec.build(classes, width, **mode)
    bad = -1 if where == "below" else classes
    x, y = torch.randn(4, width), torch.tensor([0, 1, 2, bad])
    with value_checks(False), pytest.raises((IndexError, RuntimeError), match="out of"):
        loss(x, y)


@pytest.mark.parametrize("loss_cls", [AdaCosLoss, CurricularFaceLoss])
def test_checked_out_of_range_label_is_still_the_clear_error(loss_cls) -> None:
    loss = loss_cls(10, 16, chunk_size=4)
    with pytest.raises(ValueError, match=r"labels"):
        loss(torch.randn(4, 16), torch.tensor([0, 1, 2, -1]))


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (torch.tensor([0, 1, 2, -1]), ValueError, r"labels must lie in \[0, 10\)"),
        (torch.tensor([0, 1, 2, 10]), ValueError, r"labels must lie in \[0, 10\)"),
        (torch.tensor([0.0, 1, 2, 3]), TypeError, "integer dtype"),
        (torch.tensor([0, 1, 2]), ValueError, "length 3"),
    ],
)
def test_adacos_dynamic_scale_checks_its_labels(labels, error, match) -> None:
    """The public helper took -1 as "another rank's class" and clamped 10 (a scale from
    the wrong cosines), and took float or too few labels."""
    from pml_margins.losses.adacos import adacos_dynamic_scale

    with pytest.raises(error, match=match):
        adacos_dynamic_scale(torch.rand(4, 10), labels, 5.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        adacos_dynamic_scale(torch.rand(4, 1), torch.zeros(4, dtype=torch.long), 5.0)
    with pytest.raises(ValueError, match=r"needs a row .* got shape \(0, 10\)"):
        adacos_dynamic_scale(torch.rand(0, 10), torch.zeros(0, dtype=torch.long), 5.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        adacos_dynamic_scale(torch.full((4, 10), float("nan")), torch.arange(4), 5.0)


@pytest.mark.parametrize("mode", [{}, {"chunk_size": 7}, {"sample_rate": 0.5}])
def test_dynamic_adacos_masks_its_targets_without_nonzero(monkeypatch, mode) -> None:
    """Its statistics found each block's target rows with ``torch.nonzero``: a host sync
    per block on a GPU, with the value checks off too (found by review). Checked on the
    ops the step runs (a profile), so that no spelling of a read-back passes: ``nonzero``
    as a function or a method, a boolean mask's indexing, ``item``."""
    from torch.profiler import ProfilerActivity, profile

    from pml_margins.functional import fused_margin_softmax

    monkeypatch.setattr(fused_margin_softmax, "_materializes", lambda *a: False)  # blocks
    loss = AdaCosLoss(50, 16, **mode)
    x, y = torch.randn(8, 16), torch.randint(0, 50, (8,))
    want = AdaCosLoss(50, 16, **mode)
    want.load_state_dict(loss.state_dict())
    with value_checks(False), profile(activities=[ProfilerActivity.CPU]) as trace:
        torch.manual_seed(0)
        got = loss(x, y)
    reads = ("aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense", "aten::item")
    assert not {event.name for event in trace.events()} & set(reads)
    torch.manual_seed(0)
    torch.testing.assert_close(got, want(x, y))
    torch.testing.assert_close(loss.scale, want.scale)


@pytest.mark.parametrize("name", ["AdaFaceLoss", "MagFaceLoss", "ElasticFaceLoss"])
def test_compiled_with_dynamic_shapes_equals_eager(name) -> None:
    """torch.compile(dynamic=True) of the losses whose target function has no closed-form
    slope: the forward failed at the first call ("backward function was compiled with
    non-empty donated buffers which requires ... retain_graph=False"): the slope by
    autograd keeps the target's graph for the loss's backward (found by review). Now run
    eagerly there: two batch sizes, values and gradients equal eager (aot_eager: the same
    graphs inductor gets, without its compile time; ElasticFace's draws seeded alike)."""
    import pml_margins.losses as ours

    torch.manual_seed(0)
    eager = getattr(ours, name)(C, D, scale=16.0)
    module = getattr(ours, name)(C, D, scale=16.0)
    module.load_state_dict(eager.state_dict())
    compiled = torch.compile(module, backend="aot_eager", dynamic=True)
    for batch in (8, 5):
        x, y = 3 * torch.randn(batch, D), torch.randint(0, C, (batch,))
        results = []
        for loss in (compiled, eager):
            leaf = x.clone().requires_grad_(True)
            torch.manual_seed(batch)
            value = loss(leaf, y)
            results.append((value, *torch.autograd.grad(value, (leaf, loss.W))))
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want)


def _column_where_norm_and_square_disagree() -> torch.Tensor:
    """A float32 3-vector of norm >= float32(1e-12) whose squared norm is < float32(1e-24)."""
    generator = torch.Generator().manual_seed(0)
    eps, eps_squared = torch.tensor(1e-12), torch.tensor(1e-24)
    for _ in range(1000):
        column = torch.randn(3, generator=generator)
        column = column * (eps / column.norm())
        if torch.linalg.vector_norm(column) >= eps and torch.dot(column, column) < eps_squared:
            return column
    raise AssertionError("no such column drawn")


@pytest.mark.parametrize("mode", [{}, {"chunk_size": 2}], ids=["default", "blocked"])
@pytest.mark.parametrize(
    ("ours_cls", "pml_cls", "kwargs", "pml_kwargs"),
    [
        (CosFaceLoss, pml_losses.CosFaceLoss, {"margin": 0.35}, {"margin": 0.35}),
        (
            SubCenterArcFaceLoss,
            pml_losses.SubCenterArcFaceLoss,
            {"sub_centers": 2, "margin": 0.5},
            {"sub_centers": 2, "margin": math.degrees(0.5)},
        ),
    ],
    ids=["cosface", "subcenter"],
)
def test_a_float32_column_of_norm_exactly_eps_keeps_its_radial_gradient(
    mode, ours_cls, pml_cls, kwargs, pml_kwargs
) -> None:
    """F.normalize clamps a norm below eps = 1e-12 and passes the gradient at equality.
    Ours compared squared norms with eps^2, and float32's 1e-24 rounds above the square of
    its 1e-12: a column of norm exactly eps lost its radial term (W's gradient up to 34%
    off PML's; found by review). Norms are compared now, on every path."""
    torch.manual_seed(0)
    ours = ours_cls(5, 3, scale=16.0, **kwargs, **mode)
    pml = pml_cls(num_classes=5, embedding_size=3, scale=16.0, **pml_kwargs)
    w = torch.randn(ours.W.shape)
    w[:, 1] = _column_where_norm_and_square_disagree()
    with torch.no_grad():
        ours.W.copy_(w)
        pml.W.copy_(w)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 4, 1])
    (got,) = torch.autograd.grad(ours(x, y), ours.W)
    (want,) = torch.autograd.grad(pml(x, y), pml.W)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
