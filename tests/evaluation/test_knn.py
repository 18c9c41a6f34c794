import numpy as np
import pytest
import torch
from conftest import brute_force_neighbours, make_data

from pml_margins.evaluation import auto_block_rows, exact_knn, topk_lowest_index_ties


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("block_rows", [None, 1, 7])
def test_matches_brute_force(metric, exclude_self, block_rows):
    x, _ = make_data("random", 60, 8, 3, seed=1)
    q = x[:40] if not exclude_self else x
    k = 15
    _, idx = exact_knn(q, x, k, metric=metric, exclude_self=exclude_self, block_rows=block_rows)
    expected = brute_force_neighbours(q.numpy(), x.numpy(), exclude_self, metric)[:, :k]
    np.testing.assert_array_equal(idx.numpy(), expected)


def test_returns_distances_and_similarities():
    x, _ = make_data("random", 30, 5, 3, seed=2)
    d, idx = exact_knn(x, x, 4, exclude_self=True)
    expected = torch.cdist(x.double(), x.double()).gather(1, idx).float()
    torch.testing.assert_close(d, expected, atol=1e-4, rtol=1e-4)
    s, idx = exact_knn(x, x, 4, metric="dot")
    torch.testing.assert_close(s, (x @ x.T).gather(1, idx))
    assert bool((s[:, :-1] >= s[:, 1:]).all())


@pytest.mark.parametrize("block_rows", [1, 2, 100])
def test_ties_go_to_the_lower_index_whatever_the_block(block_rows):
    # integer-valued points: many exact ties in distance
    x = torch.tensor([[0.0], [2.0], [1.0], [1.0], [3.0], [1.0], [0.0]])
    _, idx = exact_knn(x, x, 4, exclude_self=True, block_rows=block_rows)
    expected = brute_force_neighbours(x.numpy(), x.numpy(), True)[:, :4]
    np.testing.assert_array_equal(idx.numpy(), expected)
    assert idx[2].tolist() == [3, 5, 0, 1]  # the two duplicates of row 2, then ties by index


def test_topk_redoes_rows_where_topk_dropped_a_lower_index_tie():
    scores = torch.tensor([[1.0] * 50 + [2.0]])
    values, cols = topk_lowest_index_ties(scores, 3)
    assert cols.tolist() == [[50, 0, 1]]
    assert values.tolist() == [[2.0, 1.0, 1.0]]


def test_all_identical_embeddings_exclude_self_by_index():
    x = torch.ones(9, 4)
    _, idx = exact_knn(x, x, 8, exclude_self=True, block_rows=4)
    for i, row in enumerate(idx.tolist()):
        assert row == [j for j in range(9) if j != i]


def test_k_zero_and_auto_block_rows():
    x = torch.randn(5, 3)
    d, idx = exact_knn(x, x, 0)
    assert d.shape == idx.shape == (5, 0)
    assert auto_block_rows(1000, 4, torch.device("cpu"), memory_budget=5000 * 10) == 10
    assert auto_block_rows(10**9, 4, torch.device("cpu"), memory_budget=1) == 1


def test_float64_stays_float64():
    x = torch.randn(10, 3, dtype=torch.float64)
    d, _ = exact_knn(x, x, 2)
    assert d.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 10}, r"k must be an integer in \[0, 9\]"),
        ({"k": -1}, "k must be an integer"),
        ({"k": 2, "metric": "cosine"}, "metric must be"),
        ({"k": 2, "block_rows": 0}, "block_rows must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=match):
        exact_knn(x, x, exclude_self=True, **kwargs)


def test_width_mismatch():
    with pytest.raises(ValueError, match="equal widths"):
        exact_knn(torch.randn(3, 2), torch.randn(3, 4), 1)


def test_bad_memory_budget():
    with pytest.raises(ValueError, match="memory_budget must be > 0"):
        auto_block_rows(10, 4, torch.device("cpu"), memory_budget=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, _ = make_data("random", 500, 32, 10, seed=3)
    d_cpu, i_cpu = exact_knn(x, x, 20, exclude_self=True)
    d_gpu, i_gpu = exact_knn(x.cuda(), x.cuda(), 20, exclude_self=True, block_rows=64)
    assert i_gpu.is_cuda
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, atol=1e-3, rtol=1e-3)
    assert (i_gpu.cpu() == i_cpu).float().mean() > 0.99  # float rounding may swap near-ties
