"""``calculate_recall_at_K`` called with PML's kwargs: a k-nn list too short for Recall@K
is refused, a complete one accepted, whatever the label counts say.

The depth was inferred from ``label_counts`` (the references matching each query label),
which is not the number of references: with references whose labels no query has, a list
of 1 passed for Recall@5 and gave 0.0 where the truth is 1.0; with a
``label_comparison_fn`` under which a reference matches several query labels, a complete
list was refused.
"""

from __future__ import annotations

import pytest
import torch

from pml_margins.evaluation import RetrievalAccuracyCalculator


def _kwargs(knn_labels, query_labels, label_counts, **extra):
    return {
        "knn_labels": knn_labels,
        "query_labels": query_labels,
        "not_lone_query_mask": torch.ones(len(query_labels), dtype=torch.bool),
        "label_counts": label_counts,
        "ref_includes_query": False,
        **extra,
    }


def test_a_list_short_of_k_is_refused_when_references_outnumber_it() -> None:
    # 4 queries of label 0; 21 references: one of label 0 (the 3rd nearest of each
    # query), 20 of labels no query has. Recall@5 is 1.0; a list of 1 reads 0.0
    query_labels = torch.zeros(4, dtype=torch.long)
    reference_labels = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, 21)])
    full = torch.tensor([[5, 6, 0, 7, 8]]).repeat(4, 1)
    counts = (torch.tensor([0]), torch.tensor([1]))
    calc = RetrievalAccuracyCalculator(recall_ks=(5,))
    complete = _kwargs(full, query_labels, counts, reference_labels=reference_labels)
    assert calc.calculate_recall_at_5(**complete) == 1.0
    for extra in ({}, {"reference_labels": reference_labels}):
        short = _kwargs(full[:, :1], query_labels, counts, **extra)
        with pytest.raises(ValueError, match="recall_at_5 reads each query's 5 nearest"):
            calc.calculate_recall_at_5(**short)


def test_a_complete_list_is_accepted_under_a_comparison_with_overlapping_counts() -> None:
    # labels match when they differ by at most 1: each of the 3 references matches two of
    # the three query labels (counts 2 + 3 + 2 = 7 > 3 references). A list of all 3
    # references is complete for Recall@5
    def near(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs() <= 1

    calc = RetrievalAccuracyCalculator(
        recall_ks=(5,), label_comparison_fn=near, exclude=("AMI", "NMI")
    )
    query_labels = torch.tensor([0, 1, 2, 9])
    reference_labels = torch.tensor([0, 1, 2])
    knn_labels = torch.tensor([[2, 1, 0], [0, 2, 1], [0, 1, 2], [0, 1, 2]])
    counts = (torch.tensor([0, 1, 2, 9]), torch.tensor([2, 3, 2, 0]))
    kwargs = _kwargs(knn_labels, query_labels, counts, reference_labels=reference_labels)
    kwargs["not_lone_query_mask"] = torch.tensor([True, True, True, False])
    assert calc.calculate_recall_at_5(**kwargs) == 1.0
    # the reference set including the queries: one fewer neighbour is enough
    kwargs.update(knn_labels=knn_labels[:, :2], ref_includes_query=True)
    assert calc.calculate_recall_at_5(**kwargs) == 1.0
    with pytest.raises(ValueError, match="holds 1"):
        calc.calculate_recall_at_5(**{**kwargs, "knn_labels": knn_labels[:, :1]})
