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
