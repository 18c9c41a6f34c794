"""Dynamic AdaCos forms the cosines once: the fused core hands them to the scale update.

The new path (the update deferred to the core) against the old one (the update made in
``prepare_step`` from a product of its own, forced here through ``from_core=False``)
and against the paper's formulas in float64, on the dense function and on the blocked
one (one block and many); chunked and Partial FC steps keep the old path.
"""

from __future__ import annotations

import pytest
import torch

from pml_margins.functional import fused_margin_softmax as fused
from pml_margins.functional import fused_margin_softmax_cross_entropy
from pml_margins.losses import AdaCosLoss
from tests.losses.reference import normalized_cosine
from tests.losses.test_adacos import _paper_dynamic_scale


class _OldPath(AdaCosLoss):
    """AdaCos with the scale updated in ``prepare_step`` from its own product (before)."""

    def prepare_step(self, embeddings, labels, statistics):
        statistics.from_core = False
        return super().prepare_step(embeddings, labels, statistics)


def _blocked(monkeypatch, many: bool) -> None:
    """Force the blocked function (and, with ``many``, blocks of 100 classes at most)."""
    monkeypatch.setattr(fused, "MATERIALIZE_MAX_ELEMENTS", 0)
    monkeypatch.setattr(fused, "DENSE_MAX_ELEMENTS", 0)
    if many:
        monkeypatch.setattr(fused, "_CPU_BLOCK_ELEMENTS", 100 * 64)


def _no_product_of_its_own(monkeypatch) -> None:
    """The statistics' own cosine product (the old path's) must not be formed: the core
    hands its cosines over first. (A spy on the statistics, not on the loss's ``cosine``:
    a logits method patched on the class moves the loss to the plain path.)"""
    from pml_margins.losses.step_statistics import StepStatistics

    original = StepStatistics._cosine_blocks

    def refuse(self):
        if self._blocks is None:
            raise AssertionError("the statistics formed the cosines again")
        return original(self)

    monkeypatch.setattr(StepStatistics, "_cosine_blocks", refuse)


def _pair(num_classes: int, width: int, dtype: torch.dtype, **kwargs):
    new = AdaCosLoss(num_classes, width, **kwargs).to(dtype)
    old = _OldPath(num_classes, width, **kwargs).to(dtype)
    old.load_state_dict(new.state_dict())
    return new, old


def _step(loss, x, y):
    xr = x.clone().requires_grad_(True)
    loss.W.grad = None
    out = loss(xr, y)
    out.backward()
    return out.detach(), xr.grad, loss.W.grad.clone()


