"""Inputs that pass the checks but leave float32's (or float64's squared) range, and PML's
documented ``calculate_*`` keywords, found by an independent review: each gives the value
of the same data at an ordinary scale, PML's value, or a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance, SNRDistance
from pytorch_metric_learning.utils.accuracy_calculator import (
    EQUALITY,
    AccuracyCalculator,
    get_label_match_counts,
    get_lone_query_labels,
)
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_margins.evaluation import RetrievalAccuracyCalculator, exact_knn

CLUSTERING = ("NMI", "AMI")


def _data(n=60, d=4, classes=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, classes, (n,), generator=g)


def _clustering(x, y):
    torch.manual_seed(0)  # faiss's k-means seed comes from torch's RNG in PML
    return RetrievalAccuracyCalculator(include=CLUSTERING).get_accuracy(x, y)


@pytest.mark.parametrize(
    ("dtype", "exponent"),
    [(torch.float32, 70), (torch.float32, -100), (torch.float64, 170), (torch.float64, -140)],
    ids=["f32-1e21", "f32-1e-30", "f64-1e51", "f64-1e-42"],
)
def test_clustering_metrics_do_not_depend_on_the_scale(dtype, exponent):
    """faiss's float32 k-means overflowed (float32 x 1e21: the process aborted; float64
    x 1e51: a float32 copy of inf) or underflowed (x 1e-30: NMI 0.0); k-means is
    scale-equivariant, so the clusters of x 2^e are those of x: the same NMI and AMI."""
    x, y = _data(dtype=dtype)
    expected = _clustering(x, y)
    assert expected["NMI"] > 0.05
    assert _clustering(torch.ldexp(x, torch.tensor(exponent)), y) == expected


def test_clustering_metrics_keep_pmls_values_in_the_ordinary_range():
    x, y = _data()
    torch.manual_seed(0)
    pml = AccuracyCalculator(include=CLUSTERING).get_accuracy(x, y)
    assert _clustering(x, y) == pytest.approx(pml)


class _RecordingKMeans:
    """A user's ``kmeans_func``: records what it gets, clusters by sign of the first column."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, num_clusters):
        self.seen.append(x)
        return (x[:, 0] > 0).long()


@pytest.mark.parametrize("exponent", [60, -60, 0])
def test_a_users_kmeans_func_gets_pmls_input(exponent):
    """Only our default faiss k-means gets rescaled input: a user's ``kmeans_func`` (a
    threshold in the data's units, DBSCAN's eps say) and a subclass's
    ``get_cluster_labels`` get the float32 embeddings as PML hands them."""
    x, y = _data()
    x = torch.ldexp(x, torch.tensor(exponent))
    ours, pml = _RecordingKMeans(), _RecordingKMeans()
    got = RetrievalAccuracyCalculator(include=("NMI",), kmeans_func=ours).get_accuracy(x, y)
    expected = AccuracyCalculator(include=("NMI",), kmeans_func=pml).get_accuracy(x, y)
    assert got == pytest.approx(expected)
    assert torch.equal(ours.seen[0], pml.seen[0])

    class Subclass(RetrievalAccuracyCalculator):
        def get_cluster_labels(self, query, query_labels, **kwargs):
            self.seen = (query, kwargs["reference"])
            return super().get_cluster_labels(query, query_labels, **kwargs)

    calc = Subclass(include=("NMI",))
    calc.get_accuracy(x, y)
    query, reference = calc.seen
    assert torch.equal(query, x) and query is reference


def test_zero_width_embeddings_are_one_cluster():
    """Zero-width embeddings (accepted: every point is the same) killed the process in
    faiss (a division by the width); the k-means now sees identical points: one cluster."""
    _, y = _data()
    result = _clustering(torch.zeros(len(y), 0), y)
    assert result == {"NMI": 0.0, "AMI": 0.0}
    assert result == _clustering(torch.zeros(len(y), 3), y)


