import math

import pytest
import torch

from pml_margins.evaluation import metrics as M

# rows: queries; columns: whether the j-th neighbour shares the query's label
MATCH = torch.tensor(
    [
        [True, False, True, False],
        [False, True, True, True],
        [False, False, False, False],
    ]
)
RELEVANT = torch.tensor([2, 3, 1])


def test_recall_and_precision_at_1():
    assert M.precision_at_1(MATCH).tolist() == [1.0, 0.0, 0.0]
    assert M.recall_at_k(MATCH, 2).tolist() == [1.0, 1.0, 0.0]
    assert M.recall_at_k(MATCH, 100).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="k must be a positive integer"):
        M.recall_at_k(MATCH, 0)


def test_r_precision_by_hand():
    assert M.r_precision(MATCH, RELEVANT).tolist() == [0.5, 2 / 3, 0.0]


def test_average_precision_at_r_by_hand():
    # row 0: R=2, hits at rank 1 only among the first 2 -> (1/1) / 2
    # row 1: R=3, hits at ranks 2, 3 -> (1/2 + 2/3) / 3
    expected = [0.5, (1 / 2 + 2 / 3) / 3, 0.0]
    torch.testing.assert_close(
        M.average_precision_at_r(MATCH, RELEVANT), torch.tensor(expected, dtype=torch.float64)
    )


def test_average_precision_over_all_k_by_hand():
    # row 0: hits at ranks 1 and 3 -> (1 + 2/3) / 2; row 1: (1/2 + 2/3 + 3/4) / 3
    expected = [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3 + 3 / 4) / 3, 0.0]
    torch.testing.assert_close(
        M.average_precision(MATCH, RELEVANT), torch.tensor(expected, dtype=torch.float64)
    )


def test_reciprocal_rank_by_hand():
    assert M.reciprocal_rank(MATCH).tolist() == [1.0, 0.5, 0.0]
    assert M.reciprocal_rank(MATCH[:, :0]).tolist() == [0.0, 0.0, 0.0]


def test_k_smaller_than_r_follows_pml():
    # PML clips the relevance mask to k columns but still divides AP@R by R
    match = torch.tensor([[True, True]])
    assert M.r_precision(match, torch.tensor([5])).tolist() == [1.0]
    assert M.average_precision_at_r(match, torch.tensor([5])).tolist() == [2 / 5]


def test_chunked_rows_equal_unchunked(monkeypatch):
    g = torch.Generator().manual_seed(0)
    match = torch.rand(50, 9, generator=g) > 0.5
    relevant = torch.randint(1, 12, (50,), generator=g)
    full = M.average_precision_at_r(match, relevant)
    monkeypatch.setattr(M, "_ROWS_PER_CHUNK", 7)
    torch.testing.assert_close(M.average_precision_at_r(match, relevant), full)


def test_relevant_counts():
    label_count, relevant = M.relevant_counts(
        torch.tensor([5, 7, 11]), torch.tensor([5, 5, 7, 9]), ref_includes_query=False
    )
    assert label_count.tolist() == [2, 1, 0]
    assert relevant.tolist() == [2, 1, 0]


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, 1 / 3),
        ({"avg_of_avgs": True}, 0.25),
        ({"return_per_class": True}, [0.5, 0.0]),
    ],
)
def test_aggregate(kw, expected):
    out = M.aggregate(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3, 3, 8]), **kw)
    assert out == pytest.approx(expected)


def test_aggregate_rejects_both_modes():
    with pytest.raises(ValueError, match="mutually exclusive"):
        M.aggregate(torch.ones(2), torch.zeros(2, dtype=torch.long), True, True)


def test_nan_for_no_relevant():
    assert math.isnan(M.r_precision(MATCH[:1], torch.tensor([0])).item())


def _paper_average_precision(row: list[bool], r: int, at_r: bool) -> float:
    """(1/R) * sum over ranks p (1-based) of precision@p at each relevant rank p."""
    cut = row[:r] if at_r else row
    hits, total = 0, 0.0
    for p, hit in enumerate(cut, start=1):
        if hit:
            hits += 1
            total += hits / p
    return total / r


@pytest.mark.parametrize("at_r", [True, False])
@pytest.mark.parametrize("columns", [1, 7, 40])
def test_average_precision_equals_the_formula_on_random_lists(at_r, columns):
    """Rows with no match, all matches, R larger and smaller than the list: the positions
    of the matches alone give the same value as the definition, rank by rank."""
    g = torch.Generator().manual_seed(columns)
    match = torch.rand(60, columns, generator=g) < torch.rand(60, 1, generator=g)
    match[0], match[1] = False, True
    relevant = torch.randint(1, 2 * columns + 2, (60,), generator=g)
    relevant[2] = 1
    got = (M.average_precision_at_r if at_r else M.average_precision)(match, relevant)
    want = [
        _paper_average_precision(row, int(r), at_r)
        for row, r in zip(match.tolist(), relevant.tolist(), strict=True)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)
    if at_r:  # the at-R metrics read the first max(R) columns only
        wide = torch.cat([match, torch.ones(60, 500, dtype=torch.bool)], 1)
        shorter = relevant.clamp(max=columns)
        for metric in (M.average_precision_at_r, M.r_precision):
            torch.testing.assert_close(metric(wide, shorter), metric(match, shorter))
