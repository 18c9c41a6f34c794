"""Corners found by review (2026-12-01, third session): a ``knn_func`` that keeps state
between calls, and a distance or ``knn_func`` changed in place after it was given."""

from __future__ import annotations

import faiss
import pytest
import torch
from pytorch_metric_learning.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SNRDistance,
)
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN, FaissKNN

from pml_margins.distributed import ShardedRetrievalAccuracyCalculator
from pml_margins.evaluation import RetrievalAccuracyCalculator

CPU = torch.device("cpu")


def _data(seed: int, rows: int = 60, width: int = 8, classes: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * torch.rand(rows, 1, generator=g) * 5
    return x, torch.randint(0, classes, (rows,), generator=g)


def _own_index(width: int, reset_after: bool) -> FaissKNN:
    knn = FaissKNN(reset_before=False, reset_after=reset_after)
    knn.index = faiss.IndexFlatL2(width)
    return knn


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("k", [1, 3, "max_bin_count"])
def test_a_faiss_knn_with_its_own_index_is_called_once(reset_after, k):
    # Recall@8 needs deeper lists than PML's k: a second call found no index (reset_after)
    # or one holding the reference twice (indices past the labels)
    x, y = _data(19)
    include = ("precision_at_1", "r_precision", "recall_at_8")
    calls: list[int] = []
    wrapped = _Counted(_own_index(8, reset_after), calls)
    got = RetrievalAccuracyCalculator(include=include, k=k, knn_func=wrapped).get_accuracy(x, y)
    assert len(calls) == 1
    pml = AccuracyCalculator(include=include[:2], k=k, device=CPU, knn_func=_own_index(8, True))
    want = pml.get_accuracy(x, y)
    assert {m: got[m] for m in want} == pytest.approx(want)
    alone = RetrievalAccuracyCalculator(include=("recall_at_8",), knn_func=_own_index(8, True))
    assert got["recall_at_8"] == alone.get_accuracy(x, y)["recall_at_8"]


class _Counted(FaissKNN):
    """The same search, counting its calls (a FaissKNN subclass: runs as PML's)."""

    def __init__(self, inner: FaissKNN, calls: list) -> None:
        super().__init__(reset_before=inner.reset_before, reset_after=inner.reset_after)
        self.index, self._calls = inner.index, calls

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        self._calls.append(k)
        return super().__call__(query, k, reference, ref_includes_query)


def test_other_knn_funcs_still_give_pmls_metrics_from_a_call_at_pmls_k():
    x, y = _data(1)
    x = x.round()  # ties: a list at depth 1 need not start the depth-8 one
    include = ("precision_at_1",)
    knn = CustomKNN(SNRDistance())
    pml = AccuracyCalculator(include=include, knn_func=knn, k=1, device=CPU).get_accuracy(x, y)
    calc = RetrievalAccuracyCalculator(include=(*include, "recall_at_8"), knn_func=knn, k=1)
    assert calc.get_accuracy(x, y)["precision_at_1"] == pytest.approx(pml["precision_at_1"])


def _pml_and_ours(knn_func_of):
    pml = AccuracyCalculator(include=("precision_at_1",), knn_func=knn_func_of(), device=CPU)
    ours = RetrievalAccuracyCalculator(include=("precision_at_1",), knn_func=knn_func_of())
    return pml, ours


def test_a_custom_knn_whose_distance_is_replaced_in_place_is_searched_anew():
    x, y = _data(16, rows=40, width=5, classes=4)
    pml, ours = _pml_and_ours(lambda: CustomKNN(LpDistance(normalize_embeddings=False)))
    assert ours.get_accuracy(x, y) == pytest.approx(pml.get_accuracy(x, y))
    for calc in (pml, ours):
        calc.knn_func.distance = DotProductSimilarity(normalize_embeddings=False)
    want = pml.get_accuracy(x, y)
    assert ours.get_accuracy(x, y) == pytest.approx(want)
    dot = RetrievalAccuracyCalculator(
        include=("precision_at_1",), distance=DotProductSimilarity(normalize_embeddings=False)
    )
    assert want == pytest.approx(dot.get_accuracy(x, y))  # (the test can tell them apart)
    assert ours.get_accuracy(x, y) != RetrievalAccuracyCalculator(
        include=("precision_at_1",), distance=LpDistance(normalize_embeddings=False)
    ).get_accuracy(x, y)


def test_a_distance_changed_in_place_is_searched_anew():
    x, y = _data(16, rows=40, width=5, classes=4)
    d = LpDistance(normalize_embeddings=False)
    ours = RetrievalAccuracyCalculator(include=("precision_at_1",), distance=d)
    raw = ours.get_accuracy(x, y)
    d.normalize_embeddings = True
    pml = AccuracyCalculator(include=("precision_at_1",), knn_func=CustomKNN(d), device=CPU)
    want = pml.get_accuracy(x, y)
    assert raw != want and ours.get_accuracy(x, y) == pytest.approx(want)
    assert ours.exact == ("euclidean", True)


def test_a_faiss_knn_reset_changed_in_place_is_searched_anew():
    x, y = _data(3)
    knn = FaissKNN(reset_before=True)
    ours = RetrievalAccuracyCalculator(include=("precision_at_1",), knn_func=knn)
    ours.get_accuracy(x, y)
    assert ours._custom_knn is None  # the exact search
    knn.reset_before, knn.index = False, faiss.IndexFlatL2(8)
    ours.get_accuracy(x, y)
    assert ours._custom_knn is knn  # now its own index, searched as PML searches it


def test_a_sharded_calculator_refuses_a_distance_changed_in_place_to_one_it_cannot_run():
    x, y = _data(4)
    d = LpDistance()
    calc = ShardedRetrievalAccuracyCalculator(include=("precision_at_1",), distance=d)
    before = calc.get_accuracy(x, y)
    d.p = 1
    with pytest.raises(ValueError, match=r"got LpDistance\(p=1"):
        calc.get_accuracy(x, y)
    assert calc.exact == ("euclidean", True)  # a refused search changes nothing
    d.p = 2
    assert calc.get_accuracy(x, y) == before


def test_a_later_setting_is_checked_against_the_search_as_it_is_now():
    knn = FaissKNN(reset_before=False)
    knn.index = faiss.IndexFlatL2(6)
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",), knn_func=knn)
    with pytest.raises(ValueError, match="leave backend='auto'"):
        calc.backend = "faiss"  # its own index: run as PML's, which takes no backend
    knn.reset_before = True  # now the exact search, whose backend may be chosen
    calc.backend = "faiss"
    assert calc.backend == "faiss" and calc._custom_knn is None


@pytest.mark.parametrize("make", [LpDistance, lambda: CosineSimilarity()])
def test_a_distance_inverted_in_place_ranks_the_other_way_as_in_pml(make):
    x, y = _data(3, rows=40, width=5, classes=4)
    d = make()
    ours = RetrievalAccuracyCalculator(include=("precision_at_1",), distance=d)
    before = ours.get_accuracy(x, y)
    d.is_inverted = not d.is_inverted
    pml = AccuracyCalculator(include=("precision_at_1",), knn_func=CustomKNN(d), device=CPU)
    want = pml.get_accuracy(x, y)
    assert want != before and ours.get_accuracy(x, y) == pytest.approx(want)


def test_a_search_broken_in_place_can_still_be_replaced_and_other_settings_taken():
    knn = CustomKNN(LpDistance())
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",), knn_func=knn)
    knn.distance = "not a distance"
    calc.k = 3  # (the search's error belongs to get_accuracy, not to every setting)
    with pytest.raises(TypeError, match="distance must be a PML BaseDistance"):
        calc.get_accuracy(*_data(5))
    calc.distance = CosineSimilarity()  # the repair
    assert calc.exact == ("dot", True) and calc.k == 3
    calc.get_accuracy(*_data(5))


def test_an_inverted_distance_is_shown_inverted():
    d = LpDistance()
    d.is_inverted = True
    with pytest.raises(ValueError, match=r"normalize_embeddings=True, is_inverted=True\)"):
        ShardedRetrievalAccuracyCalculator(distance=d)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_cosine_of_another_p_is_searched_as_pml_does(in_place):
    x, y = _data(7, rows=50, width=5, classes=4)
    d = CosineSimilarity() if in_place else CosineSimilarity(p=1)
    ours = RetrievalAccuracyCalculator(include=("precision_at_1", "r_precision"), distance=d)
    if in_place:
        ours.get_accuracy(x, y)
        d.p = 1
    pml = AccuracyCalculator(
        include=("precision_at_1", "r_precision"), knn_func=CustomKNN(d), device=CPU
    )
    assert ours.get_accuracy(x, y) == pytest.approx(pml.get_accuracy(x, y))
    assert ours.exact is None


def test_a_hooked_distance_is_run_as_pml_runs_it():
    x, y = _data(8, rows=40, width=5, classes=4)
    d = CosineSimilarity()
    d.register_forward_hook(lambda module, inputs, out: -out)  # (nearest last)
    ours = RetrievalAccuracyCalculator(include=("precision_at_1",), distance=d)
    pml = AccuracyCalculator(include=("precision_at_1",), knn_func=CustomKNN(d), device=CPU)
    want = pml.get_accuracy(x, y)
    assert ours.get_accuracy(x, y) == pytest.approx(want) and ours.exact is None


def test_a_hook_on_a_batched_distance_wrapper_is_run_as_pml_runs_it():
    from pytorch_metric_learning.distances import BatchedDistance

    x, y = _data(8, rows=40, width=5, classes=4)

    def wrapped():
        batched = BatchedDistance(CosineSimilarity(), batch_size=8)
        batched.register_forward_pre_hook(lambda module, inputs: (inputs[0], -inputs[1]))
        return batched

    ours = RetrievalAccuracyCalculator(include=("precision_at_1",), distance=wrapped())
    pml = AccuracyCalculator(include=("precision_at_1",), knn_func=CustomKNN(wrapped()), device=CPU)
    assert ours.get_accuracy(x, y) == pytest.approx(pml.get_accuracy(x, y))
    with pytest.raises(ValueError, match="with a hook or a method replaced on it"):
        ShardedRetrievalAccuracyCalculator(distance=wrapped())


def test_a_batched_distance_inverted_on_the_wrapper_ranks_as_pml():
    from pytorch_metric_learning.distances import BatchedDistance

    x, y = _data(0, rows=60, width=5, classes=5)
    b = BatchedDistance(CosineSimilarity(), batch_size=7)
    b.is_inverted = False  # (PML's CustomKNN reads the wrapper's)
    include = ("precision_at_1", "mean_average_precision_at_r")
    ours = RetrievalAccuracyCalculator(include=include, distance=b)
    pml = AccuracyCalculator(include=include, knn_func=CustomKNN(b), device=CPU)
    assert ours.get_accuracy(x, y) == pytest.approx(pml.get_accuracy(x, y))
    assert ours.exact is None
