"""Running top-k engines, candidate merging and tie order against a stable-sort reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pml_margins.evaluation.topk import (
    FaissHeapRunningTopK,
    TorchRunningTopK,
    merge_candidates,
    order_ties_by_index,
    running_topk,
    topk_lowest_index_ties,
)

CPU = torch.device("cpu")
ENGINES = [FaissHeapRunningTopK, TorchRunningTopK]


def reference_smallest(costs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest per row by (cost, column), from numpy's lexsort."""
    columns = np.broadcast_to(np.arange(costs.shape[1]), costs.shape)
    order = np.lexsort((columns, costs), axis=1)[:, :k]
    return np.take_along_axis(costs, order, 1), order


def integer_costs(rows: int, cols: int, seed: int, levels: int = 4) -> np.ndarray:
    """Few distinct values: most rows have ties everywhere, also across the k-th place."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, levels, (rows, cols)).astype(np.float32)


def split_points(cols: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    inner = sorted(rng.choice(np.arange(1, cols), size=min(4, cols - 1), replace=False))
    return [0, *inner, cols]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", [1, 3, 17, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_in_column_order_give_the_lowest_index_ties(engine, k, seed):
    costs = integer_costs(23, 40, seed)
    topk = engine(23, k, torch.float32, CPU)
    bounds = split_points(40, seed)
    row_bounds = [0, 9, 23]  # two row blocks, fed column block by column block
    for r0, r1 in itertools.pairwise(row_bounds):
        for c0, c1 in itertools.pairwise(bounds):
            topk.add(r0, torch.from_numpy(np.ascontiguousarray(costs[r0:r1, c0:c1])), c0)
    values, columns = topk.result()
    expected_values, expected_columns = reference_smallest(costs, k)
    np.testing.assert_array_equal(columns.numpy(), expected_columns)
    np.testing.assert_array_equal(values.numpy(), expected_values)


@pytest.mark.parametrize("engine", ENGINES)
def test_continuous_costs_and_infinite_exclusions(engine):
    rng = np.random.default_rng(5)
    costs = rng.standard_normal((30, 50)).astype(np.float32)
    costs[np.arange(30), np.arange(30)] = np.inf  # excluded entries are never picked
    topk = engine(30, 49, torch.float32, CPU)
    for c0 in range(0, 50, 16):
        topk.add(0, torch.from_numpy(np.ascontiguousarray(costs[:, c0 : c0 + 16])), c0)
    _, columns = topk.result()
    np.testing.assert_array_equal(columns.numpy(), reference_smallest(costs, 49)[1])
    assert not (columns.numpy() == np.arange(30)[:, None]).any()


def test_torch_engine_float64_and_out_of_order_blocks():
    costs = torch.tensor([[3.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    topk = TorchRunningTopK(1, 2, torch.float64, CPU)
    topk.add(0, costs[:, 2:], 2)
    with pytest.raises(ValueError, match="out of order"):
        topk.add(0, costs[:, :2], 0)
    values, columns = topk.result()
    assert values.dtype == torch.float64
    assert columns.tolist() == [[3, 2]]


def test_heap_engine_refuses_what_faiss_cannot_hold():
    with pytest.raises(ValueError, match="CPU float32"):
        FaissHeapRunningTopK(3, 2, torch.float64, CPU)


def test_running_topk_picks_heaps_for_cpu_float32():
    assert isinstance(running_topk(4, 3, torch.float32, CPU), FaissHeapRunningTopK)
    assert isinstance(running_topk(4, 1000, torch.float32, CPU), FaissHeapRunningTopK)
    assert isinstance(running_topk(4, 3, torch.float64, CPU), TorchRunningTopK)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_merge_candidates_equals_one_selection_over_the_union(largest, seed):
    costs = integer_costs(17, 30, seed, levels=5)
    sign = -1.0 if largest else 1.0  # reference is "smallest first"
    expected_values, expected_columns = reference_smallest(sign * costs, 8)
    # three partial lists over disjoint, interleaved column sets, each its own top 8
    parts = [np.arange(p, 30, 3) for p in (2, 0, 1)]
    values, columns = [], []
    for cols in parts:
        v, c = topk_lowest_index_ties(torch.from_numpy(costs[:, cols]), 8, largest=largest)
        values.append(v)
        columns.append(torch.from_numpy(cols)[c])
    merged_values, merged_columns = merge_candidates(
        torch.cat(values, 1), torch.cat(columns, 1), 8, largest=largest
    )
    np.testing.assert_array_equal(merged_columns.numpy(), expected_columns)
    np.testing.assert_array_equal(sign * merged_values.numpy(), expected_values)


def test_order_ties_by_index_touches_only_tied_rows():
    values = torch.tensor([[1.0, 1.0, 0.0], [3.0, 2.0, 1.0]])
    columns = torch.tensor([[7, 2, 5], [9, 4, 1]])
    v, c = order_ties_by_index(values.clone(), columns.clone())
    assert c.tolist() == [[2, 7, 5], [9, 4, 1]]
    assert v.tolist() == values.tolist()
    v, c = order_ties_by_index(torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([[4, 8, 3]]), False)
    assert c.tolist() == [[4, 3, 8]]


@pytest.mark.parametrize("largest", [True, False])
def test_topk_lowest_index_ties_smallest_and_largest(largest):
    scores = torch.tensor([[1.0] * 50 + [2.0] + [0.0] * 5])
    values, columns = topk_lowest_index_ties(scores, 3, largest=largest)
    if largest:
        assert columns.tolist() == [[50, 0, 1]]
    else:
        assert columns.tolist() == [[51, 52, 53]]
        assert values.tolist() == [[0.0, 0.0, 0.0]]
