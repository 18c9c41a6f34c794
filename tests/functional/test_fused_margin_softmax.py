"""The fused margin-softmax path against the plain core and a float64 reference.

The reference (``_reference``) takes its target logits from ``tests/losses/reference.py``,
written from the papers' formulas with ``acos``; the library's target-logit functions
only feed the code under test.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners, reducers, regularizers
from pytorch_metric_learning.distances import CosineSimilarity

from pml_margins.functional import (
    arcface_target,
    class_columns,
    combined_margin_target,
    cosface_target,
    fused_margin_softmax_cross_entropy,
    margin_softmax_cross_entropy,
    sample_classes,
    sphereface_psi,
)
from pml_margins.losses import (
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    NormSoftmaxLoss,
    SoftmaxLoss,
    SphereFaceLoss,
)
from tests.losses import reference as paper

B, D, C = 9, 6, 23


def _sphere_lambda(cosine: torch.Tensor) -> torch.Tensor:
    return (3.0 * cosine + sphereface_psi(cosine, 4)) / 4.0


# the papers' target logits, for the reference only
PAPER_PSI = {
    "softmax": None,
    "nsl": None,
    "cosface": lambda c: c - 0.35,
    "arcface": partial(paper.arcface_cos, m=0.5),
    "arcface_easy": partial(paper.arcface_cos, m=0.5, easy_margin=True),
    "sphereface": partial(paper.sphereface_psi, m=4),
    "sphereface_lambda": lambda c: (3.0 * c + paper.sphereface_psi(c, 4)) / 4.0,
    "combined": partial(paper.combined_cos, m1=1.5, m2=0.2, m3=0.1),
}
# name -> (psi of the code under test, scale: float or "norm", normalize, bias)
CASES = {
    "softmax": (None, 1.0, False, True),
    "nsl": (None, 8.0, True, False),
    "cosface": (partial(cosface_target, margin=0.35), 16.0, True, False),
    "arcface": (partial(arcface_target, margin=0.5), 16.0, True, False),
    "arcface_easy": (partial(arcface_target, margin=0.5, easy_margin=True), 16.0, True, False),
    "sphereface": (partial(sphereface_psi, margin=4), "norm", True, False),
    "sphereface_lambda": (_sphere_lambda, 10.0, True, False),
    "combined": (partial(combined_margin_target, m1=1.5, m2=0.2, m3=0.1), 16.0, True, False),
}
# chunk_size / sample_rate settings that must all give the full loss
MODES = {
    "default": {},
    "materialized": {"materialize": True},
    "blocked": {"materialize": False},
    "chunk1": {"chunk_size": 1},
    "chunk5": {"chunk_size": 5},  # does not divide C
    "chunk64": {"chunk_size": 64},  # larger than C
    "auto": {"chunk_size": "auto"},
    "sampled_full": {"sample_rate": 1.0},
    "sampled_chunk": {"sample_rate": 1.0, "chunk_size": 7},
}
TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.float64: {"atol": 1e-10, "rtol": 1e-10}}


def _inputs(case: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=dtype)
    w = torch.randn(D, C, generator=gen, dtype=dtype)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[1] = labels[0]  # a repeated class
    bias = torch.randn(C, generator=gen, dtype=dtype) if CASES[case][3] else None
    upstream = torch.rand(B, generator=gen, dtype=dtype)
    return x, w, labels, bias, upstream


def _scale(case: str, x: torch.Tensor) -> float | torch.Tensor:
    scale = CASES[case][1]
    return torch.linalg.vector_norm(x, dim=1) if scale == "norm" else scale


def _fused(case, x, w, labels, bias, **mode):
    psi, _, normalize, _ = CASES[case]
    return fused_margin_softmax_cross_entropy(
        x,
        w,
        labels,
        psi,
        _scale(case, x),
        normalize_embeddings=normalize,
        normalize_weight=normalize,
        bias=bias,
        **mode,
    )


def _plain(case, x, w, labels, bias):
    psi, _, normalize, _ = CASES[case]
    xn = F.normalize(x, dim=1) if normalize else x
    wn = F.normalize(w, dim=0) if normalize else w
    logits = xn @ wn
    if bias is not None:
        logits = logits + bias
        psi = None  # softmax only
    return margin_softmax_cross_entropy(logits, labels, psi, _scale(case, x))


def _reference(case, x, w, labels, bias):
    """The formula in float64 with a one-hot mask and the papers' target logits."""
    psi, (_, _, normalize, _) = PAPER_PSI[case], CASES[case]
    x64, w64 = x.double(), w.double()
    if normalize:
        x64 = x64 / x64.norm(dim=1, keepdim=True)
        w64 = w64 / w64.norm(dim=0, keepdim=True)
    z = x64 @ w64
    scale = _scale(case, x.double())
    scale = scale.unsqueeze(1) if isinstance(scale, torch.Tensor) else scale
    onehot = F.one_hot(labels, C).double()
    target = (z * onehot).sum(1, keepdim=True)
    target = psi(target) if psi is not None else target
    logits = scale * (z * (1 - onehot) + target * onehot)
    if bias is not None:
        logits = logits + bias.double()
    return torch.logsumexp(logits, 1) - (logits * onehot).sum(1)


