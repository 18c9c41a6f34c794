"""Defects found by this session's review, each test failing on the code before its fix."""

from __future__ import annotations

import warnings

import pytest
import torch

from pml_margins.losses import ArcFaceLoss


def test_partial_fc_with_strided_labels_warns_nothing() -> None:
    """Labels that are a strided slice reached torch.searchsorted non-contiguous: torch's
    'input value tensor is non-contiguous' performance warning, from inside the loss."""
    labels = (torch.arange(16) % 10)[::2]
    torch.manual_seed(0)
    loss_fn = ArcFaceLoss(10, 16, sample_rate=0.5)
    x = torch.randn(8, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = loss_fn(x, labels)
    torch.manual_seed(0)
    expected = ArcFaceLoss(10, 16, sample_rate=0.5)(x, labels.contiguous())
    assert torch.equal(loss, expected)


def test_an_assigned_statistic_is_a_copy_of_the_tensor_given() -> None:
    """loss.scale = s held s itself: AdaCos's step wrote its new scale into the user's
    tensor, and two CurricularFace losses given one tensor as t moved each other's."""
    from pml_margins.losses import AdaCosLoss, CenterLoss, CurricularFaceLoss

    x, y = torch.randn(8, 8), torch.arange(8) % 5
    given = torch.tensor(10.0)
    adacos = AdaCosLoss(5, 8)
    adacos.scale = given
    adacos(x, y)
    assert float(given) == 10.0 and float(adacos.scale) != 10.0

    shared = torch.tensor([0.2])  # a one-element tensor takes the buffer's shape (a view)
    first, second = CurricularFaceLoss(5, 8), CurricularFaceLoss(5, 8)
    first.t, second.t = shared, shared
    second(x, y)
    assert float(shared) == float(first.t) == pytest.approx(0.2) and float(second.t) != 0.2

    centres = torch.zeros(5, 8)
    center = CenterLoss(5, 8, update="ema")  # the centres: a buffer the step moves
    center.centers = centres
    center(x + 3.0, y)
    assert torch.equal(centres, torch.zeros(5, 8)) and not torch.equal(center.centers, centres)


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple]:
    """Record the calls of ``torch.Tensor.<name>`` (arguments and keywords)."""
    calls: list[tuple] = []
    original = getattr(torch.Tensor, name)

    def counted(self, *args, **kwargs):
        calls.append((self.device, args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_partial_fc_of_the_public_function_reads_the_label_range_once(monkeypatch) -> None:
    """fused_margin_softmax_cross_entropy(sample_rate < 1) read the labels' range twice:
    with its input checks, then again in sample_classes (a third host sync per call on a
    GPU, where the README promises the checks' one and Partial FC's draw size)."""
    from functools import partial

    from pml_margins.functional import arcface_target, fused_margin_softmax_cross_entropy

    x, w, y = torch.randn(12, 8), torch.randn(8, 10), torch.randint(0, 10, (12,))
    target = partial(arcface_target, margin=0.5)
    calls = _counting(monkeypatch, "tolist")
    draw = torch.Generator().manual_seed(0)
    got = fused_margin_softmax_cross_entropy(x, w, y, target, 64.0, sample_rate=0.5, generator=draw)
    assert not calls  # (on CPU the checks read through numpy: sample_classes read again)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        fused_margin_softmax_cross_entropy(x, w, y + 5, target, 64.0, sample_rate=0.5)
    draw = torch.Generator().manual_seed(0)
    want = fused_margin_softmax_cross_entropy(
        x, w, y, target, 64.0, sample_rate=0.5, generator=draw
    )
    assert torch.equal(got, want)


def test_the_checks_read_values_back_with_a_blocking_copy(monkeypatch) -> None:
    """ValueChecks.run copied every queued value to the first one's device with
    non_blocking=True and read it at once: a device-to-host copy (CPU bf16 embeddings,
    labels on a GPU) could be read before it landed."""
    from pml_margins.validation import ValueChecks

    checks = ValueChecks()
    checks.add(lambda: torch.tensor([1.0, 2.0]), lambda: ValueError("first"), lambda r: False)
    checks.add(lambda: torch.tensor([3]), lambda: ValueError("second"), lambda r: r != [3.0])
    calls = _counting(monkeypatch, "to")
    checks.run()
    assert calls and all(not kwargs.get("non_blocking") for _, _, kwargs in calls)
    checks.add(lambda: torch.tensor([4]), lambda: ValueError("wrong value"), lambda r: r != [3.0])
    with pytest.raises(ValueError, match="wrong value"):
        checks.run()


def test_the_center_update_counts_classes_without_bincount() -> None:
    """center_ema_update counted each class's rows with torch.bincount, which reads the
    labels' maximum back to size its result (a host sync per step on a GPU; vmap warned
    that it has no batching rule). The counts are now an index_add of ones: the same
    centres bit for bit as the paper's update computed here."""
    from torch.profiler import ProfilerActivity, profile

    from pml_margins.functional import center_ema_update

    g = torch.Generator().manual_seed(0)
    c, x = torch.randn(4, 3, generator=g), torch.randn(9, 3, generator=g)
    y = torch.tensor([0, 0, 2, 2, 2, 1, 0, 2, 1])
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        new = center_ema_update(c, x, y, 0.5)
    assert "aten::bincount" not in {event.name for event in trace.events()}
    expected = c.clone()
    for j in range(4):
        rows = y == j
        expected[j] = c[j] - 0.5 * (c[j] - x[rows]).sum(0) / (1 + int(rows.sum()))
    torch.testing.assert_close(new, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(new[3], c[3])  # absent class unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.func.vmap(center_ema_update, in_dims=(None, 0, 0, None))(
            c, x.expand(2, 9, 3), y.expand(2, 9), 0.5
        )


def test_partial_fc_of_the_public_function_under_compile_names_bad_labels() -> None:
    """Under torch.compile the function's own checks read nothing; sample_classes' read of
    the label range, skipped by the fix above, was then the only check left: labels out of
    range gave a raw IndexError (a device-side assert on a GPU)."""
    from functools import partial

    from pml_margins.functional import arcface_target, fused_margin_softmax_cross_entropy

    target = partial(arcface_target, margin=0.5)

    def step(x, w, y):
        return fused_margin_softmax_cross_entropy(x, w, y, target, 64.0, sample_rate=0.5)

    compiled = torch.compile(step, backend="eager")
    x, w, y = torch.randn(12, 8), torch.randn(8, 10), torch.randint(0, 10, (12,))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        compiled(x, w, y + 5)
