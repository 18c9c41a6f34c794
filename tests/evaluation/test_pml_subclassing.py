"""What a PML user's subclass or k-nn does, the calculator does as PML does: metrics that
call the parent's ``calculate_*`` on their own neighbour lists or labels, a subclass's own
``calculate_recall_at_K``, subclasses of PML's k-nn classes, float32 inputs for a user's
k-nn and metrics, PML's call shapes for a label comparison, PML's ``k`` whatever else is
asked, and zero-width embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN, FaissKNN

from pml_margins.evaluation import RetrievalAccuracyCalculator

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("quiet_pml_logging")


def _data(n=60, d=4, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _both(make, x, y, **kwargs):
    ours = make(RetrievalAccuracyCalculator)(**kwargs).get_accuracy(x, y)
    pml = make(AccuracyCalculator)(device=CPU, **kwargs).get_accuracy(x, y)
    return ours, pml


def _reranked(base):
    class Reranked(base):
        def calculate_p1_skip_first(self, knn_labels, **kwargs):
            return self.calculate_precision_at_1(knn_labels=knn_labels[:, 1:], **kwargs)

        def calculate_p1_superclass(self, knn_labels, query_labels, **kwargs):
            return self.calculate_precision_at_1(
                knn_labels=knn_labels // 2, query_labels=query_labels // 2, **kwargs
            )

        def calculate_map_r_skip_first(self, knn_labels, **kwargs):
            return self.calculate_mean_average_precision_at_r(
                knn_labels=knn_labels[:, 1:], **kwargs
            )

        def requires_knn(self):
            return [*super().requires_knn(), "p1_skip_first", "p1_superclass", "map_r_skip_first"]

    return Reranked


def test_metrics_on_their_own_knn_labels_or_labels():
    x, y = _data()
    include = ("precision_at_1", "p1_skip_first", "p1_superclass", "map_r_skip_first")
    ours, pml = _both(_reranked, x, y, include=include, k=5)
    assert ours == pytest.approx(pml)
    assert ours["p1_skip_first"] != ours["precision_at_1"]


def _own_recall(base):
    class OwnRecall(base):
        def calculate_recall_at_4(self, knn_labels, query_labels, **_):
            return float((knn_labels[:, :4] == query_labels[:, None]).float().mean())

        def requires_knn(self):
            return [*super().requires_knn(), "recall_at_4"]

    return OwnRecall


def test_a_subclass_keeps_its_own_recall_at_k():
    x, y = _data()
    ours, pml = _both(_own_recall, x, y, include=("recall_at_4",))
    assert ours == pytest.approx(pml)
    assert ours["recall_at_4"] < 0.5  # not the papers' Recall@4, which is ~0.8 here


class WhitenedKNN(CustomKNN):
    """A user's k-nn: standardize each dimension, then search."""

    def __call__(self, query, k, reference, ref_includes_query=False):
        mu, sd = reference.mean(0), reference.std(0)
        return super().__call__((query - mu) / sd, k, (reference - mu) / sd, ref_includes_query)


class CountingFaissKNN(FaissKNN):
    calls = 0

    def __call__(self, *args, **kwargs):
        CountingFaissKNN.calls += 1
        return super().__call__(*args, **kwargs)


def test_subclasses_of_pmls_knn_classes_run_as_given():
    x, y = _data(d=3)
    x = x * torch.tensor([100.0, 1.0, 1.0])
    include = ("precision_at_1", "mean_average_precision_at_r")
    knn = WhitenedKNN(LpDistance(normalize_embeddings=False))
    ours = RetrievalAccuracyCalculator(include=include, knn_func=knn).get_accuracy(x, y)
    pml = AccuracyCalculator(include=include, knn_func=knn, device=CPU).get_accuracy(x, y)
    assert ours == pytest.approx(pml)
    plain = RetrievalAccuracyCalculator(include=include).get_accuracy(x, y)
    assert ours != pytest.approx(plain)
    before = CountingFaissKNN.calls
    RetrievalAccuracyCalculator(include=include, knn_func=CountingFaissKNN()).get_accuracy(x, y)
    assert CountingFaissKNN.calls == before + 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_users_knn_gets_float32_as_in_pml(dtype):
    x, y = _data(n=40, seed=9)
    x = x.to(dtype)
    seen = []

    def user_knn(q, k, r, ref_includes_query=False):
        seen.append((q.dtype, r.dtype))
        return CustomKNN(LpDistance(p=1))(q, k, r, ref_includes_query)

    include = ("mean_average_precision_at_r", "precision_at_1")
    ours = RetrievalAccuracyCalculator(include=include, knn_func=user_knn).get_accuracy(x, y)
    pml = AccuracyCalculator(include=include, knn_func=user_knn, device=CPU).get_accuracy(x, y)
    assert ours == pytest.approx(pml)
    assert set(seen) == {(torch.float32, torch.float32)}


