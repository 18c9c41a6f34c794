"""Regressions found by the session-16 reviews (each test fails on the code before)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pml_margins.evaluation import RetrievalAccuracyCalculator


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(14)
    return torch.randn(25, 4, generator=g), torch.randint(0, 3, (25,), generator=g)


@pytest.mark.parametrize("flag", ["False", "no", "0", [0], 2, 0.5, None, torch.tensor([1, 0])])
def test_ref_includes_query_refuses_what_is_not_a_truth_value(flag):
    # "False" was read for its truth (True) and gave the other setting's metrics
    x, y = _data()
    calculator = RetrievalAccuracyCalculator(include=("precision_at_1",))
    with pytest.raises(TypeError, match="ref_includes_query must be a bool"):
        calculator.get_accuracy(x, y, x, y, flag)


@pytest.mark.parametrize(
    "flag, same_as",
    [
        (1, True),
        (0, False),
        (np.int64(1), True),
        (np.bool_(False), False),
        (torch.tensor(True), True),
        (torch.tensor([0]), False),
        (1.0, True),
        (torch.tensor(0.0), False),
    ],
)
def test_ref_includes_query_takes_the_truth_values_pml_callers_pass(flag, same_as):
    x, y = _data()
    calculator = RetrievalAccuracyCalculator(include=("precision_at_1",))
    assert calculator.get_accuracy(x, y, x, y, flag) == calculator.get_accuracy(x, y, x, y, same_as)
