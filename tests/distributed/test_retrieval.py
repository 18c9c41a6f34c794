"""Sharded exact k-nn and accuracy on 2 and 3 ranks equal the single-process ones."""

from __future__ import annotations

import math

import pytest
import torch

from pml_margins.distributed.evaluation import (
    ShardedRetrievalAccuracyCalculator,
    sharded_exact_knn,
)
from pml_margins.evaluation import RetrievalAccuracyCalculator, exact_knn
from pml_margins.evaluation.knn import merge_neighbours
from tests.distributed import cases
from tests.distributed.conftest import WORLD_SIZES
from tests.distributed.test_sharded_loss import load_results


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("data", ["random", "ties", "offset"])
def test_sharded_knn_equals_exact_knn(runs, world_size: int, data: str) -> None:
    d = cases.retrieval_data()
    q, r = {"random": (d["q"], d["r"]), "ties": (d["qi"], d["ri"])}.get(
        data, (d["q"] + 1000, d["r"] + 1000)
    )
    results = load_results(runs[world_size], "retrieval", world_size)
    for metric, exclude_self, k in cases.KNN_CASES:
        scores, indices = exact_knn(q, r, k, metric=metric, exclude_self=exclude_self, block_rows=4)
        if data == "ties" and k > 1:
            assert (scores[:, 1:] == scores[:, :-1]).any(), "the tie data should have ties"
        for result in results:
            got_scores, got_indices = result[data, metric, exclude_self, k]
            assert torch.equal(got_indices, indices), (metric, exclude_self, k)
            assert torch.equal(got_scores, scores), (metric, exclude_self, k)


def _assert_same_metrics(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        values = value if isinstance(value, list) else [value]
        got_values = got[name] if isinstance(got[name], list) else [got[name]]
        assert len(values) == len(got_values), name
        for a, b in zip(got_values, values, strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12), name


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case_id", cases.CALCULATOR_CASES)
def test_sharded_calculator_equals_single_process(runs, world_size: int, case_id: str) -> None:
    kwargs, mode = cases.CALCULATOR_CASES[case_id]
    q, ql, r, rl, ref_includes_query = cases.calculator_inputs(mode)
    calc = RetrievalAccuracyCalculator(**kwargs)
    if mode.startswith("self"):
        expected = calc.get_accuracy(r, rl)
    else:
        expected = calc.get_accuracy(q, ql, r, rl, ref_includes_query=ref_includes_query)
    assert expected["precision_at_1"] != 0, "metrics should be informative"
    for result in load_results(runs[world_size], "retrieval", world_size):
        _assert_same_metrics(result[case_id], expected)


def test_merge_orders_by_value_then_index() -> None:
    values = torch.tensor([[2.0, 1.0, 2.0, 3.0]])
    indices = torch.tensor([[9, 0, 4, 7]])
    v, i = merge_neighbours(values, indices, 3, largest=True)
    assert i.tolist() == [[7, 4, 9]] and v.tolist() == [[3, 2, 2]]
    v, i = merge_neighbours(values, indices, 3, largest=False)
    assert i.tolist() == [[0, 4, 9]] and v.tolist() == [[1, 2, 2]]


def test_single_process_and_bad_input() -> None:
    q, r = torch.randn(5, 3), torch.randn(8, 3)
    for metric in ("dot", "euclidean"):
        got = sharded_exact_knn(q, r, 3, metric=metric, block_rows=2)
        expected = exact_knn(q, r, 3, metric=metric, block_rows=2)
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[0], expected[0])
        for backend in ("faiss", "torch"):
            got = sharded_exact_knn(q, r, 3, metric=metric, num_threads=1, backend=backend)
            assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
    with pytest.raises(ValueError, match="backend"):
        sharded_exact_knn(q, r, 2, backend="gpu")
    with pytest.raises(ValueError, match="num_threads"):
        sharded_exact_knn(q, r, 2, num_threads=0)
    for k in (-1, 9, 2.0, True):
        with pytest.raises(ValueError, match="k must"):
            sharded_exact_knn(q, r, k)
    with pytest.raises(ValueError, match="k must"):
        sharded_exact_knn(q, r, 8, exclude_self=True)
    with pytest.raises(ValueError, match="width"):
        sharded_exact_knn(q, torch.randn(8, 4), 2)
    with pytest.raises(ValueError, match="metric"):
        sharded_exact_knn(q, r, 2, metric="cosine")
    for block_rows in (0, -1, 2.0):  # checked as exact_knn checks it (it went unchecked)
        with pytest.raises(ValueError, match="block_rows"):
            sharded_exact_knn(q, r, 2, block_rows=block_rows)
    calc = ShardedRetrievalAccuracyCalculator(include=("precision_at_1",))
    with pytest.raises(ValueError, match="ref_includes_query"):
        calc.get_accuracy(q, torch.zeros(5), r, torch.zeros(8), ref_includes_query=True)
    labels = torch.tensor([0, 0, 1, 1, 0])  # the query's own labels without reference: as PML
    assert calc.get_accuracy(q, labels, None, labels) == calc.get_accuracy(q, labels)
    assert calc.get_accuracy(q, labels, None, labels.clone()) == calc.get_accuracy(q, labels)
    r_labels = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    q_in_r = torch.cat([q, r[5:]])  # the reference starts with the query
    truthy = calc.get_accuracy(q, labels, q_in_r, r_labels[:8], ref_includes_query=1)
    assert truthy == calc.get_accuracy(q, labels, q_in_r, r_labels[:8], ref_includes_query=True)
    for flag in (2, "False"):  # (PML's int() of 2 counted the query twice; a string, true)
        with pytest.raises(TypeError, match="ref_includes_query must be a bool"):
            calc.get_accuracy(q, labels, q_in_r, r_labels[:8], ref_includes_query=flag)
    with pytest.raises(ValueError, match="reference_labels given without reference, unlike"):
        calc.get_accuracy(q, labels, None, labels.flip(0))
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    with pytest.raises(
        ValueError, match=r"got LpDistance\(p=1, power=1, normalize_embeddings=True\)"
    ):
        ShardedRetrievalAccuracyCalculator(knn_func=CustomKNN(LpDistance(p=1)))


def test_sharded_calculator_shares_the_ami_warning(monkeypatch) -> None:
    import pml_margins.evaluation.calculator as calculator_module

    monkeypatch.setattr(calculator_module, "AMI_SLOW_NUM_CLASSES", 2)
    d = cases.retrieval_data()
    classes = len(torch.unique(d["rl"]))
    with pytest.warns(UserWarning, match=f"AMI with {classes} classes is very slow"):
        ShardedRetrievalAccuracyCalculator(include=("AMI",)).get_accuracy(d["r"], d["rl"])