def _pair_metrics(base):
    class PairMetrics(base):
        def calculate_mean_pair_distance(self, query, reference, **_):
            return float(torch.cdist(query, reference).mean())

        def calculate_spread(self, query, **_):
            return float(query.std())

        def requires_knn(self):
            return [*super().requires_knn(), "mean_pair_distance", "spread"]

    return PairMetrics


@pytest.mark.parametrize("as_numpy", [False, True])
def test_metrics_get_float32_embeddings_as_in_pml(as_numpy):
    x, y = torch.arange(60).reshape(20, 3), torch.arange(20) % 4
    x = x.numpy() if as_numpy else x
    ours, pml = _both(_pair_metrics, x, y, include=("mean_pair_distance", "spread"))
    assert ours == pytest.approx(pml)


def test_a_label_comparison_gets_pmls_call_shapes():
    def same_family(a, b):  # written against PML's calls: a expands to b's shape
        a = a.expand_as(b)
        return a[..., 0] == b[..., 0]

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30, 2), generator=g)
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    ours = RetrievalAccuracyCalculator(include=include, label_comparison_fn=same_family)
    pml = AccuracyCalculator(include=include, label_comparison_fn=same_family, device=CPU)
    assert ours.get_accuracy(x, y) == pytest.approx(pml.get_accuracy(x, y))


