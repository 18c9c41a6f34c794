"""Whole ranked lists (PML's k=None) from one float64 product: the element-wise engine's
result bit for bit, ties by index, whatever the chunking or the width of the runs."""

from __future__ import annotations

import itertools

import pytest
import torch

from pml_margins.evaluation import exact_knn
from pml_margins.evaluation import knn as engine
from pml_margins.evaluation import whole_lists as wl

METRICS = ["euclidean", "sqeuclidean", "dot"]


def _elementwise(query, reference, k, metric, normalize, exclude_self):
    """The engine without the product path: every pair re-scored element-wise."""
    with torch.no_grad():
        values, indices = engine.knn_float64(
            query, reference, k, metric, normalize, 0 if exclude_self else None
        )
    return engine.finish_values(values, metric, query.dtype), indices


def _sets():
    g = torch.Generator().manual_seed(0)
    copies = torch.randn(30, 12, generator=g)[torch.randint(0, 20, (70,), generator=g)]
    return {
        "duplicates_off_centre": (copies + 500.0, None),
        "integer_ties": (torch.arange(40)[:, None].repeat(1, 3), None),
        "small_integers": (torch.randint(-2, 3, (60, 4), generator=g), None),
        "separate_sets": (
            torch.randn(50, 8, generator=g) + 1e4,
            torch.randn(90, 8, generator=g) + 1e4,
        ),
        "bfloat16": ((3 * torch.randn(70, 10, generator=g)).bfloat16(), None),
        "float16": ((3 * torch.randn(70, 10, generator=g)).half(), None),
    }


CASES = [
    (name, metric, normalize, exclude_self)
    for name, metric, normalize, exclude_self in itertools.product(
        _sets(), METRICS, [False, True], [False, True]
    )
    if not (exclude_self and name == "separate_sets")
]


@pytest.mark.parametrize(("name", "metric", "normalize", "exclude_self"), CASES)
def test_whole_lists_equal_the_elementwise_engine_bit_for_bit(
    name, metric, normalize, exclude_self
):
    query, reference = _sets()[name]
    reference = query if reference is None else reference
    for k in (len(reference) - int(exclude_self), len(reference) - 5):
        got = wl.whole_lists(query, reference, k, metric, normalize, exclude_self)
        want = _elementwise(query, reference, k, metric, normalize, exclude_self)
        assert got[0].dtype == want[0].dtype == torch.float32
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_exact_knn_takes_the_product_path_for_long_lists_only(monkeypatch):
    calls = []
    original = wl.whole_lists
    monkeypatch.setattr(wl, "whole_lists", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    exact_knn(x, x, 49, exclude_self=True)
    assert calls == [1]
    exact_knn(x, x, 5, exclude_self=True)  # a short list: the candidate pass
    exact_knn(x.double(), x.double(), 49, exclude_self=True)  # float64 values: element-wise
    assert calls == [1]


@pytest.mark.parametrize("metric", METRICS)
def test_wide_runs_small_chunks_and_few_pairs_per_call_change_nothing(monkeypatch, metric):
    """A bound a million times too wide makes most neighbours one run (every entry
    re-scored and re-sorted, most values uncertain): still the same lists and values."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 5, generator=g)[torch.randint(0, 25, (80,), generator=g)] * 4 + 50
    want = _elementwise(x, x, 79, metric, False, True)
    bound, exact, pairs = wl.float64_error_bound, wl._exact, []
    monkeypatch.setattr(wl, "float64_error_bound", lambda *a: bound(*a) * 1e8)
    monkeypatch.setattr(wl, "_exact", lambda *a: pairs.append(len(a[2])) or exact(*a))
    monkeypatch.setattr(wl, "CHUNK_ELEMENTS", 7 * 80)  # 7 query rows per chunk
    monkeypatch.setattr(wl, "PAIRS_PER_CALL", 13)
    got = wl.whole_lists(x, x, 79, metric, False, True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert sum(pairs) > 80 * 79 // 4  # a good share of the pairs went through the fix-ups


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5])
def test_float64_error_bound_holds(metric, offset):
    """|product-form value - element-wise value| <= E for every pair, centred as the path does."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(200, 64, generator=g) * torch.logspace(-3, 3, 200)[:, None] + offset).float()
    exact = torch.empty(200, 200, dtype=torch.float64)
    for i in range(200):  # the engine's own element-wise formula
        row = x[i : i + 1].double()
        terms = row * x.double() if metric == "dot" else (x.double() - row) ** 2
        exact[i] = terms.sum(1)
    y = x.double()
    if metric != "dot":
        y = y - y.mean(0)
        approx = (y * y).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * y @ y.T
    else:
        approx = y @ y.T
    norms = torch.linalg.vector_norm(y, dim=1)
    bound = wl.float64_error_bound(norms, float(norms.max()), 64, metric)
    error = (approx - exact).abs()
    assert (error <= bound[:, None]).all()
    assert bound.max() < 1e-9 * (norms.max() + norms.max()) ** 2  # and tight enough to use


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", METRICS)
def test_whole_lists_on_cuda_equal_cpu(metric):
    query, _ = _sets()["duplicates_off_centre"]
    cpu = wl.whole_lists(query, query, len(query) - 1, metric, False, True)
    gpu = exact_knn(query.cuda(), query.cuda(), len(query) - 1, metric=metric, exclude_self=True)
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[0].cpu(), cpu[0])
