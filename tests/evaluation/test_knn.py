import numpy as np
import pytest
import torch
from conftest import brute_force_neighbours, make_data

import pml_margins.evaluation.knn as knn_module
from pml_margins.evaluation import auto_block_rows, exact_knn, topk_lowest_index_ties
from pml_margins.evaluation.knn import (
    cost_operands,
    default_memory_budget,
    gram_block,
    half_sq_norms,
)
from pml_margins.evaluation.topk import TorchRunningTopK


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


def _integer_points(n: int, dim: int, seed: int) -> torch.Tensor:
    """Small integer coordinates: many exactly equal distances and duplicate points."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, dim), generator=g).float()


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("block_rows", [None, 1, 5, 16])
def test_symmetric_half_products_match_brute_force_with_ties(
    monkeypatch, workers, metric, exclude_self, block_rows
):
    monkeypatch.setattr(knn_module, "knn_workers", lambda *_: workers)
    x = _integer_points(37, 3, seed=4)
    k = 36 if exclude_self else 37
    # an equal copy takes the symmetric path as well as the same tensor
    for reference in (x, x.clone()):
        values, idx = exact_knn(
            x, reference, k, metric=metric, exclude_self=exclude_self, block_rows=block_rows
        )
        expected = brute_force_neighbours(x.numpy(), x.numpy(), exclude_self, metric)[:, :k]
        np.testing.assert_array_equal(idx.numpy(), expected)
        x64 = x.double()
        if metric == "euclidean":
            truth = torch.cdist(x64, x64).gather(1, idx)
        else:
            truth = (x64 @ x64.T).gather(1, idx)
        torch.testing.assert_close(values.double(), truth, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_row_blocks_match_brute_force_with_ties(monkeypatch, workers, metric):
    monkeypatch.setattr(knn_module, "knn_workers", lambda *_: workers)
    x = _integer_points(50, 3, seed=6)
    q = x[:20]
    for block_rows in (None, 1, 3):
        _, idx = exact_knn(q, x, 19, metric=metric, exclude_self=True, block_rows=block_rows)
        expected = brute_force_neighbours(q.numpy(), x.numpy(), True, metric)[:, :19]
        np.testing.assert_array_equal(idx.numpy(), expected)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_k_in_both_engines(symmetric, dtype):
    # float32: faiss heaps; float64: torch.topk per block, merged
    x = _integer_points(300, 4, seed=8).to(dtype)
    q = x if symmetric else x[:120]
    k = 200
    _, idx = exact_knn(q, x, k, exclude_self=True, block_rows=64)
    expected = brute_force_neighbours(q.numpy(), x.numpy(), True)[:, :k]
    np.testing.assert_array_equal(idx.numpy(), expected)


def test_memory_budget_sets_block_size_without_changing_the_result():
    x, _ = make_data("clustered", 400, 16, 7, seed=9)
    base = exact_knn(x, x, 10, exclude_self=True)
    for budget in (1, 4096, 2**20):
        got = exact_knn(x, x, 10, exclude_self=True, memory_budget=budget)
        assert torch.equal(got[1], base[1])
        torch.testing.assert_close(got[0], base[0])
    with pytest.raises(ValueError, match="memory_budget must be > 0"):
        exact_knn(x, x, 10, memory_budget=0)


def test_cost_operands_rank_by_distance_and_negated_dot():
    x = torch.randn(6, 5, dtype=torch.float64)
    left, right = cost_operands(x, "euclidean")
    # |a - b|^2 = |a|^2 + 2 cost(a, b)
    squared = (x * x).sum(1, keepdim=True) + 2 * (left @ right.T)
    torch.testing.assert_close(squared, torch.cdist(x, x) ** 2)
    torch.testing.assert_close(half_sq_norms(x), (x * x).sum(1) / 2)
    left, right = cost_operands(x, "dot")
    torch.testing.assert_close(left @ right.T, -(x @ x.T))


def test_gram_block_writes_into_a_reused_buffer():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    out = torch.empty(4, 5)
    assert gram_block(a, b, out) is out
    torch.testing.assert_close(out, a @ b.T)
    torch.testing.assert_close(gram_block(a, b), a @ b.T)


def test_default_memory_budget_bounds():
    cpu = torch.device("cpu")
    assert default_memory_budget(cpu, 10, 4, 4) == 16 * 2**20
    assert default_memory_budget(cpu, 10**9, 512, 4) == 512 * 2**20


def test_inputs_that_require_grad_are_accepted():
    x = torch.randn(30, 4, requires_grad=True)
    _, idx = exact_knn(x, x, 3, exclude_self=True)
    expected = brute_force_neighbours(x.detach().numpy(), x.detach().numpy(), True)[:, :3]
    np.testing.assert_array_equal(idx.numpy(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_ties_match_brute_force(symmetric):
    x = _integer_points(200, 4, seed=10)
    q = x if symmetric else x[:70]
    for k, block_rows in ((20, None), (150, 32)):
        _, idx = exact_knn(q.cuda(), x.cuda(), k, exclude_self=True, block_rows=block_rows)
        assert idx.is_cuda
        expected = brute_force_neighbours(q.numpy(), x.numpy(), True)[:, :k]
        np.testing.assert_array_equal(idx.cpu().numpy(), expected)


def test_workers_are_capped(monkeypatch):
    cpu = torch.device("cpu")
    assert knn_module.knn_workers(cpu, torch.float64, 5, 100) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert knn_module.knn_workers(cpu, torch.float32, 5, 100) == knn_module.MAX_KNN_WORKERS
    # each worker's heaps: 60,502 x 1,000 x 12 bytes; no more than fit MAX_HEAP_BYTES
    assert knn_module.knn_workers(cpu, torch.float32, 1000, 60502) == 2
    assert knn_module.knn_workers(cpu, torch.float32, 10**6, 10**6) == 1


def test_worker_lists_are_merged_in_row_chunks(monkeypatch):
    monkeypatch.setattr(knn_module, "knn_workers", lambda *_: 3)
    monkeypatch.setattr(knn_module, "MERGE_BYTES", 7 * 48 * 25 * 3)  # 7 rows at a time
    x = _integer_points(40, 3, seed=12)
    _, idx = exact_knn(x, x, 25, exclude_self=True, block_rows=6)
    np.testing.assert_array_equal(
        idx.numpy(), brute_force_neighbours(x.numpy(), x.numpy(), True)[:, :25]
    )


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("block_rows", [None, 4, 7])
def test_float_duplicates_in_different_blocks_tie_exactly(metric, separate, block_rows):
    # continuous coordinates (rounding everywhere), copies placed in other blocks
    g = torch.Generator().manual_seed(13)
    x = torch.randn(40, 5, generator=g) * 3.7
    copies = {30: 3, 25: 11, 39: 0, 17: 16}
    for dst, src in copies.items():
        x[dst] = x[src]
    q = x[:21] if separate else x
    _, idx = exact_knn(q, x, 39, metric=metric, exclude_self=True, block_rows=block_rows)
    for a, row in enumerate(idx.tolist()):
        position = {col: p for p, col in enumerate(row)}
        for dst, src in copies.items():
            if a in (dst, src):
                continue
            # equal costs: adjacent, lower index first
            assert position[src] + 1 == position[dst], (a, src, dst, row)


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_cuda_code_path_on_cpu_tensors(monkeypatch, metric, symmetric):
    # what CUDA tensors take: torch block arithmetic, torch.topk engine, one worker
    monkeypatch.setattr(knn_module, "_numpy_path", lambda _: False)
    monkeypatch.setattr(knn_module, "knn_workers", lambda *_: 1)
    monkeypatch.setattr(knn_module, "running_topk", lambda *a: TorchRunningTopK(*a))
    for x in (_integer_points(45, 3, seed=14), torch.randn(45, 6) * 2):
        q = x if symmetric else x[:20]
        values, idx = exact_knn(q, x, 30, metric=metric, exclude_self=True, block_rows=8)
        expected = brute_force_neighbours(q.numpy(), x.numpy(), True, metric)[:, :30]
        np.testing.assert_array_equal(idx.numpy(), expected)
        q64, x64 = q.double(), x.double()
        truth = torch.cdist(q64, x64) if metric == "euclidean" else q64 @ x64.T
        torch.testing.assert_close(values.double(), truth.gather(1, idx), atol=1e-4, rtol=1e-4)