def _value_and_grads(fn, case, x, w, labels, bias, upstream, **mode):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    losses = fn(case, x, w, labels, b, **mode)
    (losses * upstream.to(losses.dtype)).sum().backward()
    grads = [x.grad, w.grad] + ([] if b is None else [b.grad])
    return losses.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_plain_and_reference(case, mode, dtype):
    x, w, labels, bias, upstream = _inputs(case, dtype)
    fused = _value_and_grads(_fused, case, x, w, labels, bias, upstream, **MODES[mode])
    plain = _value_and_grads(_plain, case, x, w, labels, bias, upstream)
    ref = _value_and_grads(_reference, case, x, w, labels, bias, upstream)
    assert fused[0].dtype == dtype
    torch.testing.assert_close(fused[0], plain[0], **TOL[dtype])
    torch.testing.assert_close(fused[0].double(), ref[0], **TOL[dtype])
    for got, want, want64 in zip(fused[1], plain[1], ref[1], strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])
        torch.testing.assert_close(got.double(), want64.double(), **TOL[dtype])


@pytest.mark.parametrize("mode", ["materialized", "blocked", "chunk5"])
@pytest.mark.parametrize("case", list(CASES))
def test_autocast_bf16_close_to_plain(case, mode):
    x, w, labels, bias, upstream = _inputs(case, torch.float32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _value_and_grads(_fused, case, x, w, labels, bias, upstream, **MODES[mode])
        plain = _value_and_grads(_plain, case, x, w, labels, bias, upstream)
    ref = _value_and_grads(_reference, case, x, w, labels, bias, upstream)
    assert fused[0].dtype == torch.float32
    for got in (fused, plain):
        torch.testing.assert_close(got[0].double(), ref[0], atol=0.15, rtol=0.03)
        for g, want in zip(got[1], ref[1], strict=True):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g.double(), want.double(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("mode", ["materialized", "blocked", "chunk5"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck(case, mode):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 5, 5, 10])
    inputs = [x, w]
    if CASES[case][3]:
        inputs.append(torch.randn(11, dtype=torch.float64, generator=gen, requires_grad=True))

    def fn(x, w, b=None):
        psi, scale, normalize, _ = CASES[case]
        scale = torch.linalg.vector_norm(x, dim=1) if scale == "norm" else scale
        return fused_margin_softmax_cross_entropy(
            x,
            w,
            labels,
            psi,
            scale,
            normalize_embeddings=normalize,
            normalize_weight=normalize,
            bias=b,
            **MODES[mode],
        )

    assert torch.autograd.gradcheck(fn, inputs)


def test_mixed_dtypes_keep_weight_dtype():
    x, w, labels, _, upstream = _inputs("arcface", torch.float64)
    w32 = w.float().requires_grad_(True)
    losses = _fused("arcface", x, w32, labels, None, chunk_size=4)
    assert losses.dtype == torch.float64
    (losses * upstream).sum().backward()
    assert w32.grad.dtype == torch.float32


def test_no_grad_path_matches():
    x, w, labels, _, _ = _inputs("cosface", torch.float32)
    with torch.no_grad():
        value = _fused("cosface", x, w, labels, None)
    torch.testing.assert_close(value, _plain("cosface", x, w, labels, None))


def test_retain_graph_backward_twice_is_consistent():
    x, w, labels, _, _ = _inputs("arcface", torch.float64)
    w.requires_grad_(True)
    losses = _fused("arcface", x, w, labels, None)
    (first,) = torch.autograd.grad(losses.sum(), w, retain_graph=True)
    (second,) = torch.autograd.grad(losses.sum(), w)
    torch.testing.assert_close(first, second)


# --- sampling -----------------------------------------------------------------------
def test_sample_classes_keeps_positives_and_remaps():
    labels = torch.tensor([3, 3, 17, 40, 99])
    gen = torch.Generator().manual_seed(0)
    index, local = sample_classes(labels, 100, 0.1, gen)
    assert index.numel() == 10
    assert torch.equal(index, index.sort().values)
    assert torch.equal(index[local], labels)
    assert sample_classes(labels, 100, 1.0) is None


def test_sample_classes_never_drops_positives():
    labels = torch.arange(20)
    index, local = sample_classes(labels, 50, 0.1)  # 5 asked, 20 positives
    assert torch.equal(index, labels)
    assert torch.equal(local, labels)


def test_sampling_grad_only_on_sampled_columns_and_deterministic():
    x, w, labels, _, _ = _inputs("cosface", torch.float64)
    results = []
    for _ in range(2):
        wg = w.clone().requires_grad_(True)
        gen = torch.Generator().manual_seed(7)
        losses = _fused("cosface", x, wg, labels, None, sample_rate=0.4, generator=gen)
        losses.sum().backward()
        results.append((losses.detach(), wg.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    index, _ = sample_classes(labels, C, 0.4, torch.Generator().manual_seed(7))
    touched = results[0][1].abs().sum(0) > 0
    assert touched[labels].all()
    assert torch.equal(touched.nonzero().squeeze(1), index)
    # the sampled loss is the full loss restricted to those classes
    _, local = sample_classes(labels, C, 0.4, torch.Generator().manual_seed(7))
    torch.testing.assert_close(
        results[0][0], _plain("cosface", x, w[:, index], local, None), atol=1e-10, rtol=1e-10
    )


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sample_rate": 0.0}, ValueError),
        ({"sample_rate": 1.5}, ValueError),
        ({"sample_rate": -0.1}, ValueError),
        ({"sample_rate": "half"}, TypeError),
        ({"chunk_size": 0}, ValueError),
        ({"chunk_size": -3}, ValueError),
        ({"chunk_size": 2.5}, TypeError),
        ({"chunk_size": "big"}, TypeError),
    ],
)
def test_bad_kwargs_raise(kwargs, error):
    x, w, labels, _, _ = _inputs("nsl", torch.float32)
    (name,) = kwargs
    with pytest.raises(error, match=name):
        _fused("nsl", x, w, labels, None, **kwargs)
    with pytest.raises(error, match=name):
        NormSoftmaxLoss(C, D, **kwargs)


def test_shape_mismatch_raises():
    x, w, labels, _, _ = _inputs("nsl", torch.float32)
    with pytest.raises(ValueError):
        fused_margin_softmax_cross_entropy(x, w.t(), labels, None, 1.0)


# --- memory: what is kept for the backward ------------------------------------------
def _saved_numels(phi=None, **mode) -> list[int]:
    """Sizes of the tensors an ArcFace forward (with ``phi``, if given) saves for backward."""
    numels: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        numels.append(t.numel())
        return t

    x = torch.randn(12, 5, requires_grad=True)
    w = torch.randn(5, 40, requires_grad=True)
    labels = torch.randint(0, 40, (12,))
    psi = CASES["arcface"][0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_margin_softmax_cross_entropy(x, w, labels, psi, 16.0, non_target_logit_fn=phi, **mode)
    return numels


def test_blocked_default_mode_saves_one_batch_by_classes_buffer():
    assert _saved_numels(materialize=False).count(12 * 40) == 1


def test_small_problems_are_materialized_and_large_ones_blocked():
    """Materialized while B C + D C / 4 <= MATERIALIZE_MAX_ELEMENTS (wider W, fewer
    classes); the dense function also while D <= 2 B and B C, D C <= DENSE_MAX_ELEMENTS."""
    from pml_margins.functional.fused_margin_softmax import (
        DENSE_MAX_ELEMENTS,
        MATERIALIZE_MAX_ELEMENTS,
    )

    def backward_name(batch: int, width: int, num_classes: int, **mode) -> str:
        x = torch.randn(batch, width, requires_grad=True)
        w = torch.randn(width, num_classes)
        labels = torch.randint(0, num_classes, (batch,))
        return type(_fused("arcface", x, w, labels, None, **mode).grad_fn).__name__

    blocked, dense = "_FusedMarginSoftmaxBackward", "_DenseMarginSoftmaxBackward"
    # D > 2 B: the first rule alone
    per_class = 16 + 512 // 4  # B + D / 4 elements per class at B = 16
    small = MATERIALIZE_MAX_ELEMENTS // per_class
    assert backward_name(16, 512, small) == dense
    assert backward_name(16, 512, small + 1) == blocked
    # D <= 2 B: dense up to B C = DENSE_MAX_ELEMENTS (past the first rule's 910 classes)
    most = DENSE_MAX_ELEMENTS // 256
    assert (256 + 128 // 4) * most > MATERIALIZE_MAX_ELEMENTS
    assert backward_name(256, 128, most) == dense
    assert backward_name(256, 128, most + 1) == blocked
    # ... and D C <= DENSE_MAX_ELEMENTS when D is the larger
    assert backward_name(256, 512, DENSE_MAX_ELEMENTS // 512) == dense
    assert backward_name(256, 512, DENSE_MAX_ELEMENTS // 512 + 1) == blocked
    # a non-target function or sub-centres: the first rule only (autograd when small)
    x, labels = torch.randn(256, 128, requires_grad=True), torch.randint(0, 2000, (256,))
    phi = _fused("arcface", x, torch.randn(128, 2000), labels, None, non_target_logit_fn=torch.sin)
    assert type(phi.grad_fn).__name__ == blocked
    assert backward_name(16, 4, 64, materialize=False) == blocked
    assert backward_name(16, 4, 64, chunk_size=64) == blocked
    assert backward_name(16, 4, 20000, materialize=True) == dense


def test_accelerators_materialize_up_to_one_device_block():
    """On an accelerator (launch-bound: an H200 ran the dense function in 2.3 ms and the
    blocked one in 3.8 ms at 256 x 512 x 10k) the logits are materialized while B C and
    D C fit one device block; the CPU rule is unchanged for the same sizes."""
    from pml_margins.functional.fused_margin_softmax import _DEVICE_BLOCK_ELEMENTS, _materializes

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert _materializes(256, 512, 10_000, True, gpu)
    assert _materializes(256, 512, 10_000, False, gpu)  # sub-centres / phi: autograd
    assert not _materializes(256, 512, 10_000, True, cpu)
    most = _DEVICE_BLOCK_ELEMENTS // 512
    assert _materializes(512, 128, most, True, gpu)
    assert not _materializes(512, 128, most + 1, True, gpu)
    assert not _materializes(128, 512, most + 1, True, gpu)  # D C bounds it too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_mode_runs_the_dense_function_at_10k_classes():
    x = torch.randn(256, 512, device="cuda", requires_grad=True)
    w = torch.randn(512, 10_000, device="cuda")
    labels = torch.randint(0, 10_000, (256,), device="cuda")
    out = _fused("arcface", x, w, labels, None)
    assert type(out.grad_fn).__name__ == "_DenseMarginSoftmaxBackward"


@pytest.mark.parametrize("chunk_size", [1, 7, "auto"])
def test_bounded_mode_saves_no_batch_by_classes_tensor(chunk_size):
    numels = _saved_numels(chunk_size=chunk_size)
    assert 12 * 40 not in numels
    assert max(numels) <= 5 * 40  # W itself is the largest


# --- the loss classes route through the fused path ----------------------------------
LOSSES = {
    "arcface": (ArcFaceLoss, {"scale": 16.0}),
    "cosface": (CosFaceLoss, {"scale": 16.0}),
    "sphereface": (SphereFaceLoss, {}),
    "sphereface_scaled": (SphereFaceLoss, {"scale": 10.0, "lambda_": 3.0}),
    "sphereface_normalized": (SphereFaceLoss, {"scale": 10.0, "feature_norm": False}),
    "nsl": (NormSoftmaxLoss, {"scale": 8.0}),
    "softmax": (SoftmaxLoss, {}),
    "combined": (CombinedMarginLoss, {"m1": 1.5, "m2": 0.2, "m3": 0.1, "scale": 16.0}),
}


def _plain_loss(loss, x, labels):
    logits, scale = loss.base_logits(x)
    return margin_softmax_cross_entropy(logits, labels, loss.target_logit_fn(), scale)


@pytest.mark.parametrize("mode", ["default", "chunk5", "auto", "sampled_full"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_classes_match_plain_path(name, mode):
    cls, kwargs = LOSSES[name]
    torch.manual_seed(0)
    loss = cls(C, D, **kwargs, **MODES[mode]).double()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    assert loss.fused_logits(x) is not None
    labels = torch.randint(0, C, (B,))
    params = [x, *loss.parameters()]
    got = torch.autograd.grad(loss(x, labels), params)
    want = torch.autograd.grad(_plain_loss(loss, x, labels).mean(), params)
    for g, v in zip(got, want, strict=True):
        torch.testing.assert_close(g, v, atol=1e-10, rtol=1e-10)


def test_loss_with_miner_reducer_regularizer(monkeypatch):
    def make() -> ArcFaceLoss:
        torch.manual_seed(0)
        return ArcFaceLoss(
            C,
            D,
            scale=16.0,
            chunk_size=4,
            reducer=reducers.ThresholdReducer(low=0.1),
            weight_regularizer=regularizers.RegularFaceRegularizer(),
            embedding_regularizer=regularizers.LpRegularizer(),
        )

    fused, plain = make(), make()
    plain.chunk_size = None  # the plain path takes no chunk_size
    monkeypatch.setattr(plain, "fused_logits", lambda embeddings: None)
    x = torch.randn(B, D, requires_grad=True)
    labels = torch.randint(0, 3, (B,))
    indices = miners.MultiSimilarityMiner(epsilon=0.5)(x, labels)
    values = []
    for loss in (fused, plain):
        value = loss(x, labels, indices)
        values.append((value, *torch.autograd.grad(value, [x, loss.W])))
    assert torch.isfinite(values[0][0])
    for got, want in zip(*values, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_custom_distance_falls_back_to_plain_path():
    loss = ArcFaceLoss(C, D, distance=CosineSimilarity(power=2))
    x = torch.randn(B, D)
    assert loss.fused_logits(x) is None
    labels = torch.randint(0, C, (B,))
    torch.testing.assert_close(loss(x, labels), _plain_loss(loss, x, labels).mean())


def test_loss_keeps_weight_dtype_and_stats():
    loss = CosFaceLoss(C, D, chunk_size=3, collect_stats=True)
    x = torch.randn(B, D, dtype=torch.float64)
    labels = torch.randint(0, C, (B,))
    loss(x, labels).backward()
    assert loss.W.dtype == torch.float32 and loss.W.grad.dtype == torch.float32
    cos = (F.normalize(x, dim=1) @ F.normalize(loss.W.double(), dim=0)).gather(
        1, labels.unsqueeze(1)
    )
    assert loss.avg_angle == pytest.approx(math.degrees(torch.acos(cos).mean().item()), abs=1e-3)


def test_sampled_loss_trains_only_sampled_columns():
    torch.manual_seed(0)
    loss = ArcFaceLoss(1000, D, sample_rate=0.05)
    x = torch.randn(B, D)
    labels = torch.randint(0, 1000, (B,))
    loss(x, labels).backward()
    touched = loss.W.grad.abs().sum(0) > 0
    assert touched[labels].all()
    assert int(touched.sum()) == 50


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["default", "chunk5"])
@pytest.mark.parametrize("case", ["arcface", "sphereface", "softmax"])
def test_cuda_matches_cpu(case, mode):
    x, w, labels, bias, upstream = _inputs(case, torch.float64)
    cpu = _value_and_grads(_fused, case, x, w, labels, bias, upstream, **MODES[mode])
    to = [t.cuda() if t is not None else None for t in (x, w, labels, bias, upstream)]
    gpu = _value_and_grads(_fused, case, *to, **MODES[mode])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0])
    for g, c in zip(gpu[1], cpu[1], strict=True):
        torch.testing.assert_close(g.cpu(), c)


# --- a target-logit function that closes over per-row tensors ------------------------
@pytest.mark.parametrize("mode", ["materialized", "blocked", "chunk5", "sampled_chunk"])
def test_per_row_margins_from_feature_norms_get_their_gradients(mode):
    """MagFace-like: psi_i(z) = cos(theta + m_i), m_i linear in |x_i| (gradient through it)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, D, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(D, C, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, C, (B,), generator=gen)

    def margins() -> torch.Tensor:
        return 0.2 + 0.1 * torch.linalg.vector_norm(x, dim=1).clamp(max=4.0)

    m = margins()
    got = fused_margin_softmax_cross_entropy(
        x, w, labels, lambda c: torch.cos(torch.acos(c.clamp(-1, 1)) + m), 16.0, **MODES[mode]
    )
    gx, gw = torch.autograd.grad(got.sum(), (x, w))
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=0)
    target = torch.cos(torch.acos(cos.gather(1, labels[:, None]).squeeze(1)) + margins())
    want = paper.target_softmax_cross_entropy(16.0 * cos, labels, 16.0 * target)
    wx, ww = torch.autograd.grad(want.sum(), (x, w))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, wx, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(gw, ww, rtol=1e-8, atol=1e-8)


def test_per_row_tensor_with_grad_while_embeddings_and_weights_have_none():
    x, w, labels, _, _ = _inputs("cosface", torch.float64)
    m = torch.full((B,), 0.3, dtype=torch.float64, requires_grad=True)
    for materialize in (True, False):
        losses = fused_margin_softmax_cross_entropy(
            x, w, labels, lambda c: c - m, 8.0, materialize=materialize
        )
        (grad,) = torch.autograd.grad(losses.sum(), m)
        # d L_i / d m_i = -s (p_iy - 1) = s (1 - p_iy)
        cos = F.normalize(x, dim=1) @ F.normalize(w, dim=0)
        logits = (8.0 * cos).scatter(
            1, labels[:, None], (8.0 * (cos.gather(1, labels[:, None]) - 0.3))
        )
        p_y = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
        torch.testing.assert_close(grad, 8.0 * (1 - p_y), rtol=1e-10, atol=1e-10)


# --- a non-target function phi that closes over per-row constants --------------------
class _HardNegatives:
    """phi_i(z) = z (0.2 + z) where z > tau_i, else z; with its analytic slope."""

    def __init__(self, tau: torch.Tensor) -> None:
        self.tau = tau

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.where(z > self.tau.to(z.dtype).unsqueeze(1), z * (0.2 + z), z)

    def slope(self, z: torch.Tensor) -> torch.Tensor:
        hard = z > self.tau.to(z.dtype).unsqueeze(1)
        return torch.where(hard, 0.2 + 2 * z, torch.ones_like(z))


def _phi_reference(x, w, labels, tau, scale):
    """The formula in float64, written out: one-hot target, phi on the other entries."""
    z = F.normalize(x, dim=1) @ F.normalize(w, dim=0)
    hard = z.detach() > tau[:, None]
    others = torch.where(hard, z * (0.2 + z), z)
    target = paper.arcface_cos(z.gather(1, labels[:, None]).squeeze(1), 0.5)
    s_col = scale.unsqueeze(1) if isinstance(scale, torch.Tensor) else scale
    return paper.target_softmax_cross_entropy(s_col * others, labels, scale * target)


@pytest.mark.parametrize("scale", ["float", "norm"])
@pytest.mark.parametrize("analytic", [True, False], ids=["slope", "autograd"])
@pytest.mark.parametrize("mode", list(MODES))
def test_non_target_function_on_every_mode(mode, analytic, scale):
    x, w, labels, _, upstream = _inputs("arcface", torch.float64)
    tau = torch.linspace(-0.6, 0.4, B, dtype=torch.float64)
    phi = _HardNegatives(tau)
    fn = phi if analytic else phi.__call__  # a plain callable: slope by autograd

    def value_and_grads(compute):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        s = torch.linalg.vector_norm(xg, dim=1) if scale == "norm" else 16.0
        losses = compute(xg, wg, s)
        return (losses, *torch.autograd.grad((losses * upstream).sum(), (xg, wg)))

    got = value_and_grads(
        lambda xg, wg, s: fused_margin_softmax_cross_entropy(
            xg,
            wg,
            labels,
            partial(arcface_target, margin=0.5),
            s,
            non_target_logit_fn=fn,
            **MODES[mode],
        )
    )
    want = value_and_grads(lambda xg, wg, s: _phi_reference(xg, wg, labels, tau, s))
    assert (F.normalize(x, dim=1) @ F.normalize(w, dim=0) > tau[:, None]).any()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_non_target_function_with_bias_and_partial_fc_sampled_columns():
    """phi before the scale, bias after it; Partial FC: the reference on the sampled columns."""
    x, w, labels, _, _ = _inputs("arcface", torch.float64)
    bias = torch.randn(C, dtype=torch.float64)
    phi = _HardNegatives(torch.zeros(B, dtype=torch.float64))
    gen = torch.Generator().manual_seed(3)
    got = fused_margin_softmax_cross_entropy(
        x,
        w,
        labels,
        None,
        4.0,
        normalize_embeddings=False,
        normalize_weight=False,
        bias=bias,
        sample_rate=0.5,
        generator=gen,
        materialize=False,
        non_target_logit_fn=phi,
    )
    index, local = sample_classes(labels, C, 0.5, torch.Generator().manual_seed(3))
    z = x @ w[:, index]
    logits = 4.0 * torch.where(z > 0, z * (0.2 + z), z) + bias[index]
    target = 4.0 * z.gather(1, local[:, None]).squeeze(1) + bias[index][local]
    want = paper.target_softmax_cross_entropy(logits, local, target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_non_target_function_keeps_one_buffer():
    """Default mode saves one (B, C) buffer with phi (e^(l - m) phi'(z), or z with a bias or
    a tensor scale); bounded mode none."""
    phi = _HardNegatives(torch.zeros(12))
    assert _saved_numels(phi, materialize=False).count(12 * 40) == 1
    assert 12 * 40 not in _saved_numels(phi, chunk_size=7)


# --- sub-centres: K columns per class, the class cosine their maximum ----------------
K = 3
# name -> (psi, scale: float or "norm", normalize, bias, phi)
SUB_CASES = {
    "arcface": (partial(arcface_target, margin=0.5), 16.0, True, False, False),
    "norm_scale": (partial(cosface_target, margin=0.35), "norm", True, False, False),
    "bias_raw": (None, 1.0, False, True, False),
    "phi": (partial(arcface_target, margin=0.5), 16.0, True, False, True),
    "phi_norm_scale": (None, "norm", True, False, True),
}
SUB_PAPER_PSI = {
    "arcface": partial(paper.arcface_cos, m=0.5),
    "norm_scale": lambda c: c - 0.35,
    "bias_raw": None,
    "phi": partial(paper.arcface_cos, m=0.5),
    "phi_norm_scale": None,
}
_TAU = torch.linspace(-0.6, 0.4, B, dtype=torch.float64)


def _sub_inputs(dtype: torch.dtype, ties: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=dtype)
    w = torch.randn(D, C * K, generator=gen, dtype=dtype)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[1] = labels[0]
    if ties:  # every class: sub-centre 1 equals 0; odd classes: 2 equals 1 too
        planes = w.view(D, C, K)
        planes[:, :, 1] = planes[:, :, 0]
        planes[:, 1::2, 2] = planes[:, 1::2, 1]
    bias = torch.randn(C, generator=gen, dtype=dtype)
    upstream = torch.rand(B, generator=gen, dtype=dtype)
    return x, w, labels, bias, upstream


def _sub_fused(case, x, w, labels, bias, **mode):
    psi, scale, normalize, has_bias, has_phi = SUB_CASES[case]
    return fused_margin_softmax_cross_entropy(
        x,
        w,
        labels,
        psi,
        torch.linalg.vector_norm(x, dim=1) if scale == "norm" else scale,
        normalize_embeddings=normalize,
        normalize_weight=normalize,
        bias=bias if has_bias else None,
        non_target_logit_fn=_HardNegatives(_TAU.to(x.dtype)) if has_phi else None,
        sub_centers=K,
        **mode,
    )


def _sub_reference(case, x, w, labels, bias):
    """Sub-center's formula: one product per sub-centre, ``torch.max`` (first on ties)."""
    _, scale, normalize, has_bias, has_phi = SUB_CASES[case]
    psi = SUB_PAPER_PSI[case]
    xn = F.normalize(x, dim=1) if normalize else x
    wn = F.normalize(w, dim=0) if normalize else w
    z = torch.stack([xn @ wn[:, k::K] for k in range(K)]).max(dim=0).values  # (B, C)
    rows = torch.arange(len(labels))
    target = z[rows, labels]
    target = psi(target) if psi is not None else target
    others = _HardNegatives(_TAU.to(x.dtype))(z) if has_phi else z
    s = torch.linalg.vector_norm(x, dim=1) if scale == "norm" else scale
    s_col = s.unsqueeze(1) if isinstance(s, torch.Tensor) else s
    logits, target = s_col * others, s * target
    if has_bias:
        logits, target = logits + bias, target + bias[labels]
    return paper.target_softmax_cross_entropy(logits, labels, target)


def _sub_value_and_grads(fn, case, x, w, labels, bias, upstream, **mode):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    losses = fn(case, x, w, labels, b, **mode)
    inputs = (x, w, b) if SUB_CASES[case][3] else (x, w)
    return (losses.detach(), *torch.autograd.grad((losses * upstream).sum(), inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(SUB_CASES))
def test_sub_centres_on_every_mode(case, mode, ties, dtype):
    x, w, labels, bias, upstream = _sub_inputs(dtype, ties)
    got = _sub_value_and_grads(_sub_fused, case, x, w, labels, bias, upstream, **MODES[mode])
    want = _sub_value_and_grads(_sub_reference, case, x, w, labels, bias, upstream)
    assert got[0].dtype == dtype
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])
    if ties:  # only the first of tied sub-centres gets a gradient
        grad_w = got[2].view(D, C, K)
        assert (grad_w[:, :, 1] == 0).all() and (grad_w[:, 1::2, 2] == 0).all()


@pytest.mark.parametrize("mode", ["default", "materialized", "blocked", "chunk5"])
def test_sub_centres_partial_fc_samples_whole_classes(mode):
    x, w, labels, bias, upstream = _sub_inputs(torch.float64, ties=True, seed=1)
    got = _sub_value_and_grads(
        _sub_fused,
        "bias_raw",
        x,
        w,
        labels,
        bias,
        upstream,
        sample_rate=0.5,
        generator=torch.Generator().manual_seed(3),
        **MODES[mode],
    )
    index, local = sample_classes(labels, C, 0.5, torch.Generator().manual_seed(3))
    columns = class_columns(index, K)
    want = _sub_value_and_grads(
        _sub_reference, "bias_raw", x, w[:, columns], local, bias[index], upstream
    )
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[2][:, columns], want[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[3][index], want[3], rtol=1e-10, atol=1e-10)
    dropped = torch.ones(C * K, dtype=torch.bool)
    dropped[columns] = False
    assert dropped.any() and (got[2][:, dropped] == 0).all()


@pytest.mark.parametrize("mode", ["materialized", "blocked", "chunk5"])
def test_sub_centres_gradcheck(mode):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 11 * K, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 5, 5, 10])

    def fn(x, w, b):
        return fused_margin_softmax_cross_entropy(
            x,
            w,
            labels,
            partial(arcface_target, margin=0.5),
            torch.linalg.vector_norm(x, dim=1),
            bias=b,
            sub_centers=K,
            **MODES[mode],
        )

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("mode", ["materialized", "blocked", "chunk5"])
def test_sub_centres_autocast_bf16_close_to_reference(mode):
    x, w, labels, bias, upstream = _sub_inputs(torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _sub_value_and_grads(
            _sub_fused, "arcface", x, w, labels, bias, upstream, **MODES[mode]
        )
    want = _sub_value_and_grads(
        _sub_reference, "arcface", x.double(), w.double(), labels, bias.double(), upstream.double()
    )
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=0.15, rtol=0.05)


def _sub_saved(**mode) -> list[tuple[int, torch.dtype]]:
    """Sizes and dtypes of what a sub-centre forward (12 rows, 40 classes, K = 3) saves."""
    saved: list[tuple[int, torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.numel(), t.dtype))
        return t

    x = torch.randn(12, 5, requires_grad=True)
    w = torch.randn(5, 40 * K, requires_grad=True)
    labels = torch.randint(0, 40, (12,))
    psi = partial(arcface_target, margin=0.5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_margin_softmax_cross_entropy(x, w, labels, psi, 16.0, sub_centers=K, **mode)
    return saved


def test_sub_centres_default_mode_saves_class_values_and_byte_winners():
    saved = _sub_saved(materialize=False)
    assert saved.count((12 * 40, torch.float32)) == 1
    assert saved.count((12 * 40, torch.uint8)) == 1
    assert all(n < 12 * 40 * K for n, _ in saved if n != 5 * 40 * K)  # nothing (B, C*K) but W


@pytest.mark.parametrize("chunk_size", [1, 7, "auto"])
def test_sub_centres_bounded_mode_saves_no_batch_by_classes_tensor(chunk_size):
    numels = [n for n, _ in _sub_saved(chunk_size=chunk_size)]
    assert 12 * 40 not in numels and 12 * 40 * K not in numels
    assert max(numels) <= 5 * 40 * K  # W itself is the largest


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sub_centers": 0}, ValueError, "sub_centers must be >= 1"),
        ({"sub_centers": 2.0}, TypeError, "sub_centers must be an int"),
        ({"sub_centers": 2}, ValueError, "not a multiple of sub_centers=2"),
        ({"sub_centers": 3, "bias": torch.zeros(C * K)}, ValueError, rf"bias .*\({C},\)"),
    ],
)
def test_sub_centres_bad_arguments(kwargs, error, match):
    x, w, labels, _, _ = _sub_inputs(torch.float32)
    with pytest.raises(error, match=match):
        fused_margin_softmax_cross_entropy(x, w, labels, None, **kwargs)


def test_one_sub_centre_is_the_plain_core_bit_for_bit():
    x, w, labels, _, _ = _inputs("arcface", torch.float64)
    psi = CASES["arcface"][0]
    for mode in ({"materialize": False}, {"chunk_size": 5}, {"materialize": True}):
        got = fused_margin_softmax_cross_entropy(x, w, labels, psi, 16.0, sub_centers=1, **mode)
        want = fused_margin_softmax_cross_entropy(x, w, labels, psi, 16.0, **mode)
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", list(MODES))
def test_formed_target_cosines_replace_the_gather(mode):
    """Target cosines the step already formed give the same losses and gradients bit for
    bit; they are the ones used (a shifted copy moves the loss); a wrong shape is refused."""
    x, w, labels, _, upstream = _inputs("arcface", torch.float64)
    z_y = (F.normalize(x, dim=1) * F.normalize(w, dim=0)[:, labels].t()).sum(1)
    psi = partial(arcface_target, margin=0.5)

    def run(formed):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        losses = fused_margin_softmax_cross_entropy(
            xg, wg, labels, psi, 16.0, target_cosines=formed, **MODES[mode]
        )
        return (losses, *torch.autograd.grad((losses * upstream).sum(), (xg, wg)))

    plain, formed = run(None), run(z_y)
    for a, b in zip(plain, formed, strict=True):
        assert torch.equal(a, b)
    # the blocked function uses them; the materialized paths (small C here) read the
    # target cosines off their own product
    blocked = mode in ("blocked", "auto", "sampled_chunk") or mode.startswith("chunk")
    assert torch.equal(run(z_y + 0.01)[0], plain[0]) != blocked
    with pytest.raises(ValueError, match="target_cosines"):
        fused_margin_softmax_cross_entropy(x, w, labels, psi, 16.0, target_cosines=z_y[:3])
