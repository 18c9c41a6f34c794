import numpy as np
import pytest
import torch
from conftest import brute_force_neighbours, brute_force_recall, make_data
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance, SNRDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.evaluation import calculator as calculator_module

RECALLS = tuple(f"recall_at_{k}" for k in (1, 2, 4, 8))


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("k", [None, "max_bin_count", 3])
def test_recall_at_k_equals_brute_force(kind, separate, k):
    x, y = make_data(kind, 150, 6, 12, seed=7)
    calc = RetrievalAccuracyCalculator(include=RECALLS, k=k, block_rows=16)
    if separate:
        got = calc.get_accuracy(x[:50], y[:50], x[50:], y[50:])
        args = (x[:50], y[:50], x[50:], y[50:], False)
    else:
        got = calc.get_accuracy(x, y)
        args = (x, y, x, y, True)
    for kk in (1, 2, 4, 8):
        assert got[f"recall_at_{kk}"] == pytest.approx(brute_force_recall(*args, kk))
    assert got["recall_at_1"] <= got["recall_at_2"] <= got["recall_at_4"] <= got["recall_at_8"]


def test_recall_beyond_the_reference_size_uses_every_reference():
    x = torch.tensor([[0.0], [1.0], [5.0]])
    calc = RetrievalAccuracyCalculator(
        include=("recall_at_1", "recall_at_1000"), recall_ks=(1, 1000)
    )
    got = calc.get_accuracy(x, torch.tensor([0, 1, 0]))
    assert got == {"recall_at_1": 0.0, "recall_at_1000": 1.0}


def test_ties_by_hand():
    # points 1 and 2 coincide; query 0 is equally far (1) from 1, 2 and from 3 (at -1)
    x = torch.tensor([[0.0], [1.0], [1.0], [-1.0]])
    y = torch.tensor([0, 1, 0, 0])
    calc = RetrievalAccuracyCalculator(include=("precision_at_1", "recall_at_2", "r_precision"))
    got = calc.get_accuracy(x, y)
    # neighbours by (distance, index): q0 -> [1, 2, 3]; q1 -> [2, 0, 3]; q2 -> [1, 0, 3];
    # q3 -> [0, 1, 2]. q1 (label 1) has no other label-1 reference: excluded.
    # P@1: q0 miss, q2 miss, q3 hit -> 1/3. R@2: q0 hit (2), q2 hit (0), q3 hit -> 1.
    # R-precision (R=2): q0 [1,2] -> 1/2; q2 [1,0] -> 1/2; q3 [0,1] -> 1/2
    assert got == pytest.approx({"precision_at_1": 1 / 3, "recall_at_2": 1.0, "r_precision": 0.5})


def test_duplicates_self_excluded_by_index_not_by_position():
    # three identical embeddings; the two lower-index duplicates share nothing with query 2
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 3.1]])
    y = torch.tensor([5, 6, 7, 7, 6])
    calc = RetrievalAccuracyCalculator(include=("precision_at_1", "num_excluded_queries"), k=1)
    # Rows 0, 1, 2 coincide. Ranked by (distance, index), query 1's k+1 = 2 neighbours
    # are [0, 1]: a lower-index duplicate comes before self, so removing self "by
    # position" (dropping the first of the k+1 neighbours) keeps query 1 itself and
    # would count a self-match. Exclusion by index must return 0 for query 1.
    order = brute_force_neighbours(x.numpy(), x.numpy(), exclude_self=False)
    positional = order[:, 1:2]  # drop the first of the k+1 neighbours
    assert positional[1, 0] == 1  # the positional scheme returns query 1 itself
    got = calc.get_accuracy(x, y)
    # by index: q0->1 (6≠5), q1->0 (5≠6), q2->0 (5≠7), q3->4 (6≠7), q4->3 (7≠6); q0 is
    # lone (label 5 once) so excluded: P@1 = 0 over 4 queries
    assert got == {"precision_at_1": 0.0, "num_excluded_queries": 1}
    _, idx = calc._knn(x, x, 4, ref_includes_query=True)
    assert all(i not in row for i, row in enumerate(idx.tolist()))


def test_labels_above_2_pow_24_stay_exact():
    big = 2**24
    x = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    y = torch.tensor([big, big + 1, big + 1, big + 2])  # equal once cast to float32
    assert torch.equal(y.float()[0], y.float()[1])
    got = RetrievalAccuracyCalculator(include=("precision_at_1", "num_excluded_queries"))
    out = got.get_accuracy(x, y)
    # only label big+1 has two members (rows 1, 2), whose nearest neighbours are 0 and 3
    assert out == {"precision_at_1": 0.0, "num_excluded_queries": 2}
    pml = AccuracyCalculator(include=("precision_at_1",), device=torch.device("cpu"))
    # PML's float32 cast merges big and big+1: rows 0, 1, 2 share a label, and 0, 1 hit
    assert pml.get_accuracy(x, y)["precision_at_1"] == pytest.approx(2 / 3)