def test_pmls_k_of_zero_whatever_else_is_asked():
    def partner(a, b):  # PML's docs' non-reflexive comparison: one partner per sample
        return (a[..., 0] == b[..., 0]) & (a[..., 1] != b[..., 1])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g)
    y = torch.stack([torch.arange(20) // 2, torch.arange(20) % 2], 1)
    include = ("precision_at_1", "r_precision")
    kwargs = {"k": "max_bin_count", "label_comparison_fn": partner}
    pml = AccuracyCalculator(include=include, device=CPU, **kwargs).get_accuracy(x, y)
    for extra in ((), ("recall_at_8",)):
        calc = RetrievalAccuracyCalculator(include=include + extra, **kwargs)
        got = calc.get_accuracy(x, y)
        assert {m: got[m] for m in include} == pytest.approx(pml, nan_ok=True)


@pytest.mark.parametrize("k", [None, "max_bin_count", 3])
def test_zero_width_embeddings_tie_everywhere_as_in_pml(k):
    x, y = torch.zeros(100, 0), torch.arange(100) % 10
    include = ("precision_at_1", "mean_average_precision_at_r", "r_precision")
    ours = RetrievalAccuracyCalculator(include=include, k=k).get_accuracy(x, y)
    pml = AccuracyCalculator(include=include, k=k, device=CPU).get_accuracy(x, y)
    assert ours == pytest.approx(pml)


def test_k_true_is_refused_at_construction():
    with pytest.raises(TypeError, match="k must be a positive int"):
        RetrievalAccuracyCalculator(k=True)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_users_knn_gives_pmls_metrics_whatever_recall_is_asked(k):
    """PML's metrics come from a call at PML's k: a user's k-nn (here SNR, which ties on
    integer data) need not list at depth k the start of its depth-8 list."""
    from pytorch_metric_learning.distances import SNRDistance

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (400, 4), generator=g).float()
    y = torch.randint(0, 20, (400,), generator=g)
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    knn = CustomKNN(SNRDistance())
    pml = AccuracyCalculator(include=include, knn_func=knn, k=k, device=CPU).get_accuracy(x, y)
    calc = RetrievalAccuracyCalculator(include=(*include, "recall_at_8"), knn_func=knn, k=k)
    got = calc.get_accuracy(x, y)
    assert {m: got[m] for m in include} == pytest.approx(pml)
    recall = RetrievalAccuracyCalculator(include=("recall_at_8",), knn_func=knn).get_accuracy(x, y)
    assert got["recall_at_8"] == recall["recall_at_8"]


def test_public_metrics_take_label_counts_in_any_order():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    knn_labels = torch.tensor(
        [[0, 1, 1], [1, 0, 2], [1, 1, 0], [1, 0, 1], [2, 1, 1], [2, 0, 0], [1, 2, 0]]
    )
    kwargs = {
        "knn_labels": knn_labels,
        "query_labels": labels,
        "not_lone_query_mask": torch.ones(7, dtype=torch.bool),
        "ref_includes_query": True,
        "label_comparison_fn": torch.eq,
    }
    pml = AccuracyCalculator(k=3, device=CPU)
    ours = RetrievalAccuracyCalculator(k=3)
    for counts in ((torch.tensor([0, 1, 2]), torch.tensor([2, 3, 2])),
                   (torch.tensor([2, 0, 1]), torch.tensor([2, 2, 3]))):  # fmt: skip
        for metric in ("r_precision", "mean_average_precision_at_r", "mean_average_precision"):
            want = getattr(pml, f"calculate_{metric}")(label_counts=counts, **kwargs)
            got = getattr(ours, f"calculate_{metric}")(label_counts=counts, **kwargs)
            assert got == pytest.approx(want), (metric, counts)


class HardCodedKnnList(RetrievalAccuracyCalculator):
    """A PML-style subclass listing requires_knn itself, without super()."""

    def calculate_p2(self, knn_labels, query_labels, **_):
        return float((knn_labels[:, :2] == query_labels[:, None]).double().mean())

    def requires_knn(self):
        return ["precision_at_1", "mean_average_precision", "mean_average_precision_at_r",
                "r_precision", "p2"]  # fmt: skip


@pytest.mark.parametrize(
    "include", [("recall_at_1",), ("num_excluded_queries",), ("recall_at_1", "NMI")]
)
def test_our_metrics_run_the_knn_when_a_subclass_lists_requires_knn_itself(include):
    x, y = _data(n=20, d=3)
    got = HardCodedKnnList(include=include).get_accuracy(x, y)
    want = RetrievalAccuracyCalculator(include=include).get_accuracy(x, y)
    assert got == pytest.approx(want)


def test_uint64_labels_beyond_int64_and_bad_arguments_are_refused():
    labels = np.array([0, 0, 2**63 + 5, 2**63 + 5], dtype=np.uint64)
    with pytest.raises(ValueError, match="uint64 values beyond int64"):
        RetrievalAccuracyCalculator().get_accuracy(torch.randn(4, 2), labels)
    for bad in ("precision_at_1", {"precision_at_1"}):
        with pytest.raises(TypeError, match="include must be a tuple or list"):
            RetrievalAccuracyCalculator(include=bad)
    for name, value in (("block_rows", 0), ("num_threads", "x")):
        with pytest.raises(ValueError, match=f"{name} must be (a positive|an) integer"):
            RetrievalAccuracyCalculator(**{name: value})


def test_public_metrics_with_non_contiguous_labels_raise_no_warning():
    import warnings

    labels2d = torch.tensor([[0, 9], [0, 9], [1, 9], [1, 9]])
    kwargs = {
        "knn_labels": torch.tensor([[0], [1], [1], [0]]),
        "query_labels": labels2d[:, 0],
        "not_lone_query_mask": torch.ones(4, dtype=torch.bool),
        "label_counts": (torch.tensor([0, 1]), torch.tensor([2, 2])),
        "ref_includes_query": True,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RetrievalAccuracyCalculator().calculate_r_precision(**kwargs) == 0.5


def test_public_metrics_take_pmls_positional_arguments():
    """PML's signatures, e.g. calculate_r_precision(knn_labels, query_labels,
    not_lone_query_mask, ref_includes_query, label_counts): a subclass may call them so."""
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    knn_labels = torch.tensor(
        [[0, 1, 1], [1, 0, 2], [1, 1, 0], [1, 0, 1], [2, 1, 1], [2, 0, 0], [1, 2, 0]]
    )
    mask = torch.ones(7, dtype=torch.bool)
    counts = (torch.tensor([0, 1, 2]), torch.tensor([2, 3, 2]))
    pml, ours = AccuracyCalculator(k=3, device=CPU), RetrievalAccuracyCalculator(k=3)
    at_1 = (knn_labels, labels, mask, counts)
    at_r = (knn_labels, labels, mask, True, counts)
    for metric, args in (("precision_at_1", at_1), ("mean_reciprocal_rank", at_1),
                         ("r_precision", at_r), ("mean_average_precision_at_r", at_r),
                         ("mean_average_precision", at_r)):  # fmt: skip
        want = getattr(pml, f"calculate_{metric}")(*args, label_comparison_fn=torch.eq)
        got = getattr(ours, f"calculate_{metric}")(*args, label_comparison_fn=torch.eq)
        assert got == pytest.approx(want), metric
    with pytest.raises(TypeError, match="multiple values for 'knn_labels'"):
        ours.calculate_precision_at_1(knn_labels, knn_labels=knn_labels)


def test_a_float32_query_against_float64_extremes_is_refused_on_every_path():
    x = torch.randn(3, 4)
    r = torch.full((5, 4), 1e300, dtype=torch.float64)
    r[0] = 0
    with pytest.raises(ValueError, match="outside"):
        RetrievalAccuracyCalculator(include=("precision_at_1",)).get_accuracy(
            x, torch.tensor([0, 0, 0]), r, torch.tensor([0, 1, 1, 1, 1])
        )
