"""Embeddings and labels made under ``torch.inference_mode()`` train the class weights.

Features from a frozen backbone are often computed under ``torch.inference_mode()``; PML's
losses train their ``W`` on them. Autograd refuses to save an inference tensor, and every
class-weight loss failed in its default mode ("Inference tensors cannot be saved for
backward") and in ``chunk_size`` mode; the sub-centre, CurricularFace and ProxyCircle
losses failed on inference labels too. Each must give the value and ``W``'s gradient of
the same inputs made outside inference mode, bit for bit.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from pml_margins.losses import CenterLoss, CircleLoss, ProxyCircleLoss
from tests.losses.specs import SPECS

#: one spec per loss class (the first of each in SPECS), and ProxyCircle
FAMILIES = list({spec.cls: spec for spec in reversed(SPECS)}.values())[::-1]
BUILDERS = {spec.cls.__name__: spec.build for spec in FAMILIES}
BUILDERS["ProxyCircleLoss"] = ProxyCircleLoss
MODES = {"default": {}, "chunked": {"chunk_size": 3}, "partial_fc": {"sample_rate": 0.6}}
MADE_IN_INFERENCE = ["embeddings", "labels", "both"]
NUM_CLASSES, WIDTH, BATCH = 7, 6, 10


def _run(build, mode: dict, inference: str, dtype: torch.dtype, autocast, device="cpu"):
    torch.manual_seed(0)
    loss_fn = build(NUM_CLASSES, WIDTH, **mode).to(device)
    x = torch.randn(BATCH, WIDTH, dtype=dtype).to(device)
    y = (torch.arange(BATCH) % NUM_CLASSES).to(device)
    if inference != "none":
        with torch.inference_mode():
            x_inf, y_inf = x.clone(), y.clone()
        if inference in ("embeddings", "both"):
            x = x_inf
        if inference in ("labels", "both"):
            y = y_inf
        assert x.is_inference() or y.is_inference()
    torch.manual_seed(1)  # ElasticFace's margins, Partial FC's classes
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
        value = loss_fn(x, y)
    value.backward()
    return value.detach(), loss_fn.W.grad


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["plain", "autocast_bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("inference", MADE_IN_INFERENCE)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("name", BUILDERS)
def test_class_weight_losses_train_on_inference_tensors(name, mode, inference, dtype, autocast):
    build = BUILDERS[name]
    want_value, want_grad = _run(build, mode, "none", dtype, autocast)
    value, grad = _run(build, mode, inference, dtype, autocast)
    assert torch.equal(value, want_value)
    assert grad is not None and torch.equal(grad, want_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [None, torch.float16], ids=["plain", "autocast_fp16"])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("name", BUILDERS)
def test_class_weight_losses_train_on_inference_tensors_on_cuda(name, mode, autocast):
    """The accelerator's defaults (the logits materialized, one large block) too."""
    build = BUILDERS[name]
    want = _run(build, mode, "none", torch.float32, autocast, "cuda")
    got = _run(build, mode, "both", torch.float32, autocast, "cuda")
    # (the same kernels on the same inputs; atomics in a reduction may reorder sums)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inference", MADE_IN_INFERENCE)
def test_center_and_circle_losses_take_inference_tensors(inference) -> None:
    """(These passed before; the contract is the same for every loss.)"""
    for build in (lambda: CenterLoss(NUM_CLASSES, WIDTH), CircleLoss):
        results = []
        for made in ("none", inference):
            torch.manual_seed(0)
            loss_fn = build()
            x = torch.randn(BATCH, WIDTH)
            y = torch.arange(BATCH) % NUM_CLASSES
            if made != "none":
                with torch.inference_mode():
                    x_inf, y_inf = x.clone(), y.clone()
                x = x_inf if made in ("embeddings", "both") else x
                y = y_inf if made in ("labels", "both") else y
            x_leaf = x if x.is_inference() else x.requires_grad_(True)
            value = loss_fn(x_leaf, y)
            grads = [p.grad for p in loss_fn.parameters()]
            if value.requires_grad:
                value.backward()
                grads = [p.grad for p in loss_fn.parameters()]
            results.append((value.detach(), grads))
        (want, want_grads), (got, got_grads) = results
        assert torch.equal(got, want)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert (g is None and w is None) or torch.equal(g, w)


def test_an_edit_in_place_still_raises_autograd_error() -> None:
    """Tensors made outside inference mode still go through ``save_for_backward``."""
    loss_fn = BUILDERS["ArcFaceLoss"](NUM_CLASSES, WIDTH)
    x = torch.randn(BATCH, WIDTH, requires_grad=True)
    value = loss_fn(x, torch.arange(BATCH) % NUM_CLASSES)
    with torch.no_grad():
        loss_fn.W.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def _made_in_inference(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return tuple(t.clone() for t in tensors)


@pytest.mark.parametrize("route", ["autograd_only", "miner", "plain_subclass"])
@pytest.mark.parametrize("name", ["SoftmaxLoss", "ArcFaceLoss", "SubCenterArcFaceLoss"])
def test_other_routes_train_on_inference_tensors(name, route) -> None:
    """Autograd through the materialized logits (``autograd_only``), a miner's pairs made
    in inference mode too, and the plain route of a subclass with its own ``base_logits``
    (PML's distance on the raw embeddings)."""
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    import pml_margins

    build = BUILDERS[name]
    if route == "plain_subclass":
        cls = build(NUM_CLASSES, WIDTH).__class__
        build = type("Own", (cls,), {"base_logits": lambda self, e: cls.base_logits(self, e)})

    results = []
    for inference in (False, True):
        torch.manual_seed(0)
        loss_fn = build(NUM_CLASSES, WIDTH)
        x, y = torch.randn(BATCH, WIDTH), torch.arange(BATCH) % NUM_CLASSES
        pairs = MultiSimilarityMiner(epsilon=1.0)(x, y) if route == "miner" else None
        if inference:
            x, y = _made_in_inference(x, y)
            if pairs is not None:
                pairs = _made_in_inference(*pairs)
        with pml_margins.autograd_only() if route == "autograd_only" else nullcontext():
            value = loss_fn(x, y, pairs)
        value.backward()
        results.append((value.detach(), loss_fn.W.grad))
    (want, want_grad), (got, grad) = results
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)