def test_numpy_inputs_and_whole_number_float_labels():
    x, y = make_data("clustered", 80, 4, 5, seed=8)
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",))
    expected = calc.get_accuracy(x, y)
    assert calc.get_accuracy(x.numpy(), y.numpy().astype(np.uint32)) == expected
    assert calc.get_accuracy(x.double(), y.float()) == pytest.approx(expected)


def test_lone_queries_counted_and_all_lone_gives_nan():
    x = torch.randn(4, 3)
    calc = RetrievalAccuracyCalculator(include=("precision_at_1", "num_excluded_queries"))
    out = calc.get_accuracy(x[:2], torch.tensor([0, 9]), x[2:], torch.tensor([0, 1]))
    assert out["num_excluded_queries"] == 1
    out = calc.get_accuracy(x[:2], torch.tensor([8, 9]), x[2:], torch.tensor([0, 1]))
    assert np.isnan(out["precision_at_1"]) and out["num_excluded_queries"] == 2


def test_include_exclude_and_metric_names():
    calc = RetrievalAccuracyCalculator(recall_ks=(1, 10))
    metrics = set(calc.get_curr_metrics())
    assert {"recall_at_1", "recall_at_10", "AMI", "NMI", "mean_reciprocal_rank"} <= metrics
    x, y = make_data("clustered", 60, 4, 3, seed=9)
    out = calc.get_accuracy(x, y, include=("recall_at_10", "precision_at_1"))
    assert set(out) == {"recall_at_10", "precision_at_1"}
    out = calc.get_accuracy(x, y, exclude=("AMI", "NMI"))
    assert "AMI" not in out and "recall_at_1" in out
    with pytest.raises(ValueError, match="Primary metrics"):
        RetrievalAccuracyCalculator(include=("recall_at_3",))


def test_ami_warns_with_many_classes(monkeypatch):
    monkeypatch.setattr(calculator_module, "AMI_SLOW_NUM_CLASSES", 2)
    x, y = make_data("clustered", 60, 4, 3, seed=9)
    with pytest.warns(UserWarning, match="AMI with 3 classes is very slow"):
        RetrievalAccuracyCalculator(include=("AMI",)).get_accuracy(x, y)


def test_distance_objects():
    x, y = make_data("random", 50, 4, 3, seed=10)
    cos = RetrievalAccuracyCalculator(include=("precision_at_1",), distance=CosineSimilarity())
    lp = RetrievalAccuracyCalculator(
        include=("precision_at_1",), distance=LpDistance(normalize_embeddings=True)
    )
    # on the unit sphere, Euclidean and cosine rankings agree
    assert cos.get_accuracy(x, y) == pytest.approx(lp.get_accuracy(x, y))
    # a distance the exact k-nn does not map runs through PML's CustomKNN, as in PML
    snr = RetrievalAccuracyCalculator(include=("precision_at_1",), distance=SNRDistance())
    pml = AccuracyCalculator(include=("precision_at_1",), knn_func=CustomKNN(SNRDistance()))
    assert snr.get_accuracy(x, y) == pytest.approx(pml.get_accuracy(x, y))
    with pytest.raises(TypeError, match="distance must be a PML BaseDistance"):
        RetrievalAccuracyCalculator(distance="cosine")


