"""Sharded exact top-k on 2 and 3 ranks equals single-process brute force, ties included."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance

from pml_margins.distributed.evaluation import exact_topk, merge_topk, sharded_topk
from tests.distributed import cases
from tests.distributed.conftest import WORLD_SIZES
from tests.distributed.test_sharded_loss import load_results

DISTANCES = {
    "cosine": (CosineSimilarity(), "q", "r"),
    "lp": (LpDistance(), "q", "r"),
    "dot_ties": (DotProductSimilarity(normalize_embeddings=False), "qi", "ri"),
    "lp_ties": (LpDistance(normalize_embeddings=False, power=2), "qi", "ri"),
}


def brute_force(distance, q: torch.Tensor, r: torch.Tensor, k: int):
    """Full matrix, stable sort: best first, ties by the smaller reference index."""
    mat = distance(q, r)
    order = torch.sort(mat, dim=1, descending=distance.is_inverted, stable=True).indices[:, :k]
    return mat.gather(1, order), order


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", DISTANCES)
@pytest.mark.parametrize("k", [1, 5, cases.NUM_REFERENCES])
def test_sharded_topk_equals_brute_force(runs, world_size: int, name: str, k: int) -> None:
    distance, q, r = DISTANCES[name]
    data = cases.retrieval_data()
    values, indices = brute_force(distance, data[q], data[r], k)
    if name.endswith("ties"):
        assert len(values.unique()) < values.numel(), "the tie data should have ties"
    for result in load_results(runs[world_size], "retrieval", world_size):
        got_values, got_indices = result[name, k]
        assert torch.equal(got_indices, indices)
        torch.testing.assert_close(got_values, values, rtol=1e-6, atol=1e-6)


def test_exact_topk_breaks_ties_by_position() -> None:
    key = torch.tensor([[1.0, 3, 3, 2, 3, 0], [5, 5, 5, 5, 5, 5]])
    values, cols = exact_topk(key, 4)
    assert cols.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]
    assert values.tolist() == [[3, 3, 3, 2], [5, 5, 5, 5]]


def test_merge_topk_orders_by_value_then_index() -> None:
    values = torch.tensor([[2.0, 1.0, 2.0, 3.0]])
    indices = torch.tensor([[9, 0, 4, 7]])
    v, i = merge_topk(values, indices, 3)
    assert i.tolist() == [[7, 4, 9]] and v.tolist() == [[3, 2, 2]]


def test_single_process_and_bad_k() -> None:
    q, r = torch.randn(5, 3), torch.randn(8, 3)
    values, indices = sharded_topk(q, r, 3, block_size=2)
    ref_values, ref_indices = brute_force(CosineSimilarity(), q, r, 3)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values)
    for k in (0, 9, 2.0):
        with pytest.raises(ValueError, match="k must"):
            sharded_topk(q, r, k)
    with pytest.raises(ValueError, match="width"):
        sharded_topk(q, torch.randn(8, 4), 2)