@pytest.mark.parametrize(
    ("mode", "size"),
    [("dense", (21, 8, 17)), ("one-block", (32, 16, 200)), ("many-blocks", (64, 32, 1000))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_new_path_equals_old_path(monkeypatch, mode: str, size, dtype: torch.dtype) -> None:
    """Four steps in lockstep: equal losses, gradients (x, W) and scale buffers."""
    if mode != "dense":
        _blocked(monkeypatch, many=mode == "many-blocks")
    batch, width, num_classes = size
    torch.manual_seed(0)
    new, old = _pair(num_classes, width, dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 0}
    for step in range(4):
        x = torch.randn(batch, width, dtype=dtype) + 0.3 * step
        y = torch.randint(0, num_classes, (batch,))
        want = _step(old, x, y)
        with monkeypatch.context() as m:
            _no_product_of_its_own(m)
            got = _step(new, x, y)
        torch.testing.assert_close(new.scale, old.scale, **tol)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **tol)
        old.load_state_dict(new.state_dict())  # the next step from the same scale


@pytest.mark.parametrize("mode", ["dense", "blocked"])
def test_new_path_follows_the_paper(monkeypatch, mode: str) -> None:
    """The scale against Eqs. 15-16 in float64; the loss that of the new scale."""
    if mode == "blocked":
        _blocked(monkeypatch, many=True)
    _no_product_of_its_own(monkeypatch)
    torch.manual_seed(4)
    batch, width, num_classes = 48, 16, 700
    loss = AdaCosLoss(num_classes, width).double()
    s = float(loss.scale)
    for _ in range(3):
        x = torch.randn(batch, width, dtype=torch.float64)
        y = torch.randint(0, num_classes, (batch,))
        s = _paper_dynamic_scale(x, loss.W.detach(), y, s)
        out = loss(x, y)
        assert float(loss.scale) == pytest.approx(s, rel=1e-10)
        logits = s * normalized_cosine(x, loss.W.detach())
        ref = torch.nn.functional.cross_entropy(logits, y)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_without_gradient_and_in_eval(monkeypatch) -> None:
    """A no-grad training step still updates the scale (as before); eval leaves it."""
    _blocked(monkeypatch, many=True)
    torch.manual_seed(5)
    new, old = _pair(300, 16, torch.float64)
    x, y = torch.randn(40, 16, dtype=torch.float64), torch.randint(0, 300, (40,))
    with torch.no_grad():
        torch.testing.assert_close(new(x, y), old(x, y), rtol=1e-10, atol=0)
    torch.testing.assert_close(new.scale, old.scale, rtol=1e-12, atol=0)
    start = new.scale.clone()
    new.eval()
    new(x, y)
    assert torch.equal(new.scale, start)


@pytest.mark.parametrize("kwargs", [{"chunk_size": 64}, {"sample_rate": 0.5}])
def test_chunked_and_partial_fc_keep_the_old_path(kwargs) -> None:
    """Bounded memory and Partial FC: the statistics' own product over every class."""
    torch.manual_seed(6)
    new, old = _pair(300, 16, torch.float64, **kwargs)
    x, y = torch.randn(40, 16, dtype=torch.float64), torch.randint(0, 300, (40,))
    s = _paper_dynamic_scale(x, new.W.detach(), y, float(new.scale))
    torch.manual_seed(7)
    got = _step(new, x, y)
    torch.manual_seed(7)
    want = _step(old, x, y)
    assert float(new.scale) == pytest.approx(s, rel=1e-10)
    assert torch.equal(new.scale, old.scale)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("materialize", [True, False])
def test_fused_function_with_a_scale_from_the_cosines(materialize: bool) -> None:
    """A callable scale gets the (B, C) cosines once; same result as that scale given."""
    torch.manual_seed(8)
    x, w = torch.randn(24, 12, dtype=torch.float64), torch.randn(12, 600, dtype=torch.float64)
    y = torch.randint(0, 600, (24,))
    seen = []

    def scale_fn(blocks):
        seen.append(torch.cat(blocks, 1).clone())
        return 1.0 + seen[-1].amax(1)

    out = fused_margin_softmax_cross_entropy(x, w, y, None, scale_fn, materialize=materialize)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], normalized_cosine(x, w), rtol=1e-12, atol=1e-12)
    ref = fused_margin_softmax_cross_entropy(
        x, w, y, None, 1.0 + seen[0].amax(1), materialize=materialize
    )
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [{"chunk_size": 8}, {"sample_rate": 0.5}, {"sub_centers": 2}, {"non_target_logit_fn": abs}],
)
def test_fused_function_refuses_a_scale_from_the_cosines_outside_default_mode(kwargs) -> None:
    x, w, y = torch.randn(4, 6), torch.randn(6, 20), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="scale from the cosines needs the default mode"):
        fused_margin_softmax_cross_entropy(x, w, y, None, lambda blocks: 2.0, **kwargs)


def test_plain_path_updates_before_the_step() -> None:
    """A loss sent to the plain path (its fused form withdrawn) updates in prepare_step."""
    torch.manual_seed(9)
    loss = AdaCosLoss(17, 8).double()
    loss.fused_logits = lambda embeddings: None
    x, y = torch.randn(21, 8, dtype=torch.float64), torch.randint(0, 17, (21,))
    s = _paper_dynamic_scale(x, loss.W.detach(), y, float(loss.scale))
    out = loss(x, y)
    assert float(loss.scale) == pytest.approx(s, rel=1e-10)
    ref = torch.nn.functional.cross_entropy(s * normalized_cosine(x, loss.W.detach()), y)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