X = torch.randn(6, 3)
Y = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((X, Y[:5]), {}, ValueError, "query_labels has length 5 but there are 6"),
        ((X, Y, X, Y[:4]), {}, ValueError, "reference_labels has length 4 but there are 6"),
        ((X.clone().fill_(float("nan")), Y), {}, ValueError, "query contains NaN or Inf"),
        ((X, Y, X * float("inf"), Y), {}, ValueError, "reference contains NaN or Inf"),
        ((X[:0], Y[:0]), {}, ValueError, "query is empty"),
        ((X, Y, X[:0], Y[:0]), {}, ValueError, "reference is empty"),
        ((X, Y, torch.randn(6, 4), Y), {}, ValueError, "reference has width 4 but the query's"),
        ((X, Y, X.flip(0), Y), {"ref_includes_query": True}, ValueError, "ref_includes_query"),
        ((X, Y, X[:3], Y[:3]), {"ref_includes_query": True}, ValueError, "ref_includes_query"),
        ((X, Y, X), {}, ValueError, "reference given without reference_labels"),
        ((X, torch.full((6,), float("nan"))), {}, ValueError, "query_labels contains NaN"),
        ((X, Y[:, None]), {}, ValueError, "query_labels must be 1-D"),
        (([[1.0]], Y), {}, TypeError, "query must be a torch.Tensor or numpy.ndarray"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    calc = RetrievalAccuracyCalculator(exclude=("NMI", "AMI"))
    with pytest.raises(error, match=match):
        calc.get_accuracy(*args, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"recall_ks": (0, 1)}, ValueError, "recall_ks must be a sequence of positive"),
        ({"recall_ks": "12"}, ValueError, "recall_ks must be a sequence of positive"),
        ({"k": 0}, ValueError, "k must be an integer greater than 0"),
        ({"avg_of_avgs": True, "return_per_class": True}, ValueError, "mutually exclusive"),
        ({"label_comparison_fn": torch.eq}, NotImplementedError, "clustering \\+ custom label"),
        ({"label_comparison_fn": "eq"}, TypeError, "label_comparison_fn must be callable"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RetrievalAccuracyCalculator(**kwargs)


def test_block_size_does_not_change_results():
    x, y = make_data("random", 120, 5, 6, seed=11)
    a = RetrievalAccuracyCalculator(exclude=("NMI", "AMI"), block_rows=7).get_accuracy(x, y)
    b = RetrievalAccuracyCalculator(exclude=("NMI", "AMI"), block_rows=10**4).get_accuracy(x, y)
    assert a == b


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_match_cpu():
    x, y = make_data("clustered", 600, 16, 20, seed=12)
    calc = RetrievalAccuracyCalculator(exclude=("NMI", "AMI"), k="max_bin_count")
    cpu = calc.get_accuracy(x, y)
    gpu = calc.get_accuracy(x.cuda(), y.cuda())
    assert gpu == pytest.approx(cpu, abs=1e-3)


def test_k_none_with_first_r_metrics_ranks_only_the_first_max_r(monkeypatch):
    """P@1, R-Precision and MAP@R read a query's first R neighbours: with PML's k=None the
    k-nn stops at the largest R, with the values of the whole list (and of PML);
    MAP over the whole list, or an overridden metric, still gets every reference."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from pml_margins.evaluation import calculator as calc_module

    depths = []
    original = calc_module.exact_knn
    monkeypatch.setattr(
        calc_module, "exact_knn", lambda q, r, k, **kw: depths.append(k) or original(q, r, k, **kw)
    )
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 6, generator=g).repeat(3, 1) + torch.randn(120, 6, generator=g) * 0.3
    y = torch.arange(40).repeat(3)
    y[:10] = 0  # one class of 12: max R = 11
    first_r = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    ours = RetrievalAccuracyCalculator(include=first_r, k=None).get_accuracy(x, y)
    assert depths == [11]
    pml = AccuracyCalculator(include=first_r, k=None).get_accuracy(x, y)
    for m in first_r:
        assert ours[m] == pytest.approx(pml[m], abs=1e-12)
    RetrievalAccuracyCalculator(include=(*first_r, "mean_average_precision"), k=None).get_accuracy(
        x, y
    )
    assert depths[-1] == 119

    class Own(RetrievalAccuracyCalculator):
        def calculate_r_precision(self, **kwargs):
            return float(kwargs["knn_labels"].shape[1])

    assert Own(include=("r_precision",), k=None).get_accuracy(x, y)["r_precision"] == 119
    # P@1 alone reads one neighbour (it ranked max R: at N = 20k, 1,051 deep, 1.3 GiB
    # and 12.5 s for 34 MiB and 0.7 s at depth 1, found by review), with Recall@K its K
    for k in (None, "max_bin_count", 7):
        alone = RetrievalAccuracyCalculator(include=("precision_at_1",), k=k).get_accuracy(x, y)
        assert depths[-1] == 1 and alone["precision_at_1"] == ours["precision_at_1"]
    both = RetrievalAccuracyCalculator(include=("precision_at_1", "recall_at_4"), k=None)
    assert both.get_accuracy(x, y)["precision_at_1"] == ours["precision_at_1"]
    assert depths[-1] == 4


def test_a_users_knn_func_keeps_pmls_depth(monkeypatch):
    """With a user's k-nn (approximate, or ties broken its own way) a shorter list need
    not be a prefix of the longer one: PML's k stands."""
    from pytorch_metric_learning.distances import SNRDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    depths = []
    knn = CustomKNN(SNRDistance())
    original = knn.__call__
    calc = RetrievalAccuracyCalculator(include=("precision_at_1", "r_precision"), knn_func=knn)
    monkeypatch.setattr(
        calc, "knn_func", lambda q, k, r, s: depths.append(k) or original(q, k, r, s)
    )
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(5))
    calc.get_accuracy(x, torch.arange(30) % 3)
    assert depths == [29]


def test_reference_of_another_dtype_is_ranked_by_its_own_values():
    """int64 queries and their float32 copy as the reference (ref_includes_query=True):
    2^24 + 1 became 2^24 in the reference, the nearest neighbour of query 1 (2^24) is
    then reference 2 (label 0), at distance 0: P@1 0.5 over the two non-lone queries."""
    base = 2**24
    values = [base - 1, base, base + 1] + [base + 1000 * (j + 1) for j in range(9)]
    query = torch.tensor(values, dtype=torch.int64)[:, None]
    labels = torch.tensor([1, 1, 0, *range(2, 11)])
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",))
    result = calc.get_accuracy(query, labels, query.float(), labels, ref_includes_query=True)
    assert result["precision_at_1"] == 0.5


@pytest.mark.parametrize("which", ["query", "query_labels"])
def test_float8_inputs_are_a_type_error(which):
    x, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    args = {"query": x, "query_labels": labels}
    args[which] = args[which].to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=f"{which} must have an integer dtype or torch.float16"):
        RetrievalAccuracyCalculator().get_accuracy(args["query"], args["query_labels"])
