"""Value checks: at most one host read-back per forward, and a switch that turns them off."""

from __future__ import annotations

import contextlib
import math
import threading

import pytest
import torch
from pytorch_metric_learning.miners import MultiSimilarityMiner

import pml_margins
from pml_margins import validation
from pml_margins.losses import ArcFaceLoss, CenterLoss, CircleLoss, SoftmaxLoss
from pml_margins.validation import (
    ValueChecks,
    check_embeddings,
    value_checks,
    value_checks_enabled,
)

#: every way a tensor's value reaches Python
READ_BACKS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_read_backs():
    """Count the tensor-to-Python conversions made inside the block."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return counted

    for name in READ_BACKS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    y = torch.randint(0, 4, (16,))
    return x, y, MultiSimilarityMiner(0.1)(x, y)


LOSSES = {
    "arcface": lambda: ArcFaceLoss(4, 8),
    "softmax": lambda: SoftmaxLoss(4, 8),
    "center": lambda: CenterLoss(4, 8),
    "circle": lambda: CircleLoss(),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("with_miner", [False, True], ids=["labels", "miner"])
def test_checks_read_back_once(name, with_miner, monkeypatch) -> None:
    """Values numpy cannot read on the host (a device's; here, numpy switched off) are
    gathered and read back in one conversion."""
    monkeypatch.setattr(validation, "_host_array", lambda values: None)
    monkeypatch.setattr(validation, "usual_cpu_batch_passes", lambda *args: False)
    loss = LOSSES[name]()
    x, y, tuples = _inputs()
    tuples = tuples if with_miner else None
    with count_read_backs() as calls:
        loss.check_inputs(x, y, tuples, None, None)
    assert calls == ["tolist"]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("with_miner", [False, True], ids=["labels", "miner"])
def test_cpu_checks_read_through_numpy(name, with_miner) -> None:
    """CPU tensors numpy can read are checked through numpy: no tensor read-back at all;
    bfloat16 embeddings (which numpy lacks) take the one gathered read-back."""
    loss = LOSSES[name]()
    x, y, tuples = _inputs()
    tuples = tuples if with_miner else None
    with count_read_backs() as calls:
        loss.check_inputs(x, y, tuples, None, None)
    assert calls == []
    with count_read_backs() as calls:
        loss.check_inputs(x.bfloat16(), y, tuples, None, None)
    assert calls == ["tolist"]
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss.check_inputs(torch.full_like(x, float("nan")).bfloat16(), y, tuples, None, None)


@pytest.mark.parametrize("name", LOSSES)
def test_switched_off_checks_read_nothing(name) -> None:
    loss = LOSSES[name]()
    x, y, tuples = _inputs()
    with value_checks(False), count_read_backs() as calls:
        loss.check_inputs(x, y, tuples, None, None)
    assert calls == []


def test_switched_off_checks_keep_shape_and_dtype_checks() -> None:
    loss = ArcFaceLoss(4, 8)
    with value_checks(False):
        loss(torch.full((3, 8), float("nan")), torch.tensor([0, 1, 2]))  # not checked: no error
        with pytest.raises(ValueError, match="width"):
            loss(torch.randn(3, 5), torch.tensor([0, 1, 2]))
        with pytest.raises(TypeError, match="integer dtype"):
            loss(torch.randn(3, 8), torch.tensor([0.0, 1.0, 2.0]))
        with pytest.raises(ValueError, match="empty"):
            loss(torch.randn(0, 8), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss(torch.full((3, 8), float("nan")), torch.tensor([0, 1, 2]))


def test_switch_is_a_context_manager_a_function_and_per_thread() -> None:
    assert value_checks_enabled()
    with value_checks(False):
        assert not value_checks_enabled()
        with value_checks(True):
            assert value_checks_enabled()
        assert not value_checks_enabled()
    assert value_checks_enabled()
    seen = []
    pml_margins.value_checks(False)
    try:
        thread = threading.Thread(target=lambda: seen.append(value_checks_enabled()))
        thread.start()
        thread.join()
        assert not value_checks_enabled() and seen == [True]
    finally:
        pml_margins.value_checks(True)
    with pytest.raises(TypeError, match="bool"):
        value_checks("no")


@pytest.mark.parametrize(
    ("embeddings", "labels", "message"),
    [
        (torch.full((2, 8), float("inf")), torch.tensor([0, 1]), "NaN or Inf"),
        (torch.randn(2, 8), torch.tensor([0, 4]), r"must lie in \[0, 4\).*\[0, 4\]"),
        (torch.randn(2, 8), torch.tensor([-1, 0]), r"got values in \[-1, 0\]"),
    ],
)
def test_each_value_error_still_names_the_problem(embeddings, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        ArcFaceLoss(4, 8)(embeddings, labels)


def test_miner_indices_out_of_range_are_found_in_the_same_read_back() -> None:
    x, y, _ = _inputs()
    bad = (torch.tensor([0, 1]), torch.tensor([2, 16]), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"indices_tuple\[p\] has indices in \[2, 16\]"):
        ArcFaceLoss(4, 8)(x, y, bad)


@pytest.mark.parametrize("on_host", [True, False], ids=["numpy", "gathered"])
def test_finite_values_whose_sum_overflows_are_accepted(on_host, monkeypatch) -> None:
    if not on_host:
        monkeypatch.setattr(validation, "_host_array", lambda values: None)
    x = torch.full((4, 8), 6e4, dtype=torch.float16)  # the float16 sum would overflow
    checks = ValueChecks()
    check_embeddings(x, checks=checks)
    checks.run()
    big = torch.full((4, 8), 1.5e19 / math.sqrt(8))  # rows of norm 1.5e19: their squares
    check_embeddings(big)  # fit float32, the sum of all of them does not
    with pytest.raises(ValueError, match=r"row 0 has norm 8\.485e\+38: its square overflows"):
        check_embeddings(torch.full((4, 8), 3e38))  # finite, but no norm of it is
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_embeddings(torch.cat([big, torch.tensor([[float("-inf")] * 8])]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_synchronizes_once() -> None:
    loss = ArcFaceLoss(4, 8).cuda()
    x, y, _ = _inputs()
    x, y, tuples = x.cuda(), y.cuda(), None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            loss.check_inputs(x, y, tuples, None, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(record) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_one_non_finite_element_is_found_on_the_host(dtype, bad, layout) -> None:
    """One bad element anywhere (BLAS dot for float32/64, a numpy sum for float16)."""
    x = torch.randn(37, 9, dtype=dtype)
    if layout == "transposed":
        x = torch.randn(9, 37, dtype=dtype).t()
    for row, col in [(0, 0), (36, 8), (17, 3)]:
        y = x.clone()
        y[row, col] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            check_embeddings(y)
    check_embeddings(x)


@pytest.mark.parametrize("size", [3, 512, 513, 2000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64], ids=str)
def test_label_range_on_the_host_short_and_long(size, dtype) -> None:
    """Short label arrays go through Python's min/max, long ones through numpy: same rule."""
    torch.manual_seed(0)
    x = torch.randn(size, 8)
    loss = ArcFaceLoss(200, 8)
    labels = torch.randint(0, 200, (size,)).to(dtype)
    loss(x, labels)
    too_big = labels.clone()
    too_big[size // 2] = 200
    with pytest.raises(ValueError, match=r"must lie in \[0, 200\).*\[\d+, 200\]"):
        loss(x, too_big)
    if dtype != torch.uint8:
        negative = labels.clone()
        negative[-1] = -3
        with pytest.raises(ValueError, match=r"got values in \[-3, \d+\]"):
            loss(x, negative)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("make", [lambda: ArcFaceLoss(5, 8), lambda: CircleLoss()])
def test_finite_rows_whose_squared_norm_overflows_are_refused(dtype, make):
    """A float32 row of norm 2e19 normalizes to zeros (a wrong value) or NaN."""
    big = 2e19 if dtype != torch.float64 else 2e154
    x = torch.randn(6, 8, dtype=torch.float64)
    x[3] = big / math.sqrt(8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = make().to(dtype) if dtype == torch.float64 else make()
    with pytest.raises(ValueError, match=r"embeddings row 3 has norm .*: its square overflows"):
        loss_fn(x.to(dtype), labels)
    x[3] = big / 4 / math.sqrt(8)  # its square fits: accepted, finite
    assert torch.isfinite(loss_fn(x.to(dtype), labels))


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=["fast", "full"])
def test_a_row_within_rounding_of_the_norm_limit_is_refused(label_dtype):
    """A float32 row of norm sqrt(max) (1 - 3e-7), D = 1000: the check's sum of squares
    stayed finite while the loss's rounded up to inf, and normalization made it the zero
    row (loss 31.55 for 31.83, no gradient; found by review). Refused now, on the fast path
    (int64 labels) and the full one; a row 1e-3 below the limit keeps its loss."""
    torch.manual_seed(0)
    limit = math.sqrt(torch.finfo(torch.float32).max)
    loss_fn = ArcFaceLoss(4, 1000)
    labels = torch.tensor([0, 1, 2, 3], dtype=label_dtype)
    rest = torch.randn(3, 1000)
    x = torch.cat([torch.full((1, 1000), limit * (1 - 3e-7) / math.sqrt(1000)), rest])
    with pytest.raises(ValueError, match=r"embeddings row 0 has norm .*: its square overflows"):
        loss_fn(x, labels)
    x = torch.cat([torch.full((1, 1000), limit * (1 - 1e-3) / math.sqrt(1000)), rest])
    same_direction = x.clone()
    same_direction[0] *= 2.0**-64
    torch.testing.assert_close(loss_fn(x, labels), loss_fn(same_direction, labels))


def test_the_norm_limit_follows_the_compute_dtype():
    """float32 embeddings with a float64 W are computed in float64: a norm of 2e19 fits."""
    x = torch.randn(4, 8, dtype=torch.float64)
    x[1] = 2e19 / math.sqrt(8)
    loss_fn = ArcFaceLoss(5, 8).double()
    assert torch.isfinite(loss_fn(x.float(), torch.tensor([0, 1, 2, 3])))
    assert torch.isfinite(loss_fn.get_logits(x.float())).all()  # get_logits: the same rule
    with pytest.raises(ValueError, match=r"its square overflows torch\.float32"):
        ArcFaceLoss(5, 8).get_logits(x.float())


def _full_checks_pass(embeddings, labels, num_classes, width) -> bool:
    checks = ValueChecks()
    try:
        check_embeddings(embeddings, width=width, checks=checks)
        validation.check_class_labels(labels, embeddings.shape[0], num_classes, checks=checks)
        checks.run()
    except (TypeError, ValueError):
        return False
    return True


def _usual_batches():
    """(name, embeddings, labels) around every edge of the full checks."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    yield "fine", x, y
    yield "fine float64", x.double(), y
    yield "last class", x, torch.tensor([0, 1, 2, 2, 1, 4])
    yield "non-contiguous", torch.randn(4, 6, generator=gen).t(), y
    yield "label -1", x, torch.tensor([0, 1, 2, 2, 1, -1])
    yield "label C", x, torch.tensor([0, 1, 2, 2, 1, 5])
    for bad in (math.nan, math.inf, -math.inf):
        z = x.clone()
        z[3, 2] = bad
        yield f"element {bad}", z, y
    yield "squares overflow float32", x * 1e19, y
    yield "squares overflow float64", x.double() * 1e154, y
    yield "wide finite float64", x.double() * 1e150, y
    yield "float16", x.half(), y
    yield "bfloat16", x.bfloat16(), y
    yield "int32 labels", x, y.int()
    yield "wrong width", torch.randn(6, 3, generator=gen), y
    yield "short labels", x, y[:5]
    yield "2-D labels", x, y[:, None]
    yield "empty", x[:0], y[:0]
    yield "a Parameter", torch.nn.Parameter(x), y
    yield "strided labels", x, torch.tensor([0, 9, 1, 9, 2, 9, 2, 9, 1, 9, 0, 9])[::2]
    yield "sparse embeddings", x.to_sparse(), y
    yield "sparse labels", x, y.to_sparse()
    yield "nested rows", torch.nested.nested_tensor(list(x)), y


@pytest.mark.parametrize(("name", "embeddings", "labels"), list(_usual_batches()))
def test_the_usual_batch_shortcut_only_accepts_what_the_full_checks_accept(
    name, embeddings, labels
) -> None:
    """``usual_cpu_batch_passes`` (a loss's forward on the common CPU batch) may say yes
    only where every full check passes; it says yes for the ordinary batch. With the value
    checks off: only where the shape and dtype checks pass (what the full checks then
    run), and yes for the ordinary layout whatever its values."""
    fast = validation.usual_cpu_batch_passes(embeddings, labels, 5, 4)
    full = _full_checks_pass(embeddings, labels, 5, 4)
    assert not fast or full, name
    usual = ("fine", "fine float64", "last class", "non-contiguous", "wide finite float64")
    if name in (*usual, "strided labels"):
        assert fast and full, name
    with value_checks(False):
        fast = validation.usual_cpu_batch_passes(embeddings, labels, 5, 4)
        full = _full_checks_pass(embeddings, labels, 5, 4)
    assert not fast or full, name
    bad_values = ("label -1", "label C", "squares overflow float32", "squares overflow float64")
    if name in (*usual, "strided labels", *bad_values) or name.startswith("element"):
        assert fast and full, name


def test_the_usual_batch_shortcut_leaves_transforms_to_the_full_checks() -> None:
    x, y = torch.randn(3, 6, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    seen = torch.func.vmap(lambda e: torch.tensor(validation.usual_cpu_batch_passes(e, y, 5, 4)))
    assert not seen(x).any()
    bad = x.clone()
    bad[1, 2, 3] = math.nan
    loss = ArcFaceLoss(5, 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.func.vmap(lambda e: loss(e, y))(bad)


def test_partial_fc_reads_no_labels_beyond_the_checks(monkeypatch) -> None:
    """sample_classes read the label range itself on every forward, checks on or off
    (found by review): now a loss's checked labels are not read again, and the switch
    turns the public function's read off."""
    from pml_margins.functional import sample_classes

    monkeypatch.setattr(validation, "_host_array", lambda values: None)  # the device path
    monkeypatch.setattr(validation, "usual_cpu_batch_passes", lambda *args: False)
    loss = ArcFaceLoss(6, 8, sample_rate=0.5)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 5])
    with count_read_backs() as calls:
        loss(x, y)
    assert calls == ["tolist"]  # the loss's one combined read
    with value_checks(False), count_read_backs() as calls:
        loss(x, y)
        sample_classes(y, 6, 0.5)
    assert calls == []
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\), got values in \[0, 6\]"):
        sample_classes(torch.tensor([0, 6]), 6, 0.5)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("label", [-1, -3])
def test_unchecked_partial_fc_never_trains_a_negative_label_toward_a_kept_class(
    chunk_size, label
) -> None:
    """With checks off, single-process Partial FC remapped a negative label to the first
    kept class (``searchsorted``: 0) and trained its row toward it with a finite loss;
    it now fails as the full loss does (an index error on the CPU)."""
    from pml_margins.functional import sample_classes

    y = torch.tensor([3, 5, label, 7])
    with value_checks(False):
        index, local = sample_classes(y, 100, 0.1)
        assert local[2] == len(index)  # past the kept columns
        assert torch.equal(index[local[[0, 1, 3]]], y[[0, 1, 3]])
        loss = ArcFaceLoss(100, 16, sample_rate=0.1, chunk_size=chunk_size)
        with pytest.raises((IndexError, RuntimeError), match="out of"):
            loss(torch.randn(4, 16), y)
        full = ArcFaceLoss(100, 16, chunk_size=chunk_size)
        with pytest.raises((IndexError, RuntimeError), match="out of"):
            full(torch.randn(4, 16), y)
