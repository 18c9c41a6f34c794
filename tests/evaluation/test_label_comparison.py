"""A custom ``label_comparison_fn``, as PML's ``AccuracyCalculator`` takes it.

Multi-column labels, tolerant comparisons, a comparison under which a label does not
match itself, lone labels, per-class averages, separate query/reference sets and
``ref_includes_query``: every metric equals PML's, and ``torch.eq`` equals our own
equality path bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.evaluation.label_matching import custom_relevance, label_positions

NO_CLUSTERING = ("NMI", "AMI")
COMPARISONS = {
    "within_one": lambda a, b: (a - b).abs() <= 1,
    "equal": torch.eq,
    "never_itself": lambda a, b: (a - b).abs() == 1,
    "same_parity": lambda a, b: (a % 2) == (b % 2),
}
OPTIONS = [{}, {"avg_of_avgs": True}, {"return_per_class": True}, {"k": "max_bin_count"}, {"k": 5}]


def _same(ours, theirs) -> bool:
    if isinstance(theirs, list):
        return len(ours) == len(theirs) and all(map(_same, ours, theirs))
    if isinstance(theirs, float) and math.isnan(theirs):
        return math.isnan(ours)
    return ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)  # PML sums some in float32


def _sets(setting: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g) * 10  # spread out: no near-ties in PML's float32 k-nn
    y = torch.randint(0, 12, (200,), generator=g)
    if setting == "itself":
        return (x, y)
    if setting == "separate":  # query labels 12 and 13 are in no reference
        return (
            torch.randn(50, 8, generator=g) * 10,
            torch.randint(0, 14, (50,), generator=g),
            x,
            y,
        )
    return (x[:60], y[:60], x, y, True)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("setting", ["itself", "separate", "ref_includes_query"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(map(str, o.items())) or "-")
@pytest.mark.parametrize("name", COMPARISONS)
def test_every_metric_equals_pml(name: str, options: dict, setting: str) -> None:
    fn = COMPARISONS[name]
    args = _sets(setting)
    ours = RetrievalAccuracyCalculator(exclude=NO_CLUSTERING, label_comparison_fn=fn, **options)
    pml = AccuracyCalculator(
        exclude=NO_CLUSTERING, label_comparison_fn=fn, device=torch.device("cpu"), **options
    )
    got, want = ours.get_accuracy(*args), pml.get_accuracy(*args)
    assert set(want) <= set(got)
    for metric, value in want.items():
        assert _same(got[metric], value), (metric, got[metric], value)
    if name == "equal":  # the same as comparing for equality ourselves, bit for bit
        plain = RetrievalAccuracyCalculator(exclude=NO_CLUSTERING, **options).get_accuracy(*args)
        assert all(_same(got[m], v) and (got[m] == v or v != v) for m, v in plain.items())


@pytest.mark.parametrize("labels_as", ["int", "float", "numpy"])
def test_multi_column_labels_as_in_pmls_documentation(labels_as: str) -> None:
    """PML's example: same first column, different second column."""

    def fn(a, b):
        return (a[..., 0] == b[..., 0]) & (a[..., 1] != b[..., 1])

    g = torch.Generator().manual_seed(2)
    x = torch.randn(150, 6, generator=g) * 10
    y = torch.randint(0, 4, (150, 2), generator=g)
    given = {"int": y, "float": y.double(), "numpy": y.numpy()}[labels_as]
    for options in ({}, {"return_per_class": True}, {"k": "max_bin_count"}):
        ours = RetrievalAccuracyCalculator(exclude=NO_CLUSTERING, label_comparison_fn=fn, **options)
        pml = AccuracyCalculator(
            exclude=NO_CLUSTERING, label_comparison_fn=fn, device=torch.device("cpu"), **options
        )
        got, want = ours.get_accuracy(x, given), pml.get_accuracy(x, y)
        for metric, value in want.items():
            assert _same(got[metric], value), (options, metric)


