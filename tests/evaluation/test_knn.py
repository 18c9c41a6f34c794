"""The exact k-nn against a float64 brute force (numpy, direct formula)."""

import numpy as np
import pytest
import torch
from conftest import brute_force_neighbours, make_data

from pml_margins.evaluation import exact_knn, float32_error_bound
from pml_margins.evaluation import knn as knn_module


def _check(q, r, k, exclude_self=False, metric="euclidean", **kw):
    values, indices = exact_knn(q, r, k, metric=metric, exclude_self=exclude_self, **kw)
    ref_metric = "dot" if metric == "dot" else "euclidean"
    expected = brute_force_neighbours(q, r, exclude_self, ref_metric)[:, :k]
    np.testing.assert_array_equal(indices.numpy(), expected)
    q64, r64 = np.asarray(q, np.float64), np.asarray(r, np.float64)
    picked = r64[expected]
    if metric == "dot":
        want = (picked * q64[:, None]).sum(-1)
    else:
        want = ((picked - q64[:, None]) ** 2).sum(-1)
        want = np.sqrt(want) if metric == "euclidean" else want
    np.testing.assert_allclose(values.double().numpy(), want, rtol=1e-6, atol=1e-6)
    return values, indices


@pytest.mark.parametrize("offset", [0.0, 100.0, 1e3, 1e4, 1e6])
@pytest.mark.parametrize("same", [True, False])
def test_off_centre_data_equal_brute_force(offset, same):
    # issue 16.1: 1000 + N(0, 1) had 253 of 400 nearest neighbours wrong
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 32, generator=g) + offset
    if same:
        _check(x, x, 5, exclude_self=True, block_rows=64)
    else:
        _check(x[:150], x[150:], 5, block_rows=64)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "dot"])
@pytest.mark.parametrize("block_rows", [None, 3, 7, 64])
def test_duplicates_tie_exactly_and_go_to_the_lower_index(metric, block_rows):
    # issue 16.2: copies of one point got 1.2657978 and 1.2657980
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 13, generator=g).repeat(10, 1) + 50.0  # odd width, off-centre
    values, indices = _check(x, x, 15, True, metric, block_rows=block_rows)
    for row in range(len(x)):  # the 9 other copies: equal values, ascending indices
        copies = indices[row, :9] if metric != "dot" else None
        if copies is not None:
            assert torch.equal(copies, torch.tensor([i for i in range(row % 5, 50, 5) if i != row]))
            assert (values[row, :9] == 0).all()
        assert len(torch.unique(values[row, :9])) == 1


def test_results_do_not_depend_on_block_size_or_threads():
    x, _ = make_data("clustered", 600, 16, 20, seed=2)
    x = torch.cat([x, x[:100]]) + 1000.0  # duplicates straddling blocks
    runs = [
        exact_knn(x, x, 12, exclude_self=True, block_rows=b, num_threads=t)
        for b in (None, 7, 64, 333)
        for t in (1, 2)
    ]
    for values, indices in runs[1:]:
        assert torch.equal(indices, runs[0][1]) and torch.equal(values, runs[0][0])
    _check(x, x, 12, exclude_self=True, block_rows=64)
    assert torch.get_num_threads() >= 1