def test_sharded_loss_on_one_rank_trains_on_inference_tensors() -> None:
    """One rank's gather returns its input, which autograd then records."""
    from pml_margins.distributed import ShardedMarginSoftmaxLoss
    from tests.distributed.cases import SPEC_BY_ID

    for spec_id, spec in SPEC_BY_ID.items():
        results = []
        for inference in (False, True):
            torch.manual_seed(0)
            loss_fn = ShardedMarginSoftmaxLoss(spec.cls, 9, 4, **spec.kwargs)
            x, y = torch.randn(6, 4), torch.randint(0, 9, (6,))
            if inference:
                x, y = _made_in_inference(x, y)
            torch.manual_seed(1)
            value = loss_fn(x, y)
            value.backward()
            results.append((value.detach(), loss_fn.W_local.grad))
        (want, want_grad), (got, grad) = results
        assert torch.equal(got, want) and torch.equal(grad, want_grad), spec_id


@pytest.mark.parametrize("per_anchor", [False, True])
def test_circle_loss_keeps_the_batch_as_its_own_reference_set(per_anchor) -> None:
    """From the review of the change: the batch passed as its own ``ref_emb`` and copied
    out of inference mode became two tensors, and the whole-batch form (each unordered
    pair once where the reference set is the batch) counted every pair twice."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 6), torch.arange(12) % 3
    loss_fn = CircleLoss(per_anchor=per_anchor)
    want = loss_fn(x, y)
    assert torch.equal(loss_fn(x, y, None, x, y), want)
    x_inf, y_inf = _made_in_inference(x, y)
    assert torch.equal(loss_fn(x_inf, y_inf), want)
    assert torch.equal(loss_fn(x_inf, y_inf, None, x_inf, y_inf), want)


@pytest.mark.parametrize("name", ["SoftmaxLoss", "NormSoftmaxLoss", "ArcFaceLoss"])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_an_inference_batch_refilled_before_backward_gives_the_forwards_gradient(name, mode):
    """From the review of the change: the first version kept the inference batch itself
    (it has no version counter) and SoftmaxLoss's raw rows were a view of it: a frozen
    backbone's buffer refilled in inference mode before ``backward()`` gave the gradient
    of the next batch (0.36 off), silently. The batch is copied instead."""
    torch.manual_seed(0)
    y = torch.arange(BATCH) % NUM_CLASSES
    batch, next_batch = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    torch.manual_seed(1)
    reference = BUILDERS[name](NUM_CLASSES, WIDTH, **mode)
    torch.manual_seed(2)
    reference(batch.clone(), y).backward()
    torch.manual_seed(1)
    loss_fn = BUILDERS[name](NUM_CLASSES, WIDTH, **mode)
    (features,) = _made_in_inference(batch)
    torch.manual_seed(2)
    value = loss_fn(features, y)
    with torch.inference_mode():
        features.copy_(next_batch)  # the backbone's buffer, reused
    value.backward()
    assert torch.equal(loss_fn.W.grad, reference.W.grad)


def test_compiled_functions_read_no_inference_flag() -> None:
    """From the review of the change: Dynamo cannot trace ``Tensor.is_inference()``; the
    copies broke ``fullgraph=True`` compilation of the public functions and added graph
    breaks to the fused core (none before). While tracing nothing is copied."""
    from torch._dynamo.utils import counters

    from pml_margins.functional import (
        fused_margin_softmax_cross_entropy,
        margin_softmax_cross_entropy,
    )

    torch.manual_seed(0)
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    plain = torch.compile(
        lambda a, b: margin_softmax_cross_entropy(a @ w, b, None, 4.0),
        backend="eager",
        fullgraph=True,
    )
    torch.testing.assert_close(plain(x, y), margin_softmax_cross_entropy(x @ w, y, None, 4.0))
    torch._dynamo.reset()
    counters.clear()
    fused = torch.compile(
        lambda a, b: fused_margin_softmax_cross_entropy(a, w, b, None, 4.0), backend="eager"
    )
    fused(x, y).sum().backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    counters.clear()
    chunked = torch.compile(  # (its out= products break the graph, as before)
        lambda a, b: fused_margin_softmax_cross_entropy(a, w, b, None, 4.0, chunk_size=2),
        backend="eager",
    )
    chunked(x, y).sum().backward()
    assert not [r for r in counters["graph_break"] if "inference" in str(r)]
    torch._dynamo.reset()
