"""Defects found by this session's review, each test failing on the code before its fix."""

from __future__ import annotations

import pytest
import torch

from pml_margins.evaluation import (
    aggregate,
    average_precision,
    average_precision_at_r,
    precision_at_1,
    r_precision,
    recall_at_k,
    reciprocal_rank,
)

MATCH = torch.tensor([[True, False], [False, True]])


def test_aggregate_checks_its_arguments() -> None:
    """avg_of_avgs="no" switched per-class averaging on (0.25 for the mean 1/3); three
    values with two labels gave a mean, or a raw index_add_ RuntimeError."""
    values, labels = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3, 3, 8])
    assert aggregate(values, labels) == pytest.approx(1 / 3)
    assert aggregate(values, labels, avg_of_avgs=True) == pytest.approx(0.25)
    for name in ("avg_of_avgs", "return_per_class"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            aggregate(values, labels, **{name: "no"})
    for flag in ({}, {"avg_of_avgs": True}, {"return_per_class": True}):
        with pytest.raises(ValueError, match="3 per-query values but 2 labels"):
            aggregate(values, torch.tensor([3, 8]), **flag)
    with pytest.raises(TypeError, match="per_query must be a"):
        aggregate(values[:, None], labels)
    with pytest.raises(TypeError, match="labels must be a"):
        aggregate(values, [3, 3, 8])


@pytest.mark.parametrize("metric", [r_precision, average_precision_at_r, average_precision])
def test_at_r_metrics_need_one_count_per_query(metric) -> None:
    """A one-element count was broadcast to every query (MAP@R [1, 0] for [1, 1])."""
    expected = [1.0, 0.5] if metric is average_precision else [1.0, 0.0]
    assert metric(MATCH, torch.tensor([1, 1])).tolist() == expected
    with pytest.raises(ValueError, match=r"one count per query, shape \(2,\)"):
        metric(MATCH, torch.tensor([1]))
    with pytest.raises(TypeError, match="relevant must be an integer tensor"):
        metric(MATCH, torch.tensor([1.0, 1.0]))
    with pytest.raises(TypeError, match="match must be a boolean tensor"):
        metric(MATCH.long(), torch.tensor([1, 1]))


def test_match_must_be_a_boolean_matrix() -> None:
    """A 1-D match raised a raw IndexError, k=1.5 a raw slice TypeError."""
    for fn in (lambda m: recall_at_k(m, 1), precision_at_1, reciprocal_rank):
        with pytest.raises(ValueError, match=r"match must be \(Q, k\)"):
            fn(MATCH[0])
        with pytest.raises(TypeError, match="match must be a boolean tensor"):
            fn(MATCH.float())
    for k in (1.5, 0, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            recall_at_k(MATCH, k)
    assert recall_at_k(MATCH, torch.tensor(2)).tolist() == [1.0, 1.0]


def test_uint64_labels_beyond_int64_are_refused_from_torch_as_from_numpy() -> None:
    """A torch.uint64 label 2^63 + 1 was wrapped to a negative int64 (return_per_class
    then out of ascending order: [1.0, 0.667] for [0.667, 1.0]); numpy's was refused."""
    import numpy as np

    from pml_margins.evaluation import RetrievalAccuracyCalculator

    x = torch.tensor([[0.0], [0.1], [9.0], [5.0], [5.1], [5.2]])
    calculator = RetrievalAccuracyCalculator(include=("precision_at_1",), return_per_class=True)
    big = np.array([5, 5, 5, 2**63 + 1, 2**63 + 1, 2**63 + 1], dtype=np.uint64)
    for labels in (big, torch.from_numpy(big), torch.from_numpy(np.repeat(big, 2))[::2]):
        with pytest.raises(ValueError, match=r"uint64 values beyond int64 \(>= 2\^63\)"):
            calculator.get_accuracy(x, labels)
    small = torch.tensor([5, 5, 5, 9, 9, 9], dtype=torch.uint64)
    result = calculator.get_accuracy(x, small)["precision_at_1"]
    assert result == pytest.approx([2 / 3, 1.0])