@pytest.mark.parametrize("k", [3, 59], ids=["candidates", "whole-lists"])
@pytest.mark.parametrize("metric", ["dot", "euclidean"])
def test_normalized_float64_rows_whose_squares_overflow(k, metric):
    """|x| > 1.3e154 in float64: the row norm was inf, every normalized row 0, and every
    pair tied (lists in index order). Scaled by a power of two the normalized rows are the
    same bits, so the lists and values must be exactly those of x."""
    x, _ = _data(dtype=torch.float64)
    big = torch.ldexp(x, torch.tensor(520))  # ~3e156
    expected = exact_knn(x, x, k, metric=metric, normalize=True, exclude_self=True)
    got = exact_knn(big, big, k, metric=metric, normalize=True, exclude_self=True)
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0], expected[0])


def test_normalized_float64_rows_whose_norm_exceeds_float64():
    """Every coordinate finite, the norm beyond float64's largest (1.8e308): the row was
    still 0 after normalizing; divided by its own scaled norm it is x / |x|, bit for bit."""
    x, _ = _data(dtype=torch.float64)
    x = x.clamp(-1.9, 1.9)
    huge = torch.ldexp(x, torch.tensor(1023))  # finite; |row| > 1.8e308
    assert torch.isfinite(huge).all()
    for k in (3, 59):
        expected = exact_knn(x, x, k, metric="dot", normalize=True, exclude_self=True)
        got = exact_knn(huge, huge, k, metric="dot", normalize=True, exclude_self=True)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


@pytest.mark.parametrize("distance", [CosineSimilarity(), LpDistance()], ids=["cos", "lp"])
def test_calculator_normalizing_distances_on_huge_float64_rows(distance):
    x, y = _data(dtype=torch.float64)
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    calc = RetrievalAccuracyCalculator(include=include, distance=distance)
    assert calc.get_accuracy(torch.ldexp(x, torch.tensor(520)), y) == calc.get_accuracy(x, y)


def test_a_knn_func_never_gets_infinite_float32_copies():
    """A knn_func gets float32 embeddings (as in PML); finite float64 values beyond float32
    became +-inf there and the metrics were silently wrong: a ValueError says so."""
    x, y = _data(dtype=torch.float64)
    calc = RetrievalAccuracyCalculator(
        include=("precision_at_1",), knn_func=CustomKNN(SNRDistance())
    )
    assert 0 <= calc.get_accuracy(x, y)["precision_at_1"] <= 1
    with pytest.raises(ValueError, match=r"query's values .* are outside float32's range"):
        calc.get_accuracy(x * 1e50, y)
    with pytest.raises(ValueError, match=r"query's values .* are outside float32's range"):
        calc.get_accuracy(x * 1e-50, y)  # all 0 in float32
    with pytest.raises(ValueError, match=r"reference's values .* are outside float32's range"):
        calc.get_accuracy(x, y, x * 1e50, y, ref_includes_query=False)
    tiny = calc.get_accuracy(x * 1e-30, y)  # float32 holds them: PML's input, unrefused
    assert 0 <= tiny["precision_at_1"] <= 1


def _pml_kwargs(seed=1, queries=12, k=20):
    g = torch.Generator().manual_seed(seed)
    query_labels = torch.randint(0, 4, (queries,), generator=g).float()
    knn_labels = torch.randint(0, 4, (queries, k), generator=g).float()
    reference_labels = torch.cat([query_labels, torch.randint(0, 4, (10,), generator=g).float()])
    counts = get_label_match_counts(query_labels, reference_labels, EQUALITY)
    _, mask = get_lone_query_labels(query_labels, counts, True, EQUALITY)
    kwargs = {
        "knn_labels": knn_labels,
        "query_labels": query_labels,
        "not_lone_query_mask": mask,
        "ref_includes_query": True,
    }
    return kwargs, counts


