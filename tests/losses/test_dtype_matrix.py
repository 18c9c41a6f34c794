"""Every pair of embedding and ``W`` dtypes, for every class-weight loss and mode.

Each case runs forward and backward and checks that ``W`` keeps its storage dtype,
that ``x.grad`` has ``x``'s dtype and ``W.grad`` has ``W``'s, and that the value and
both gradients are within a dtype-appropriate tolerance of the float64 reference
(``tests/losses/reference.py``, written from the papers) on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

import pml_margins.functional.fused_margin_softmax as fused_module
from pml_margins.functional import class_columns, sample_classes
from pml_margins.losses import ProxyCircleLoss
from tests.losses.reference import reference_per_sample
from tests.losses.specs import SPECS, LossSpec

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = ["fp16", "bf16", "fp32", "fp64"]
#: one spec per loss class (the first of each in SPECS)
FAMILIES = list({spec.cls: spec for spec in reversed(SPECS)}.values())[::-1]
MODES = {"default": {}, "chunked": {"chunk_size": 7}, "partial_fc": {"sample_rate": 0.6}}

NUM_CLASSES, WIDTH, BATCH = 23, 8, 12


def _rounding(dtype: torch.dtype) -> float:
    """Relative rounding of storing a value in ``dtype``."""
    return float(torch.finfo(dtype).eps)


def _reference(spec: LossSpec, loss_fn, x, y, seed: int, mode: dict) -> torch.Tensor:
    """Mean float64 loss of the same inputs, on the classes the run sampled."""
    w = loss_fn.W.detach().cpu().double().clone().requires_grad_(True)
    bias = getattr(loss_fn, "bias", None)
    bias = None if bias is None else bias.detach().cpu().double()
    x = x.detach().cpu().double().clone().requires_grad_(True)
    w_used, y_used, bias_used = w, y.cpu(), bias
    if "sample_rate" in mode:
        torch.manual_seed(seed)  # the run's draw: on the labels' device, as the loss drew it
        sampled = sample_classes(y, NUM_CLASSES, mode["sample_rate"])
        if sampled is not None:
            index, y_used = (t.cpu() for t in sampled)
            w_used = w[:, class_columns(index, spec.columns_per_class)]  # whole classes
            bias_used = None if bias is None else bias[index]
    value = reference_per_sample(
        spec.kind, x, w_used, y_used, bias=bias_used, **spec.hp_for(loss_fn)
    )
    value = value.mean()
    gx, gw = torch.autograd.grad(value, (x, w))
    return value, gx, gw


def _inputs(x_dtype, w_dtype, spec: LossSpec, mode: dict, device: str = "cpu", w_scale=1.0):
    torch.manual_seed(0)
    loss_fn = spec.build(NUM_CLASSES, WIDTH, **mode).to(device)
    loss_fn.W.data = (loss_fn.W.data * w_scale).to(w_dtype)
    if getattr(loss_fn, "bias", None) is not None:
        loss_fn.bias.data = loss_fn.bias.data.to(w_dtype)
    # scaled so that SphereFace's feature-norm scale stays moderate
    x = (0.5 * torch.randn(BATCH, WIDTH)).to(device, x_dtype).requires_grad_(True)
    y = torch.randint(0, NUM_CLASSES, (BATCH,)).to(device)
    return loss_fn, x, y


def _check_case(
    spec: LossSpec,
    x_dtype,
    w_dtype,
    mode: dict,
    autocast: torch.dtype | None,
    device="cpu",
    w_scale: float = 1.0,
):
    loss_fn, x, y = _inputs(x_dtype, w_dtype, spec, mode, device, w_scale)
    assert loss_fn.fused_logits(x) is not None  # every loss here runs on the fused core
    w_before = loss_fn.W.detach().clone()
    seed = 1234
    torch.manual_seed(seed)
    default = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=autocast or default, enabled=autocast is not None):
        out = loss_fn(x, y)
    out.backward()
    assert loss_fn.W.dtype == w_dtype and torch.equal(loss_fn.W.detach(), w_before)
    assert x.grad is not None and x.grad.dtype == x_dtype
    assert loss_fn.W.grad is not None and loss_fn.W.grad.dtype == w_dtype
    ref, ref_gx, ref_gw = _reference(spec, loss_fn, x, y, seed, mode)
    wide = torch.promote_types(x_dtype, w_dtype)
    # arithmetic: float64 when either input is float64, else float32 (bf16 products under autocast)
    arithmetic = torch.float64 if wide == torch.float64 else torch.float32
    work = _rounding(autocast or arithmetic)
    if autocast is None:
        # logits carry the scale (up to 64): errors of the cosines are multiplied by it
        tol = 100 * work * 64
    else:  # half products: the value to half the type's eps, relative (measured on every
        # family and mode: 1.5e-3 for bf16, 1.1e-4 for fp16; a tolerance of 100 * eps * 64,
        # 50 for bf16, passed losses three times too large or without their margin)
        tol = work / 2
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)
    for got, want, dtype in ((x.grad, ref_gx, x_dtype), (loss_fn.W.grad, ref_gw, w_dtype)):
        scale = float(want.abs().max())
        if autocast is None:  # the gradient is rounded once more to its own dtype
            g_tol = tol + 4 * _rounding(dtype)
            atol = g_tol * max(scale, 1)
        else:  # to 16 eps of its largest entry (measured: 6.5 eps for bf16, 1.6 for fp16)
            g_tol = 16 * work + 4 * _rounding(dtype)
            atol = g_tol * scale
        torch.testing.assert_close(got.cpu().double(), want, rtol=g_tol, atol=atol)


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("spec", FAMILIES, ids=[s.cls.__name__ for s in FAMILIES])
@pytest.mark.parametrize("w_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
def test_every_dtype_pair(x_dtype, w_dtype, spec: LossSpec, mode: dict) -> None:
    _check_case(spec, x_dtype, w_dtype, mode, autocast=None)


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("spec", FAMILIES, ids=[s.cls.__name__ for s in FAMILIES])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_autocast_bf16(x_dtype, spec: LossSpec, mode: dict) -> None:
    _check_case(spec, x_dtype, torch.float32, mode, autocast=torch.bfloat16)


def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except (RuntimeError, AssertionError):  # pragma: no cover - older torch
        return False


#: W scales whose raw columns leave float16's range in the products: entries above 65504,
#: s |W_j| above it (the scale folded into the rows), 1/|W_j| above it in the backward
W_SCALES = {"w1": 1.0, "w1e5": 1e5, "w2e3": 2e3, "w1e-6": 1e-6}
#: the losses whose W is normalized (the others' raw W is their logits: any dtype's limit)
UNIT_W_FAMILIES = [s for s in FAMILIES if s.cls.__name__ != "SoftmaxLoss"]


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason="no float16 autocast on this CPU build")
@pytest.mark.parametrize("w_scale", W_SCALES.values(), ids=W_SCALES.keys())
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("spec", UNIT_W_FAMILIES, ids=[s.cls.__name__ for s in UNIT_W_FAMILIES])
def test_cpu_autocast_fp16_with_any_w_scale(spec: LossSpec, mode: dict, w_scale, monkeypatch):
    """float16 products (CUDA's default autocast) on the unit columns of W: the raw
    columns at these scales gave NaN losses or gradients; default, chunked, Partial FC,
    and the blocked default mode."""
    _check_case(spec, torch.float32, torch.float32, mode, torch.float16, w_scale=w_scale)
    if not mode:
        _blocked_default_mode(monkeypatch)
        _check_case(spec, torch.float32, torch.float32, mode, torch.float16, w_scale=w_scale)


def _blocked_default_mode(monkeypatch) -> None:
    """Default mode on the blocked function with several blocks (at these sizes the core
    would materialize the logits): its saved buffer, the non-target function's forms,
    the sub-centres' layouts."""
    monkeypatch.setattr(fused_module, "MATERIALIZE_MAX_ELEMENTS", 0)
    monkeypatch.setattr(fused_module, "DENSE_MAX_ELEMENTS", 0)  # not the one-node function
    monkeypatch.setattr(fused_module, "_CPU_BLOCK_ELEMENTS", 4 * BATCH)


@pytest.mark.parametrize("spec", FAMILIES, ids=[s.cls.__name__ for s in FAMILIES])
@pytest.mark.parametrize("w_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
def test_blocked_default_mode_every_dtype_pair(x_dtype, w_dtype, spec, monkeypatch) -> None:
    _blocked_default_mode(monkeypatch)
    _check_case(spec, x_dtype, w_dtype, {}, autocast=None)


@pytest.mark.parametrize("spec", FAMILIES, ids=[s.cls.__name__ for s in FAMILIES])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_blocked_default_mode_cpu_autocast_bf16(x_dtype, spec, monkeypatch) -> None:
    _blocked_default_mode(monkeypatch)
    _check_case(spec, x_dtype, torch.float32, {}, autocast=torch.bfloat16)


@pytest.mark.parametrize("w_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
def test_proxy_circle_every_dtype_pair(x_dtype, w_dtype) -> None:
    torch.manual_seed(0)
    loss_fn = ProxyCircleLoss(NUM_CLASSES, WIDTH, m=0.25, gamma=32.0)
    loss_fn.W.data = loss_fn.W.data.to(w_dtype)
    x = torch.randn(BATCH, WIDTH).to(x_dtype).requires_grad_(True)
    y = torch.randint(0, NUM_CLASSES, (BATCH,))
    loss_fn(x, y).backward()
    assert loss_fn.W.dtype == w_dtype and loss_fn.W.grad.dtype == w_dtype
    assert x.grad.dtype == x_dtype and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("spec", FAMILIES, ids=[s.cls.__name__ for s in FAMILIES])
@pytest.mark.parametrize("w_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_every_dtype_pair(x_dtype, w_dtype, spec: LossSpec, mode: dict) -> None:
    """The whole pair matrix on the GPU, against the same float64 reference on CPU."""
    _check_case(spec, x_dtype, w_dtype, mode, autocast=None, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("spec", FAMILIES, ids=[s.cls.__name__ for s in FAMILIES])
@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast_against_reference(autocast, spec: LossSpec, mode: dict) -> None:
    """CUDA autocast with every mode, within the half type's tolerance of float64."""
    _check_case(spec, torch.float32, torch.float32, mode, autocast=autocast, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("spec", FAMILIES, ids=[s.cls.__name__ for s in FAMILIES])
@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast(autocast, spec: LossSpec, mode: dict) -> None:
    loss_fn, x, y = _inputs(torch.float32, torch.float32, spec, mode)
    loss_fn = loss_fn.cuda()
    x = x.detach().cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=autocast):
        out = loss_fn(x, y.cuda())
    out.backward()
    assert loss_fn.W.dtype == torch.float32 and loss_fn.W.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss_fn.W.grad).all()
    ref = _reference(spec, loss_fn.cpu(), x.cpu(), y, 0, {})[0] if not mode else None
    if ref is not None:
        torch.testing.assert_close(out.double().cpu(), ref, rtol=5e-2, atol=0.5)


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason="no float16 autocast on this CPU build")
@pytest.mark.parametrize("w_scale", W_SCALES.values(), ids=W_SCALES.keys())
def test_sharded_cpu_autocast_fp16_with_any_w_scale(w_scale) -> None:
    """The sharded loss's cosine logits under float16 autocast (one process): the unit
    columns in the products, so any W scale gives the float32 loss to float16's rounding."""
    from pml_margins.distributed import ShardedMarginSoftmaxLoss
    from pml_margins.losses import ArcFaceLoss

    torch.manual_seed(0)
    sharded = ShardedMarginSoftmaxLoss(ArcFaceLoss, NUM_CLASSES, WIDTH)
    sharded.W_local.data *= w_scale
    single = ArcFaceLoss(NUM_CLASSES, WIDTH)
    single.W.data = sharded.W_local.data.clone()
    x = torch.randn(BATCH, WIDTH, requires_grad=True)
    y = torch.randint(0, NUM_CLASSES, (BATCH,))
    with torch.autocast("cpu", dtype=torch.float16):
        value = sharded(x, y)
    value.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(sharded.W_local.grad).all()
    tol = _rounding(torch.float16) / 2  # (float16 products: the value to half its eps)
    torch.testing.assert_close(value.detach(), single(x, y).detach(), rtol=tol, atol=tol)