def test_large_duplicate_groups_use_the_retry_path(monkeypatch):
    # 40 copies per point: far more than the first pass's margin around k = 3
    calls = []
    original = knn_module._candidate_pass

    def spy(a, *args):
        calls.append((len(a), args[2]))
        return original(a, *args)

    monkeypatch.setattr(knn_module, "_candidate_pass", spy)
    x = torch.randn(3, 6).repeat(40, 1)
    _check(x, x, 3, exclude_self=True, block_rows=16)
    assert len(calls) > 1 and calls[1][1] > calls[0][1]


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_error_bound_holds(metric, offset):
    """float32 candidate costs lie within the bound of the exact ones (float64, from
    the unrounded centred and scaled data; Euclidean as |a - b|^2 / 2)."""
    g = torch.Generator().manual_seed(3)
    q64 = torch.randn(64, 200, generator=g, dtype=torch.float64) * 3 + offset
    r64 = torch.randn(300, 200, generator=g, dtype=torch.float64) * 3 + offset
    a, b = knn_module._float32_operands(q64, r64, metric, False, False)
    centre = r64.mean(0) if metric != "dot" else torch.zeros(200, dtype=torch.float64)
    qc, rc = q64 - centre, r64 - centre
    scale = 2.0 ** -np.frexp(max(float(qc.abs().max()), float(rc.abs().max())))[1]
    qc, rc = qc * scale, rc * scale
    products = a @ b.T  # float32, as the candidate pass
    if metric == "dot":
        approx, exact = -products.double(), -(qc @ rc.T)
    else:
        half = ((b.double() ** 2).sum(1) / 2).float()
        approx = (half - products).double() + (a.double() ** 2).sum(1)[:, None] / 2
        exact = ((qc[:, None] - rc[None]) ** 2).sum(-1) / 2
    bound = float32_error_bound(
        a.double().norm(dim=1), float(b.double().norm(dim=1).max()), 200, metric
    )
    err = (approx - exact).abs().max(dim=1).values
    assert (err <= bound).all()
    assert (err > bound / 1e4).all()  # and the bound is not vacuous


def test_huge_values_and_integers_and_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(80, 8, generator=g) * 1e18  # squares overflow float32
    _check(x, x, 4, exclude_self=True)
    xi = torch.randint(-3, 4, (70, 5), generator=g)  # PML's tests use integer embeddings
    values, _ = _check(xi, xi, 6, exclude_self=True)
    assert values.dtype == torch.float32
    xd = torch.randn(90, 6, generator=g, dtype=torch.float64) + 1e8
    values, _ = _check(xd, xd, 3, exclude_self=True)
    assert values.dtype == torch.float64


def test_numpy_input_and_cosine():
    rng = np.random.default_rng(5)
    q, r = rng.standard_normal((30, 7)).astype(np.float32), rng.standard_normal((50, 7))
    _check(q, r, 4, metric="dot")
    values, indices = exact_knn(q, r, 4, metric="dot", normalize=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    np.testing.assert_array_equal(
        indices.numpy(), brute_force_neighbours(qn, rn, False, "dot")[:, :4]
    )
    np.testing.assert_allclose(
        values.numpy(), np.sort(qn @ rn.T, axis=1)[:, ::-1][:, :4], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("query", "error", "match"),
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), ValueError, "NaN or Inf"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), ValueError, "NaN or Inf"),
        (torch.ones(2, 2, dtype=torch.bool), TypeError, "floating or integer"),
        ([[0.0, 1.0]], TypeError, "torch.Tensor or numpy.ndarray"),
        (torch.ones(3), ValueError, "2-D"),
        (torch.ones(0, 2), ValueError, "empty"),
    ],
)
def test_bad_input(query, error, match):
    # issue 16.7: a NaN row returned indices -1, an Inf row 0, 1, 2
    with pytest.raises(error, match=match):
        exact_knn(query, torch.ones(4, 2), 1)


def test_bad_arguments():
    x = torch.randn(5, 3)
    for k in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match="k must"):
            exact_knn(x, x, k)
    with pytest.raises(ValueError, match="k must"):
        exact_knn(x, x, 5, exclude_self=True)
    with pytest.raises(ValueError, match="width"):
        exact_knn(x, torch.randn(5, 4), 1)
    with pytest.raises(ValueError, match="metric"):
        exact_knn(x, x, 1, metric="cosine")
    with pytest.raises(ValueError, match="block_rows"):
        exact_knn(x, x, 1, block_rows=0)
    with pytest.raises(ValueError, match="num_threads"):
        exact_knn(x, x, 1, num_threads=0)
    assert exact_knn(x, x, 0)[1].shape == (5, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    x, _ = make_data("clustered", 3000, 32, 30, seed=6)
    x = torch.cat([x, x[:500]]) + 1000.0
    cpu = exact_knn(x, x, 20, exclude_self=True)
    gpu = exact_knn(x.cuda(), x.cuda(), 20, exclude_self=True)
    assert torch.equal(gpu[1].cpu(), cpu[1])
    assert torch.equal(gpu[0].cpu(), cpu[0])