@pytest.mark.parametrize(
    "metric",
    [
        "precision_at_1",
        "r_precision",
        "mean_average_precision_at_r",
        "mean_average_precision",
        "mean_reciprocal_rank",
    ],
)
def test_calculate_methods_take_label_counts_as_sequences(metric):
    """PML only zips ``label_counts``: a pair of lists works there, and here."""
    kwargs, (unique, counts) = _pml_kwargs()
    lists = (unique.tolist(), counts.tolist())
    pml = getattr(AccuracyCalculator(), f"calculate_{metric}")(**kwargs, label_counts=lists)
    ours = getattr(RetrievalAccuracyCalculator(), f"calculate_{metric}")
    assert ours(**kwargs, label_counts=lists) == pytest.approx(pml)
    assert ours(**kwargs, label_counts=(unique, counts)) == pytest.approx(pml)


@pytest.mark.parametrize(
    ("metric", "missing"),
    [
        ("precision_at_1", "label_counts"),
        ("mean_reciprocal_rank", "not_lone_query_mask"),
        ("r_precision", "ref_includes_query"),
        ("mean_average_precision_at_r", "ref_includes_query"),
        ("mean_average_precision", "knn_labels"),
    ],
)
def test_calculate_methods_require_pmls_arguments(metric, missing):
    """An argument PML's signature requires, left out: PML's TypeError naming it (a
    missing ``ref_includes_query`` was taken for False, a different value, silently)."""
    kwargs, counts = _pml_kwargs()
    kwargs = {**kwargs, "label_counts": counts}
    del kwargs[missing]
    for calc in (AccuracyCalculator(), RetrievalAccuracyCalculator()):
        with pytest.raises(TypeError, match=missing):
            getattr(calc, f"calculate_{metric}")(**kwargs)


def test_numpy_inputs_pml_cannot_wrap():
    x, y = _data()
    array, labels = x.numpy(), y.numpy()
    calc = RetrievalAccuracyCalculator(include=("precision_at_1", "r_precision"))
    reversed_view = array[::-1]  # negative strides: torch.from_numpy refuses them
    assert calc.get_accuracy(reversed_view, labels[::-1]) == calc.get_accuracy(
        np.ascontiguousarray(reversed_view), np.ascontiguousarray(labels[::-1])
    )
    if np.dtype(np.longdouble).itemsize > 8:  # (where long double is wider than float64)
        with pytest.raises(TypeError, match="query must be float16, float32 or float64"):
            calc.get_accuracy(array.astype(np.longdouble), labels)


def test_an_unknown_device_is_a_value_error():
    with pytest.raises(ValueError, match=r"device must name an available torch device.*'bogus'"):
        RetrievalAccuracyCalculator(device="bogus")
    with pytest.raises(TypeError, match=r"device must be a str or torch\.device"):
        RetrievalAccuracyCalculator(device=1.5)
    for index in (0, np.int64(0)):  # an accelerator index, as torch.device takes it
        try:
            torch.device(index)
        except RuntimeError as error:  # no accelerator: torch's reason, in a ValueError
            with pytest.raises(ValueError, match="device must name an available"):
                RetrievalAccuracyCalculator(device=index)
            assert str(error)
        else:
            assert RetrievalAccuracyCalculator(device=index).device is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_string_is_refused_at_construction():
    """'cuda' on a CPU build constructed, then the first get_accuracy failed in torch."""
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"device must name an available .*'cuda"):
            RetrievalAccuracyCalculator(device=device)


@pytest.mark.parametrize("device", ["meta", "hpu", "privateuseone"])
def test_devices_without_values_or_modules_are_value_errors(device):
    """'hpu' and 'privateuseone' raised ModuleNotFoundError; 'meta' constructed and the
    first get_accuracy failed inside torch (review)."""
    with pytest.raises(ValueError, match="device"):
        RetrievalAccuracyCalculator(device=device)