def test_public_calculate_methods_take_pmls_kwargs() -> None:
    """``calculate_*`` called with the kwargs PML's own pipeline builds give PML's values."""
    fn = COMPARISONS["within_one"]
    x, y = _sets("itself")
    pml = AccuracyCalculator(
        exclude=NO_CLUSTERING, label_comparison_fn=fn, device=torch.device("cpu"), k=40
    )
    captured = {}
    original = pml._get_accuracy
    pml._get_accuracy = lambda function_dict, **kwargs: (
        captured.update(kwargs) or original(function_dict, **kwargs)
    )
    want = pml.get_accuracy(x, y)
    ours = RetrievalAccuracyCalculator(exclude=NO_CLUSTERING, label_comparison_fn=fn)
    for metric in ("precision_at_1", "r_precision", "mean_average_precision_at_r"):
        got = getattr(ours, f"calculate_{metric}")(**captured)
        assert _same(got, want[metric]), metric


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (lambda a, b: (a == b).sum(-1), ValueError, r"returned shape \(\d*,?\) for labels"),
        (lambda a, b: [True], TypeError, "must return a tensor of booleans"),
    ],
)
def test_a_comparison_of_the_wrong_shape_or_type_is_named(fn, error, match) -> None:
    x, y = torch.randn(40, 3), torch.randint(0, 3, (40,))
    with pytest.raises(error, match=match):
        RetrievalAccuracyCalculator(exclude=NO_CLUSTERING, label_comparison_fn=fn).get_accuracy(
            x, y
        )


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (torch.zeros(10, 2, 2), ValueError, "1-D or 2-D"),
        (torch.tensor([0.0, float("nan")] * 5), ValueError, "NaN or Inf"),
        (torch.zeros(10, dtype=torch.complex64), TypeError, "real numbers"),
        (torch.zeros(9), ValueError, "has length 9"),
    ],
)
def test_labels_for_a_custom_comparison_are_checked(labels, error, match) -> None:
    calc = RetrievalAccuracyCalculator(exclude=NO_CLUSTERING, label_comparison_fn=torch.eq)
    with pytest.raises(error, match=match):
        calc.get_accuracy(torch.randn(10, 3), labels)


def test_clustering_metrics_are_refused_as_pml_does() -> None:
    with pytest.raises(NotImplementedError, match="clustering \\+ custom label comparison"):
        RetrievalAccuracyCalculator(label_comparison_fn=torch.eq)
    with pytest.raises(NotImplementedError, match="clustering \\+ custom label comparison"):
        RetrievalAccuracyCalculator(include=("AMI",), label_comparison_fn=torch.eq)


def test_relevance_counts_with_pml_call_shapes() -> None:
    """Counts from one call per distinct query label, ``(1[, L])`` against ``(N[, L])``,
    as PML calls it: a comparison that expands its first argument to the second works."""
    g = torch.Generator().manual_seed(3)
    query, reference = (
        torch.randint(0, 30, (300,), generator=g),
        torch.randint(0, 30, (500,), generator=g),
    )
    fn = COMPARISONS["within_one"]
    whole = custom_relevance(query, reference, False, fn)
    want = torch.tensor([int(((reference - u).abs() <= 1).sum()) for u in whole.unique])
    assert torch.equal(whole.counts, want)
    shapes = []

    def expanding(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shapes.append((tuple(a.shape), tuple(b.shape)))
        a = a.expand_as(b)
        return (a[..., 0] == b[..., 0]) & (a[..., 1] != b[..., 1])

    pairs_q = torch.randint(0, 4, (40, 2), generator=g)
    pairs_r = torch.randint(0, 4, (70, 2), generator=g)
    got = custom_relevance(pairs_q, pairs_r, False, expanding)
    assert {s for s in shapes} == {((1, 2), (70, 2))} and len(shapes) == len(got.unique)
    want = [int(((pairs_r[:, 0] == u[0]) & (pairs_r[:, 1] != u[1])).sum()) for u in got.unique]
    assert got.counts.tolist() == want


def test_label_positions_by_exact_row_equality() -> None:
    unique = torch.tensor([[0, 1], [2, 3], [2, 4]])
    rows = torch.tensor([[2, 4], [0, 1], [9, 9], [2, 3]])
    assert label_positions(unique, rows).tolist() == [2, 0, 3, 1]
    assert label_positions(torch.tensor([1, 4, 7]), torch.tensor([4, 7, 1, 3, 8])).tolist() == [
        1,
        2,
        0,
        3,
        3,
    ]
    assert np.array_equal(
        label_positions(torch.tensor([], dtype=torch.long), torch.tensor([5])), [0]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_custom_comparison_on_cuda_equals_cpu() -> None:
    def fn(a, b):
        return (a[..., 0] == b[..., 0]) & ((a[..., 1] - b[..., 1]).abs() <= 1)

    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 16, generator=g) * 10
    y = torch.randint(0, 5, (400, 2), generator=g)
    for options in ({}, {"return_per_class": True}, {"k": "max_bin_count"}):
        calc = RetrievalAccuracyCalculator(exclude=NO_CLUSTERING, label_comparison_fn=fn, **options)
        cpu, gpu = calc.get_accuracy(x, y), calc.get_accuracy(x.cuda(), y.cuda())
        for metric, value in cpu.items():
            assert _same(gpu[metric], value), (options, metric)
