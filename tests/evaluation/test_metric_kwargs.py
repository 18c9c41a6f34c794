"""Direct ``calculate_*`` calls with PML's keyword arguments: checked as get_accuracy's."""

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_margins.evaluation import RetrievalAccuracyCalculator


def _kwargs(num: int = 30) -> dict:
    g = torch.Generator().manual_seed(13)
    labels = torch.randint(0, 4, (num,), generator=g)
    unique, counts = torch.unique(labels, return_counts=True)
    return {
        "knn_labels": torch.randint(0, 4, (num, 10), generator=g),
        "query_labels": labels,
        "not_lone_query_mask": torch.ones(num, dtype=torch.bool),
        "ref_includes_query": True,
        "label_counts": (unique, counts),
    }


METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("length", [5, 50])
def test_a_mask_of_another_length_is_refused(metric, length):
    # all True, it was taken without a look at its length (PML: an IndexError)
    kwargs = {**_kwargs(), "not_lone_query_mask": torch.ones(length, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"not_lone_query_mask .* one boolean per query \(30\)"):
        getattr(RetrievalAccuracyCalculator(), f"calculate_{metric}")(**kwargs)


@pytest.mark.parametrize("metric", METRICS)
def test_label_counts_as_any_pair_pml_reads(metric):
    kwargs = _kwargs()
    unique, counts = kwargs["label_counts"]
    expected = getattr(AccuracyCalculator(), f"calculate_{metric}")(**kwargs)
    for pair in ([unique, counts], torch.stack([unique, counts]), (unique.tolist(), counts)):
        got = getattr(RetrievalAccuracyCalculator(), f"calculate_{metric}")(
            **{**kwargs, "label_counts": pair}
        )
        assert got == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("metric", METRICS)
def test_a_mask_as_a_list_or_of_indices_is_read_as_pml_reads_it(metric):
    kwargs = _kwargs()
    mask = [bool(i % 3) for i in range(30)]
    for given in (mask, np.array(mask), torch.tensor(mask).nonzero().squeeze(1)):
        changed = {**kwargs, "not_lone_query_mask": given}
        pml = {**kwargs, "not_lone_query_mask": torch.as_tensor(given)}
        got = getattr(RetrievalAccuracyCalculator(), f"calculate_{metric}")(**changed)
        expected = getattr(AccuracyCalculator(), f"calculate_{metric}")(**pml)
        assert got == pytest.approx(expected, abs=1e-7)
    # integer indices 1, 2, 3 hold no 0: "all kept" was read from them (every row)
    rows = torch.tensor([1, 2, 3])
    got = getattr(RetrievalAccuracyCalculator(), f"calculate_{metric}")(
        **{**kwargs, "not_lone_query_mask": rows}
    )
    expected = getattr(AccuracyCalculator(), f"calculate_{metric}")(
        **{**kwargs, "not_lone_query_mask": rows}
    )
    assert got == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"ref_includes_query": None}, TypeError, "ref_includes_query must be a bool"),
        ({"ref_includes_query": "yes"}, TypeError, "ref_includes_query must be a bool"),
        ({"not_lone_query_mask": torch.ones(30)}, TypeError, "must hold booleans"),
        ({"label_counts": (torch.arange(4), torch.ones(2))}, ValueError, "4 labels"),
        ({"label_counts": torch.arange(4)}, TypeError, "label_counts must be a pair"),
        ({"query_labels": torch.zeros(30, 1).long()}, ValueError, "labels of one shape"),
        ({"query_labels": np.zeros(30, dtype=np.int64)}, TypeError, "query_labels must be"),
        ({"knn_labels": torch.zeros(29, 10).long()}, ValueError, "one row per query label"),
    ],
)
def test_arguments_that_cannot_be_read_are_named(change, error, message):
    kwargs = {**_kwargs(), **change}
    for metric in METRICS:
        with pytest.raises(error, match=message):
            getattr(RetrievalAccuracyCalculator(), f"calculate_{metric}")(**kwargs)
