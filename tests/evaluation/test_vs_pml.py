"""Equality with PML's AccuracyCalculator on every shared metric."""

import pytest
import torch
from conftest import make_data
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_margins.evaluation import RetrievalAccuracyCalculator

CPU = torch.device("cpu")
KNN_METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)


LAYOUTS = ("self", "separate", "prefix")


def sets(layout: str, kind: str):
    x, y = make_data(kind, 240, 12, 9, seed=10 * LAYOUTS.index(layout) + (kind == "clustered"))
    if layout == "self":
        return (x, y), {}
    if layout == "separate":  # one query label (99) absent from the reference
        y = y.clone()
        y[:3] = 99
        return (x[:90], y[:90]), {"reference": x[90:], "reference_labels": y[90:]}
    # prefix: the reference starts with the query
    return (x[:90], y[:90]), {"reference": x, "reference_labels": y, "ref_includes_query": True}


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [None, "max_bin_count", 7])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("mode", ["mean", "avg_of_avgs", "return_per_class"])
def test_equal_to_pml(kind, layout, k, cosine, mode):
    (q, ql), ref = sets(layout, kind)
    flags = {"avg_of_avgs": mode == "avg_of_avgs", "return_per_class": mode == "return_per_class"}
    knn = CustomKNN(CosineSimilarity()) if cosine else None
    pml = AccuracyCalculator(include=KNN_METRICS, k=k, device=CPU, knn_func=knn, **flags)
    ours = RetrievalAccuracyCalculator(include=KNN_METRICS, k=k, knn_func=knn, **flags)
    expected = pml.get_accuracy(q, ql, **ref)
    got = ours.get_accuracy(q, ql, **ref)
    assert set(got) == set(expected)
    for name in KNN_METRICS:
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name


def test_clustering_metrics_equal_to_pml():
    x, y = make_data("clustered", 400, 8, 5, seed=4)
    pml = AccuracyCalculator(include=("NMI", "AMI"), device=CPU).get_accuracy(x, y)
    ours = RetrievalAccuracyCalculator(include=("NMI", "AMI")).get_accuracy(x, y)
    assert ours == pytest.approx(pml)
    assert ours["NMI"] > 0.5  # clustered data: the metric is not trivially 0


def test_works_inside_pml_tester():
    from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester

    x, y = make_data("clustered", 120, 6, 4, seed=5)
    dataset = torch.utils.data.TensorDataset(x, y)
    calc = RetrievalAccuracyCalculator(include=("precision_at_1", "recall_at_2"))
    tester = GlobalEmbeddingSpaceTester(
        accuracy_calculator=calc, dataloader_num_workers=0, data_device=CPU
    )
    acc = tester.test({"val": dataset}, 0, torch.nn.Identity())
    assert acc["val"]["precision_at_1_level0"] > 0.5
    assert 0 < acc["val"]["recall_at_2_level0"] <= 1
