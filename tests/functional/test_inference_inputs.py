"""The margin-softmax functions take embeddings, labels and scales made under
``torch.inference_mode()`` (a frozen backbone's features) while ``W`` trains: the same
values and gradients as the same tensors made outside it. Autograd refuses to save an
inference tensor; the functions' hand-written backwards used to save them."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pml_margins.functional import (
    arcface_target,
    fused_margin_softmax_cross_entropy,
    margin_softmax_cross_entropy,
)
from pml_margins.functional.dense_margin_softmax import dense_margin_softmax_cross_entropy

B, D, C = 9, 5, 6
ARC = partial(arcface_target, margin=0.5)


def _in_inference(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


def _run(fn, inference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, labels = torch.randn(B, D, dtype=torch.float64), torch.arange(B) % C
    scale = torch.full((B,), 8.0, dtype=torch.float64)
    w = torch.randn(D, C, dtype=torch.float64, requires_grad=True)
    if inference:
        x, labels, scale = _in_inference(x), _in_inference(labels), _in_inference(scale)
    value = fn(x, w, labels, scale).sum()
    value.backward()
    return value.detach(), w.grad


CALLS = {
    "dense": lambda x, w, y, s: dense_margin_softmax_cross_entropy(x, w, y, ARC, s, True, True),
    "dense_raw_rows": lambda x, w, y, s: dense_margin_softmax_cross_entropy(
        x, w, y, None, 1.0, False, False
    ),
    "dense_scale_by_norm": lambda x, w, y, s: dense_margin_softmax_cross_entropy(
        x, w, y, ARC, 1.0, True, True, scale_by_norm=True
    ),
    "chunked": lambda x, w, y, s: fused_margin_softmax_cross_entropy(x, w, y, ARC, s, chunk_size=2),
    "chunked_raw_rows": lambda x, w, y, s: fused_margin_softmax_cross_entropy(
        x, w, y, None, normalize_embeddings=False, normalize_weight=False, chunk_size=2
    ),
    "materialized": lambda x, w, y, s: fused_margin_softmax_cross_entropy(
        x, w, y, ARC, s, materialize=True, normalize_embeddings=False
    ),
    # (the logits are the caller's: inference labels and scales)
    "plain": lambda x, w, y, s: margin_softmax_cross_entropy(x.clone() @ w, y, ARC, s),
}


@pytest.mark.parametrize("name", CALLS)
def test_inference_inputs_give_the_same_values_and_gradients(name) -> None:
    want, want_grad = _run(CALLS[name], inference=False)
    got, grad = _run(CALLS[name], inference=True)
    assert torch.equal(got, want)
    assert torch.equal(grad, want_grad)


def test_circle_functions_take_inference_masks_and_indices() -> None:
    """``torch.where`` saves its condition and an index op its index: the masks, keys and
    anchors of the Circle functions are copied where made in inference mode (the dense
    form under ``autograd_only`` falls back to the masked one)."""
    import pml_margins
    from pml_margins.functional import (
        circle_loss_dense,
        circle_loss_dense_negatives,
        circle_loss_masked,
        circle_loss_pairs,
    )

    torch.manual_seed(0)
    sim_leaf = torch.rand(6, 6, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pos = labels.unsqueeze(1) == labels.unsqueeze(0)
    pos.fill_diagonal_(False)
    neg = labels.unsqueeze(1) != labels.unsqueeze(0)
    keys = torch.nonzero(pos.flatten()).flatten()
    anchors = torch.nonzero(pos)[:, 0]
    neg_anchors = torch.nonzero(neg)[:, 0]

    def calls(p, n, k, a, na):
        sim = sim_leaf.clone().requires_grad_(True)
        yield sim, lambda: circle_loss_dense(sim, p, n, 0.25, 32.0)
        with pml_margins.autograd_only():
            yield sim, lambda: circle_loss_dense(sim, p, n, 0.25, 32.0)
        yield sim, lambda: circle_loss_dense_negatives(sim, n, k, 0.25, 32.0)
        yield sim, lambda: circle_loss_masked(sim, p, n, 0.25, 32.0, per_anchor=False)
        s_p, s_n = sim[pos], sim[neg]
        yield sim, lambda: circle_loss_pairs(s_p, a, s_n, na, 6, 0.25, 32.0)

    def results(*inputs):
        out = []
        for sim, call in calls(*inputs):
            value = call().sum()
            (grad,) = torch.autograd.grad(value, sim)
            out.append((value.detach(), grad))
        return out

    normal = (pos, neg, keys, anchors, neg_anchors)
    for (want, want_grad), (got, grad) in zip(
        results(*normal), results(*_made_in_inference(*normal)), strict=True
    ):
        assert torch.equal(got, want) and torch.equal(grad, want_grad)


def _made_in_inference(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return tuple(t.clone() for t in tensors)


def test_center_distances_take_inference_labels() -> None:
    """From a review: the centres' gather saved the labels' index (the loss copied them;
    the public function did not)."""
    from pml_margins.functional import center_distances

    torch.manual_seed(0)
    x, y = torch.randn(9, 5), torch.arange(9) % 6
    centers = torch.randn(6, 5, requires_grad=True)
    (want,) = torch.autograd.grad(center_distances(x, centers, y).sum(), centers)
    x_inf, y_inf = _made_in_inference(x, y)
    (got,) = torch.autograd.grad(center_distances(x_inf, centers, y_inf).sum(), centers)
    assert torch.equal(got, want)
