"""What a PML user's own code receives from the calculator is what PML hands it: float32
labels (in ``label_comparison_fn`` and in a subclass's metrics) and float32
``knn_distances``; a subclass that passes changed PML kwargs to a built-in
``calculate_*`` gets the value for them; a metric outside ``requires_knn`` reads PML's
neighbour lists; a graded comparison is refused rather than read as booleans."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_data
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.evaluation.inputs import as_pml_labels

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("quiet_pml_logging")


def _data(n=40, seed=0):
    return make_data("random", n, 4, 4, seed)


def _ours(result: dict, pml: dict) -> dict:
    return {k: v for k, v in result.items() if k in pml}


def _counts_and_self(base):
    class Changed(base):
        def calculate_rp_not_self(self, **kwargs):
            return super().calculate_r_precision(**{**kwargs, "ref_includes_query": False})

        def calculate_map_r_counts_plus_1(self, **kwargs):
            unique, counts = kwargs["label_counts"]
            changed = {**kwargs, "label_counts": (unique, counts + 1)}
            return super().calculate_mean_average_precision_at_r(**changed)

        def calculate_p1_counts_changed_in_place(self, **kwargs):
            kwargs["label_counts"][1].add_(1)  # then restored: the next metric sees PML's
            try:
                return super().calculate_r_precision(**kwargs)
            finally:
                kwargs["label_counts"][1].sub_(1)

        def requires_knn(self):
            names = ["rp_not_self", "map_r_counts_plus_1", "p1_counts_changed_in_place"]
            return [*super().requires_knn(), *names]

    return Changed


@pytest.mark.parametrize("separate", [False, True])
def test_changed_pml_kwargs_give_the_value_for_them(separate):
    q, ql = _data()
    args = (q, ql, *(_data(50, seed=1) if separate else ()))
    include = ("r_precision", "rp_not_self", "map_r_counts_plus_1", "p1_counts_changed_in_place")
    pml = _counts_and_self(AccuracyCalculator)(include=include, device=CPU).get_accuracy(*args)
    ours = _counts_and_self(RetrievalAccuracyCalculator)(include=include).get_accuracy(*args)
    assert _ours(ours, pml) == pytest.approx(pml, abs=1e-12)
    if not separate:  # the changes matter here: otherwise the test could not fail
        assert pml["rp_not_self"] != pml["r_precision"]


def _width_metrics(base):
    class Width(base):
        def calculate_precision_at_5(self, knn_labels, query_labels, **kwargs):
            return pml_ac.precision_at_k(
                knn_labels,
                query_labels[:, None],
                5,
                self.avg_of_avgs,
                self.return_per_class,
                self.label_comparison_fn,
            )

        def calculate_knn_width(self, knn_labels, **kwargs):
            return knn_labels.shape[1]

    return Width


@pytest.mark.parametrize(
    "include",
    [
        ("precision_at_1", "precision_at_5", "knn_width"),
        ("r_precision", "knn_width"),
        ("mean_average_precision_at_r", "knn_width", "recall_at_2"),
    ],
)
def test_a_metric_outside_requires_knn_reads_pmls_lists(include):
    q, _ = _data()
    labels = torch.arange(40) % 20  # two of each: R = 1, PML's k=None is all 39 others
    pml_include = tuple(m for m in include if not m.startswith("recall_at_"))
    pml_calc = _width_metrics(AccuracyCalculator)(include=pml_include, device=CPU)
    pml = pml_calc.get_accuracy(q, labels)
    ours = _width_metrics(RetrievalAccuracyCalculator)(include=include).get_accuracy(q, labels)
    assert pml["knn_width"] == 39
    assert _ours(ours, pml) == pytest.approx(pml, abs=1e-12)


def test_a_comparison_on_multi_hot_labels_gets_float32_as_in_pml():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(30, 4, generator=g)
    labels = (torch.rand(30, 5, generator=g) > 0.5).long()
    seen = []

    def close(a, b):
        seen.append((a.dtype, b.dtype))
        return F.cosine_similarity(a, b, dim=-1) > 0.5  # needs floating labels

    kwargs = {"label_comparison_fn": close, "exclude": ("NMI", "AMI")}
    pml = AccuracyCalculator(device=CPU, **kwargs).get_accuracy(q, labels)
    ours = RetrievalAccuracyCalculator(**kwargs).get_accuracy(q, labels)
    assert _ours(ours, pml) == pytest.approx(pml, abs=1e-6)  # PML's MRR is float32
    assert set(seen) == {(torch.float32, torch.float32)}


def test_a_subclass_metric_gets_float32_labels_and_distances():
    q, ql = _data()
    got = {}

    def make(base):
        class Gap(base):
            def calculate_label_gap_at_1(self, knn_labels, query_labels, **kwargs):
                got[base] = (knn_labels.dtype, query_labels.dtype, kwargs["knn_distances"].dtype)
                return float((knn_labels[:, 0] - query_labels).abs().mean())

            def requires_knn(self):
                return [*super().requires_knn(), "label_gap_at_1"]

        return Gap

    include = ("label_gap_at_1",)
    pml = make(AccuracyCalculator)(include=include, device=CPU).get_accuracy(q.double(), ql)
    ours = make(RetrievalAccuracyCalculator)(include=include).get_accuracy(q.double(), ql)
    assert ours == pytest.approx(pml)
    assert got[RetrievalAccuracyCalculator] == got[AccuracyCalculator] == (torch.float32,) * 3


@pytest.mark.parametrize(
    "labels, dtype",
    [
        (torch.tensor([0, 2**24]), torch.float32),
        (torch.tensor([0, 2**24 + 1]), torch.float64),  # float32 would merge 2^24 + 1 and 2^24
        (torch.tensor([-(2**53), 2**53]), torch.float64),
        (torch.tensor([0, 2**53 + 1]), torch.int64),
        (torch.tensor([0.5, 1.5], dtype=torch.float64), torch.float32),
        (torch.tensor([0.1, 0.2], dtype=torch.float64), torch.float64),
        (torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.float32),
        (torch.zeros(0, dtype=torch.long), torch.float32),
    ],
)
def test_labels_reach_user_code_as_float32_where_it_is_exact(labels, dtype):
    view = as_pml_labels(labels)
    assert view.dtype == dtype
    assert torch.equal(view.to(labels.dtype), labels)  # nothing merged or moved


def test_labels_beyond_float32_stay_distinct():
    q = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    labels = torch.tensor([2**24, 2**24, 2**24 + 1, 2**24 + 1])
    result = RetrievalAccuracyCalculator(include=("precision_at_1",)).get_accuracy(q, labels)
    assert result["precision_at_1"] == 1.0


@pytest.mark.parametrize(
    "fn, ok",
    [
        (lambda a, b: torch.exp(-(a - b).abs()), False),  # graded: not booleans
        (lambda a, b: (a == b).float(), True),  # 0/1 numbers are booleans
        (lambda a, b: (a == b).to(torch.uint8), True),
    ],
)
def test_a_graded_comparison_is_refused(fn, ok):
    q, ql = _data()
    calc = RetrievalAccuracyCalculator(label_comparison_fn=fn, exclude=("NMI", "AMI"))
    if ok:
        expected = RetrievalAccuracyCalculator(exclude=("NMI", "AMI")).get_accuracy(q, ql)
        assert calc.get_accuracy(q, ql) == expected
    else:
        with pytest.raises(ValueError, match=r"must return booleans.*float32 values such as"):
            calc.get_accuracy(q, ql)


def test_reference_labels_without_reference_are_the_querys_own_as_pml_ignores_them():
    q, ql = _data()
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",))
    assert calc.get_accuracy(q, ql, None, ql) == calc.get_accuracy(q, ql)
    assert calc.get_accuracy(q, ql, None, ql.clone()) == calc.get_accuracy(q, ql)  # equal
    with pytest.raises(ValueError, match="reference_labels given without reference, unlike"):
        calc.get_accuracy(q, ql, None, ql.flip(0))


def test_k_beyond_the_references_is_cut_to_them():
    q, ql = _data(30)
    include = ("mean_average_precision",)
    at_all = RetrievalAccuracyCalculator(include=include, k=29).get_accuracy(q, ql)
    beyond = RetrievalAccuracyCalculator(include=include, k=200).get_accuracy(q, ql)
    assert beyond == at_all


@pytest.mark.parametrize("separate", [False, True])
def test_metrics_under_inference_mode_equal_those_outside(separate):
    """Lightning validates under ``torch.inference_mode``: its tensors have no version
    counter (reading one raised a RuntimeError)."""
    q, ql = _data()
    args = (q, ql, *(_data(50, seed=1) if separate else ()))
    include = ("r_precision", "rp_not_self", "map_r_counts_plus_1", "recall_at_4")
    calc = _counts_and_self(RetrievalAccuracyCalculator)(include=include)
    expected = calc.get_accuracy(*args)
    with torch.inference_mode():
        inside = [t.clone() for t in args]  # inference tensors, as a validation step's
        assert inside[0].is_inference()
        assert calc.get_accuracy(*inside) == expected
        # in-place changes, which inference tensors do not count, still reach the value
        include = ("r_precision", "p1_counts_changed_in_place")
        changed = _counts_and_self(RetrievalAccuracyCalculator)(include=include)
        pml = _counts_and_self(AccuracyCalculator)(include=include, device=CPU)
        assert _ours(changed.get_accuracy(*inside), pml.get_accuracy(*args)) == pytest.approx(
            pml.get_accuracy(*args), abs=1e-12
        )


@pytest.mark.parametrize("flag", [1, torch.tensor(True), np.bool_(True)])
def test_ref_includes_query_is_read_for_its_truth_as_pml_does(flag):
    q, ql = _data()
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",))
    assert calc.get_accuracy(q, ql, q, ql, flag) == calc.get_accuracy(q, ql, q, ql, True)


def test_real_valued_labels_keep_their_values_where_float32_would_round_them():
    """Documented difference: PML rounds 1.13 and 2.13 to float32, where their difference
    is 1.0000001, so a tolerance of 1 leaves both queries lone; the values as given
    differ by 1.0 (float64 rounding of the subtraction), and both queries match."""
    near = lambda a, b: (a - b).abs() <= 1  # noqa: E731
    x = torch.tensor([[0.0], [3.0], [5.0], [6.0], [0.5]])
    y = torch.tensor([1.13, 2.13, 5.0, 5.5, 9.0], dtype=torch.float64)
    include = ("precision_at_1", "num_excluded_queries")
    got = RetrievalAccuracyCalculator(include=include, label_comparison_fn=near).get_accuracy(x, y)
    assert as_pml_labels(y).dtype == torch.float64
    assert got["num_excluded_queries"] == 1  # only the 9.0 query is lone
    # nearest neighbours: 0.0 -> 0.5 (label 9.0), 3.0 -> 5.0, 5.0 <-> 6.0 (5.0 ~ 5.5)
    assert got["precision_at_1"] == 0.5
