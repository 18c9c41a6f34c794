"""Two forwards and one backward (two augmented views, micro-batches summed): each step's
gradient is the one it had on its own, whatever state the loss updated in between."""

from __future__ import annotations

import copy

import pytest
import torch

from pml_margins.losses import CenterLoss, CircleLoss
from tests.losses.specs import SPEC_IDS, SPECS, LossSpec

MODES = {"default": {}, "chunk": {"chunk_size": 3}, "partial_fc": {"sample_rate": 0.5}}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    x2 = 3 * torch.randn(12, 8, generator=gen, dtype=torch.float64) + 0.5
    y1 = torch.randint(0, 10, (12,), generator=gen)
    y2 = torch.randint(0, 10, (12,), generator=gen)
    return (x1, y1), (x2, y2)


def _summed_and_sequential(loss: torch.nn.Module):
    """Gradients of ``loss(view 1) + loss(view 2)`` with one backward, and of the same two
    steps, each backward right after its forward, from the same starting state."""
    views = _inputs()
    other = copy.deepcopy(loss)
    results = []
    for module, together in ((loss, True), (other, False)):
        torch.manual_seed(7)  # ElasticFace's margins, Partial FC's sample
        leaves = [x.clone().requires_grad_(True) for x, _ in views]
        total = 0.0
        for leaf, (_, labels) in zip(leaves, views, strict=True):
            value = module(leaf, labels)
            if together:
                total = total + value
            else:
                value.backward()
        if together:
            total.backward()
        grads = [leaf.grad for leaf in leaves]
        grads += [p.grad for p in module.parameters()]
        results.append((grads, module.state_dict()))
    return results


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_class_weight_losses(spec: LossSpec, mode: str) -> None:
    torch.manual_seed(0)
    loss = spec.build(10, 8, **MODES[mode]).double().train()
    (summed, state), (sequential, state_seq) = _summed_and_sequential(loss)
    for a, b in zip(summed, sequential, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name in state:
        torch.testing.assert_close(state[name], state_seq[name], rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: CenterLoss(10, 8), lambda: CircleLoss()])
def test_center_and_circle(make) -> None:
    (summed, _), (sequential, _) = _summed_and_sequential(make().double().train())
    for a, b in zip(summed, sequential, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
