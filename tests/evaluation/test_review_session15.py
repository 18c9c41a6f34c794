"""Defects found by this session's review of the evaluation, each test failing on the code
before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.evaluation.metrics import (
    average_precision,
    average_precision_at_r,
    r_precision,
    relevant_counts,
)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(20, 4, generator=generator), torch.arange(20) % 4


def test_a_call_naming_a_metric_the_calculator_does_not_compute_is_refused() -> None:
    """include=("recall_at_10",) with recall_ks (1, 2, 4, 8) returned {}; a misspelt name
    beside a right one was dropped; a misspelt exclude excluded nothing."""
    x, y = _data()
    calculator = RetrievalAccuracyCalculator(recall_ks=(1, 2, 4, 8))
    for include in (("recall_at_10",), ("precision_at_1", "recal_at_1")):
        with pytest.raises(ValueError, match="which this calculator does not compute"):
            calculator.get_accuracy(x, y, include=include)
    with pytest.raises(ValueError, match=r"exclude names \['precison_at_1'\]"):
        calculator.get_accuracy(x, y, exclude=("precison_at_1",))
    narrow = RetrievalAccuracyCalculator(include=("precision_at_1",))
    with pytest.raises(ValueError, match=r"include names \['r_precision'\]"):
        narrow.get_accuracy(x, y, include=("r_precision",))
    # names it computes, and any metric's name in exclude, as before
    got = narrow.get_accuracy(x, y, include=("precision_at_1",), exclude=("r_precision",))
    assert set(got) == {"precision_at_1"}
    assert set(calculator.get_accuracy(x, y, include=("recall_at_8",))) == {"recall_at_8"}


@pytest.mark.parametrize("metric", [average_precision, average_precision_at_r, r_precision])
def test_negative_relevant_counts_are_refused(metric) -> None:
    """average_precision gave -1.6667 for a count of -1; the at-R metrics NaN and -0."""
    match = torch.tensor([[True, False, True], [False, False, True]])
    with pytest.raises(ValueError, match="relevant counts must be >= 0, got -1"):
        metric(match, torch.tensor([-1, 2]))


def test_relevant_counts_checks_its_arguments() -> None:
    """An empty reference set was an IndexError, numpy labels a TypeError from
    torch._unique2, ref_includes_query=2 subtracted 2, (Q, 1) labels gave (Q, 1) counts."""
    with pytest.raises(ValueError, match="reference_labels is empty"):
        relevant_counts(torch.tensor([1]), torch.tensor([], dtype=torch.long), False)
    with pytest.raises(TypeError, match=r"query_labels must be a real torch\.Tensor"):
        relevant_counts(np.array([1, 2]), torch.tensor([1, 1, 2]), False)
    with pytest.raises(TypeError, match="ref_includes_query must be a bool"):
        relevant_counts(torch.tensor([1, 2]), torch.tensor([1, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"query_labels must be 1-D, got shape \(2, 1\)"):
        relevant_counts(torch.tensor([[1], [2]]), torch.tensor([1, 1, 2]), False)
    counts = relevant_counts(torch.tensor([0.5, 2.0]), torch.tensor([0.5, 0.5, 2.0]), True)
    assert [c.tolist() for c in counts] == [[2, 1], [1, 0]]
    # truth values PML's callers pass, and no query against no reference, as before
    query, reference = torch.tensor([1, 2]), torch.tensor([1, 1, 2])
    for flag in (1, np.bool_(True), torch.tensor(True), torch.tensor([1])):
        assert relevant_counts(query, reference, flag)[1].tolist() == [1, 0]
    empty = torch.zeros(0, dtype=torch.long)
    assert [c.tolist() for c in relevant_counts(empty, empty, False)] == [[], []]


def test_exclude_takes_any_metric_name_and_any_recall_cut_off() -> None:
    """From the review of the change: a metric added to the calculator after construction
    could be included but not excluded, and a harmless recall_at_K of another calculator's
    cut-offs was refused in exclude."""
    x, y = _data()
    calculator = RetrievalAccuracyCalculator(include=("precision_at_1",))
    calculator.original_function_dict["extra"] = lambda **kwargs: 42.0
    assert calculator.get_accuracy(x, y, include=("extra",)) == {"extra": 42.0}
    assert set(calculator.get_accuracy(x, y, exclude=("extra", "recall_at_16"))) == {
        "precision_at_1"
    }
