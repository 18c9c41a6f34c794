"""Issue 16: the calculator as a PML user meets it (off-centre, duplicate and integer
data, PML's knn_func/knn_distances semantics, the public calculate_* methods)."""

import math
import threading

import faiss
import numpy as np
import pytest
import torch
from conftest import brute_force_neighbours, make_data
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance, SNRDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN, FaissKNN

from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.evaluation import calculator as calculator_module

PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def _brute_p_at_1(x, y):
    order = brute_force_neighbours(x, x, True)[:, 0]
    y = np.asarray(y)
    return float((y[order] == y).mean())


def test_off_centre_data_equal_pml_and_brute_force():
    # issue 16.1: offset 1000 gave P@1 0.1080, truth 0.1310
    x, y = make_data("random", 1000, 64, 20, seed=0)
    x = x + 1000.0
    ours = RetrievalAccuracyCalculator(include=PML_METRICS).get_accuracy(x, y)
    pml = AccuracyCalculator(include=PML_METRICS, device=torch.device("cpu")).get_accuracy(x, y)
    assert ours == pytest.approx(pml, abs=1e-6)  # faiss is not exact at this offset
    assert ours["precision_at_1"] == pytest.approx(_brute_p_at_1(x, y), abs=1e-12)


def test_duplicates_do_not_depend_on_block_size():
    # issue 16.2: P@1 0.1267 / 0.1250 / 0.1117 for block_rows None / 7 / 64
    x, y = make_data("random", 60, 8, 20, seed=1)
    x, y = (
        x.repeat(10, 1) + 10.0,
        torch.randint(0, 20, (600,), generator=torch.Generator().manual_seed(2)),
    )
    results = [
        RetrievalAccuracyCalculator(include=("precision_at_1",), block_rows=b).get_accuracy(x, y)
        for b in (None, 7, 64)
    ]
    truth = _brute_p_at_1(x, y)
    assert all(r["precision_at_1"] == pytest.approx(truth, abs=1e-12) for r in results)


def test_recall_only_needs_only_max_k_neighbours(monkeypatch):
    # issue 16.3: k=None with only recall_at_1 built the full N x N k-nn
    x, y = make_data("clustered", 300, 8, 10, seed=3)
    calc = RetrievalAccuracyCalculator(include=("recall_at_1", "recall_at_4"))
    depths = []
    original = calc._knn
    monkeypatch.setattr(calc, "_knn", lambda q, r, k, s: depths.append(k) or original(q, r, k, s))
    calc.get_accuracy(x, y)
    assert depths == [4]
    full = RetrievalAccuracyCalculator(include=("recall_at_1", "mean_reciprocal_rank"))
    monkeypatch.setattr(full, "_knn", lambda q, r, k, s: depths.append(k) or original(q, r, k, s))
    full.get_accuracy(x, y)
    assert depths[-1] == 299  # PML's rule for its own metrics: k=None is every reference


class _Distances:
    """A custom metric as PML users write them: reads knn_distances."""

    def calculate_knn_distances(self, knn_distances, **kwargs):
        return knn_distances[:, :2].tolist()

    def requires_knn(self):
        return [*super().requires_knn(), "knn_distances"]


class OursWithDistances(_Distances, RetrievalAccuracyCalculator):
    pass


class PMLWithDistances(_Distances, AccuracyCalculator):
    pass


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"knn_func": CustomKNN(LpDistance(normalize_embeddings=False))},
        {"knn_func": CustomKNN(LpDistance(normalize_embeddings=False, power=2))},
        {"knn_func": CustomKNN(CosineSimilarity())},
        {"knn_func": FaissKNN(index_init_fn=faiss.IndexFlatIP)},
    ],
    ids=["default", "lp", "lp_power2", "cosine", "faiss_ip"],
)
def test_knn_distances_have_pml_semantics(kwargs):
    # issue 16.4: PML's default gives squared L2 (9, 9, 16, 16), we gave 3, 3, 4, 4
    x, y = torch.tensor([[0.0], [3.0], [10.0], [14.0]]), torch.tensor([0, 0, 1, 1])
    if "cosine" in str(kwargs) or "IP" in str(kwargs):
        x = torch.tensor([[1.0, 0.2], [0.9, 0.5], [-1.0, 0.3], [-0.7, -0.9]])
    ours = OursWithDistances(include=("knn_distances",), k=2, **kwargs).get_accuracy(x, y)
    pml = PMLWithDistances(include=("knn_distances",), k=2, device=torch.device("cpu"), **kwargs)
    np.testing.assert_allclose(
        ours["knn_distances"], pml.get_accuracy(x, y)["knn_distances"], rtol=1e-6
    )
    if not kwargs:
        assert ours["knn_distances"] == [[9.0, 100.0], [9.0, 49.0], [16.0, 49.0], [16.0, 121.0]]


def test_calculate_methods_accept_pml_kwargs():
    # issue 16.5: KeyError('knn_match') with the kwargs PML documents
    x, y = make_data("clustered", 200, 8, 10, seed=4)
    pml = AccuracyCalculator(k="max_bin_count", device=torch.device("cpu"))
    ours = RetrievalAccuracyCalculator(k="max_bin_count")
    knn_labels = y[torch.from_numpy(brute_force_neighbours(x, x, True)[:, :40])]
    unique, counts = torch.unique(y, return_counts=True)
    kwargs = {
        "knn_labels": knn_labels,
        "query_labels": y,
        "not_lone_query_mask": torch.ones(200, dtype=torch.bool),
        "label_counts": (unique, counts),
        "ref_includes_query": True,
    }
    for name in (*PML_METRICS, "mean_average_precision", "mean_reciprocal_rank"):
        got = getattr(ours, f"calculate_{name}")(**kwargs)
        expected = getattr(pml, f"calculate_{name}")(**kwargs)
        assert got == pytest.approx(expected, abs=1e-7), name  # PML: MRR in float32
    assert ours.calculate_recall_at_4(**kwargs) == pytest.approx(
        float((knn_labels[:, :4] == y[:, None]).any(1).double().mean())
    )
    # lists shorter than Recall@K reads: refused (it was Recall@3 under the name at 4),
    # the number of references known or not
    short = {**kwargs, "knn_labels": knn_labels[:, :3]}
    for given in ({}, {"reference_labels": y}, {"reference": x}):
        with pytest.raises(ValueError, match=r"recall_at_4 reads each query's 4 nearest .* 3"):
            ours.calculate_recall_at_4(**short, **given)
    # ... unless the reference set has no more (4 references, the query among them)
    ours.calculate_recall_at_4(**short, reference_labels=y[:4])


def test_a_copied_calculator_computes_recall_beyond_k_with_its_own_settings():
    """copy.copy kept the original's metric methods: Recall@8 with k=1 came out as
    Recall@1 (0.225 for 0.875), and the copy's settings were not used (found by review)."""
    import copy

    x, y = make_data("clustered", 60, 4, 5, seed=27)
    both = ("recall_at_1", "recall_at_8")
    calc = RetrievalAccuracyCalculator(k=1, recall_ks=(1, 8), include=both)
    expected = calc.get_accuracy(x, y)
    neighbours = torch.from_numpy(brute_force_neighbours(x, x, True)[:, :8])
    truth = float((y[neighbours] == y[:, None]).any(1).double().mean())
    assert expected["recall_at_8"] == pytest.approx(truth)
    assert truth > expected["recall_at_1"]
    copied = copy.copy(calc)
    assert copied.get_accuracy(x, y) == expected
    copied.return_per_class = True
    assert len(copied.get_accuracy(x, y)["recall_at_8"]) == len(y.unique())
    assert calc.get_accuracy(x, y) == expected


def test_a_subclass_handing_recall_other_knn_labels_than_k_deep_is_refused():
    """A subclass whose metrics get copies of the k-nn kwargs: Recall@K past PML's k cannot
    be read from them (it was silently Recall@k; found by review)."""

    class Cloning(RetrievalAccuracyCalculator):
        def _get_accuracy(self, function_dict, **kwargs):
            kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return super()._get_accuracy(function_dict, **kwargs)

    x, y = make_data("clustered", 60, 4, 5, seed=27)
    metrics = ("precision_at_1", "recall_at_8")  # PML's k: 1 column for P@1
    with pytest.raises(ValueError, match=r"recall_at_8 reads each query's 8 nearest"):
        Cloning(k=1, recall_ks=(8,), include=metrics).get_accuracy(x, y)
    plain = RetrievalAccuracyCalculator(k=8, recall_ks=(8,), include=metrics)
    assert Cloning(k=8, recall_ks=(8,), include=metrics).get_accuracy(x, y) == (
        plain.get_accuracy(x, y)
    )


@pytest.mark.parametrize(
    "knn_func",
    [
        None,
        CustomKNN(LpDistance(power=2, normalize_embeddings=False)),
        CustomKNN(SNRDistance()),
        CustomKNN(LpDistance(p=1)),
        FaissKNN(index_init_fn=lambda d: faiss.IndexHNSWFlat(d, 8)),
    ],
    ids=["default", "lp_power2", "snr", "l1", "faiss_hnsw"],
)
def test_what_pml_accepts_works(knn_func):
    # issue 16.6: integer embeddings, CustomKNN with other distances, FaissKNN(index_init_fn)
    x = torch.arange(120).view(40, 3) % 7  # PML's own tests use torch.arange
    y = torch.arange(40) % 5
    ours = RetrievalAccuracyCalculator(include=PML_METRICS, knn_func=knn_func).get_accuracy(x, y)
    pml = AccuracyCalculator(include=PML_METRICS, knn_func=knn_func, device=torch.device("cpu"))
    expected = pml.get_accuracy(x, y)
    if knn_func is None or (
        isinstance(knn_func, CustomKNN)
        and isinstance(knn_func.distance, LpDistance)
        and knn_func.distance.p == 2
    ):
        # exact ranking: compare with the float64 brute force (PML's ties are arbitrary)
        assert ours["precision_at_1"] == pytest.approx(_brute_p_at_1(x.double(), y), abs=1e-12)
    else:
        assert ours == pytest.approx(expected, abs=1e-12)


def test_lp_power_2_ranks_as_euclidean():
    x, y = make_data("clustered", 150, 6, 8, seed=5)
    x = x + 500.0
    a = RetrievalAccuracyCalculator(
        include=PML_METRICS, knn_func=CustomKNN(LpDistance(power=2, normalize_embeddings=False))
    )
    b = RetrievalAccuracyCalculator(include=PML_METRICS)
    assert a.get_accuracy(x, y) == b.get_accuracy(x, y)


def _preset_ip_knn() -> FaissKNN:
    knn = FaissKNN(reset_before=False, reset_after=False)
    knn.index = faiss.IndexFlatIP(8)
    return knn


@pytest.mark.parametrize("index_init_fn", [None, faiss.IndexFlatL2, faiss.IndexFlatIP])
def test_faiss_knn_reset_after_false_keeps_the_reference_index_as_pml(index_init_fn):
    """reset_after=False: PML leaves the reference's index in knn_func.index (a user
    searches it again afterwards); it was mapped to the exact k-nn and never built."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 8, generator=g)
    y = torch.randint(0, 6, (120,), generator=g)
    include = ("precision_at_1", "mean_average_precision_at_r")
    kwargs = {} if index_init_fn is None else {"index_init_fn": index_init_fn}
    pml_knn = FaissKNN(reset_after=False, **kwargs)
    our_knn = FaissKNN(reset_after=False, **kwargs)
    pml = AccuracyCalculator(include=include, knn_func=pml_knn, device=torch.device("cpu"))
    ours = RetrievalAccuracyCalculator(include=include, knn_func=our_knn)
    expected = pml.get_accuracy(x, y)
    assert ours.get_accuracy(x, y) == pytest.approx(expected, abs=1e-12)
    kind = faiss.IndexFlatL2 if index_init_fn is None else index_init_fn
    assert isinstance(ours.knn_func.index, kind)
    assert ours.knn_func.index.ntotal == pml_knn.index.ntotal == len(x)
    # the kept index answers a later search as PML's does
    assert torch.equal(our_knn(x[:5], 3)[1], pml_knn(x[:5], 3)[1])


@pytest.mark.parametrize(
    ("reset_before", "reset_after"), [(True, False), (False, False), (False, True)]
)
@pytest.mark.parametrize(("n", "k"), [(10, "max_bin_count"), (1, None)])
def test_faiss_knn_that_keeps_state_is_called_when_no_neighbour_is_wanted(
    reset_before, reset_after, n, k
):
    """PML's k is 0 (every label alone, or a one-row set): PML still calls the FaissKNN,
    which builds (or adds to) the index and leaves it, or drops it with reset_after; the
    search was skipped, leaving knn_func.index as it was."""
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(3))
    y = torch.arange(n)
    knns = [FaissKNN(reset_before=reset_before, reset_after=reset_after) for _ in range(2)]
    if not reset_before:
        for knn in knns:
            knn.index = faiss.IndexFlatL2(4)
    include = ("precision_at_1", "mean_average_precision_at_r")
    pml = AccuracyCalculator(include=include, k=k, knn_func=knns[0], device=torch.device("cpu"))
    ours = RetrievalAccuracyCalculator(include=include, k=k, knn_func=knns[1])
    expected, got = pml.get_accuracy(x, y), ours.get_accuracy(x, y)
    assert {m: math.isnan(v) for m, v in got.items() if m in include} == {m: True for m in include}
    assert {m: math.isnan(v) for m, v in expected.items()} == {m: True for m in include}
    if reset_after:
        assert knns[0].index is None and knns[1].index is None
    else:
        assert knns[1].index.ntotal == knns[0].index.ntotal == n


def test_faiss_knn_without_reset_searches_its_own_index_as_pml():
    """reset_before=False: PML searches the index the user set (here inner product),
    or raises when there is none; it was replaced by the exact squared-L2 k-nn."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    x[:100] *= 3  # norms differ: inner product and L2 rank differently
    y = torch.randint(0, 5, (200,), generator=g)
    include = ("precision_at_1", "mean_average_precision_at_r")
    pml = AccuracyCalculator(include=include, knn_func=_preset_ip_knn(), device=torch.device("cpu"))
    ours = RetrievalAccuracyCalculator(include=include, knn_func=_preset_ip_knn())
    assert ours.knn_func is not None  # run as PML runs it
    expected = pml.get_accuracy(x, y)
    assert ours.get_accuracy(x, y) == pytest.approx(expected, abs=1e-12)
    l2 = RetrievalAccuracyCalculator(include=include).get_accuracy(x, y)
    assert l2 != pytest.approx(expected, abs=1e-3)  # the case tells them apart
    with pytest.raises(ValueError, match=r"self\.index is None"):
        RetrievalAccuracyCalculator(
            include=include, knn_func=FaissKNN(reset_before=False)
        ).get_accuracy(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["self", "separate", "int_query"])
@pytest.mark.parametrize("per_class", [False, True])
def test_float_labels_with_a_fraction_are_compared_as_pml_compares_them(dtype, layout, per_class):
    """PML takes any float labels (0.25, 0.75, ...) and compares them for equality; they
    were refused ("must be integers")."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 8, generator=g)
    whole = torch.randint(0, 5, (60,), generator=g)
    y = (whole * 0.5 + 0.25).to(dtype)
    include = PML_METRICS
    pml = AccuracyCalculator(
        include=include, return_per_class=per_class, device=torch.device("cpu")
    )
    ours = RetrievalAccuracyCalculator(include=include, return_per_class=per_class)
    if layout == "self":
        args = (x, y)
    elif layout == "separate":
        args = (x[:25], y[:25], x[25:], y[25:])
    else:  # integer query labels against float references, one of them fractional
        reference_labels = whole[25:].to(dtype)
        reference_labels[0] = 0.5
        args = (x[:25], whole[:25], x[25:], reference_labels)
    expected, got = pml.get_accuracy(*args), ours.get_accuracy(*args)
    assert set(got) >= set(expected)
    for name, value in expected.items():
        assert np.allclose(got[name], value, atol=1e-6, equal_nan=True), name
    # the same as the labels' integer codes
    codes = [torch.unique(a, return_inverse=True)[1] if i % 2 else a for i, a in enumerate(args)]
    if layout != "self":  # one code for both sets
        both = torch.unique(torch.cat([args[1].double(), args[3].double()]), return_inverse=True)[1]
        codes[1], codes[3] = both[:25], both[25:]
    coded = ours.get_accuracy(*codes)
    assert all(np.allclose(coded[m], got[m], equal_nan=True) for m in expected)


def test_silencing_pml_logger_silences_the_calculator(caplog):
    """A PML user quiets the calculator's warnings through PML's logger; ours kept
    warning ("None of the query labels are in the reference set")."""
    import logging

    from pytorch_metric_learning.utils import common_functions

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    args = (x[:3], torch.tensor([0, 1, 2]), x[3:], torch.tensor([5, 6, 7]))
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",))
    pml_logger = common_functions.LOGGER
    level = pml_logger.level
    with caplog.at_level(logging.WARNING):
        calc.get_accuracy(*args)
        assert "None of the query labels" in caplog.text
        caplog.clear()
        pml_logger.setLevel(logging.ERROR)
        try:
            calc.get_accuracy(*args)
        finally:
            pml_logger.setLevel(level)
        assert caplog.text == ""
        calc.get_accuracy(*args)
        assert "None of the query labels" in caplog.text
        caplog.clear()
        pml_logger.disabled = True
        try:
            calc.get_accuracy(*args)
        finally:
            pml_logger.disabled = False
        assert caplog.text == ""


def test_a_users_knn_func_is_called_when_no_neighbour_is_wanted():
    """PML calls any knn_func at k=0 (every label alone): a function around a
    FaissKNN(reset_after=False) builds its index there; it was skipped."""
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    y = torch.arange(12)
    inners = [FaissKNN(reset_after=False) for _ in range(2)]

    def wrapped(inner):
        return lambda q, k, r, ref_includes_query: inner(q, k, r, ref_includes_query)

    include = ("precision_at_1",)
    cpu = torch.device("cpu")
    pml = AccuracyCalculator(
        include=include, k="max_bin_count", knn_func=wrapped(inners[0]), device=cpu
    )
    ours = RetrievalAccuracyCalculator(
        include=include, k="max_bin_count", knn_func=wrapped(inners[1])
    )
    assert math.isnan(pml.get_accuracy(x, y)["precision_at_1"])
    assert math.isnan(ours.get_accuracy(x, y)["precision_at_1"])
    assert inners[1].index.ntotal == inners[0].index.ntotal == 12


@pytest.mark.parametrize("query_dtype", [torch.float64, torch.int64])
@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_labels_of_two_dtypes_compare_at_the_narrower_as_pml(query_dtype, ref_includes_query):
    """float64 query labels 0.1, 0.2, ... against the same values in float32 (numpy
    beside torch): PML's float32 cast matches them; they never matched (P@1 0.0), and a
    reference that starts with the query was refused. Integers beyond 2^24 against float32
    references match as float32 holds them, as in PML."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 8, generator=g)
    whole = torch.randint(0, 6, (60,), generator=g)
    if query_dtype == torch.float64:
        labels = whole.double() / 10 + 0.1
    else:
        labels = whole + 2**24 + 1  # odd: float32 rounds each to its even neighbour
    query, query_labels = x[:20], labels[:20]
    if ref_includes_query:
        reference, reference_labels = x, labels.float()
    else:
        reference, reference_labels = x[20:], labels[20:].float()
    cpu = torch.device("cpu")
    expected = AccuracyCalculator(include=PML_METRICS, device=cpu).get_accuracy(
        query, query_labels, reference, reference_labels, ref_includes_query
    )
    got = RetrievalAccuracyCalculator(include=PML_METRICS).get_accuracy(
        query, query_labels, reference, reference_labels, ref_includes_query
    )
    assert expected["precision_at_1"] > 0
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize(
    "returned",
    [
        lambda q: (torch.zeros(len(q)), torch.zeros(len(q), dtype=torch.long)),  # 1-D
        lambda q: (None, None),
        lambda q: (np.zeros((len(q), 0)), np.zeros((len(q), 0), dtype=np.int64)),
    ],
    ids=["1-D", "None", "numpy"],
)
def test_what_a_knn_func_returns_at_k_0_is_not_read_as_pml(returned):
    """At k=0 every query is alone and PML reads nothing of the result: odd shapes,
    None or numpy arrays raised once the function was called there."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    calls = []

    def knn(q, k, r, ref_includes_query):
        calls.append(k)
        return returned(q)

    kwargs = {"include": ("precision_at_1",), "k": "max_bin_count", "knn_func": knn}
    pml = AccuracyCalculator(**kwargs, device=torch.device("cpu")).get_accuracy(x, torch.arange(8))
    ours = RetrievalAccuracyCalculator(**kwargs).get_accuracy(x, torch.arange(8))
    assert math.isnan(pml["precision_at_1"]) and math.isnan(ours["precision_at_1"])
    assert calls == [0, 0]


def test_a_knn_func_returning_numpy_arrays_as_pml():
    """PML indexes the labels with whatever the function returns; numpy arrays raised."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 4, (40,), generator=g)
    inner = CustomKNN(LpDistance())

    def knn(q, k, r, ref_includes_query):
        return tuple(t.numpy() for t in inner(q, k, r, ref_includes_query))

    pml = AccuracyCalculator(include=PML_METRICS, knn_func=knn, device=torch.device("cpu"))
    ours = RetrievalAccuracyCalculator(include=PML_METRICS, knn_func=knn)
    assert ours.get_accuracy(x, y) == pytest.approx(pml.get_accuracy(x, y), abs=1e-6)


def test_a_faiss_knn_subclass_with_its_own_call_is_called_at_k_0():
    calls = []

    class Recording(FaissKNN):
        def __call__(self, q, k, r=None, ref_includes_query=False):
            calls.append(k)
            return super().__call__(q, max(k, 1), r, ref_includes_query)

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    calc = RetrievalAccuracyCalculator(
        include=("precision_at_1",), k="max_bin_count", knn_func=Recording()
    )
    assert math.isnan(calc.get_accuracy(x, torch.arange(6))["precision_at_1"])
    assert calls == [0]


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_a_label_comparison_gets_both_label_sets_in_one_dtype_as_pml(ref_includes_query):
    """float32 query labels 0.1, 0.2, ... and the same values in float64: PML hands the
    comparison float32 twice and they match; ours gave (float32, float64), no match."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 4, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g).double() / 10 + 0.1
    seen = []

    def equal(a, b):
        seen.append((a.dtype, b.dtype))
        return a == b

    query, query_labels = x[:16], labels[:16].float()
    reference, reference_labels = (x, labels) if ref_includes_query else (x[16:], labels[16:])
    args = (query, query_labels, reference, reference_labels, ref_includes_query)
    cpu = torch.device("cpu")
    expected = AccuracyCalculator(
        include=PML_METRICS, label_comparison_fn=equal, device=cpu
    ).get_accuracy(*args)
    pml_seen, seen[:] = set(seen), []
    got = RetrievalAccuracyCalculator(include=PML_METRICS, label_comparison_fn=equal).get_accuracy(
        *args
    )
    assert expected["precision_at_1"] > 0
    assert got == pytest.approx(expected, abs=1e-6)
    assert set(seen) == pml_seen == {(torch.float32, torch.float32)}


def test_ignored_reference_labels_are_compared_at_the_narrower_dtype():
    """reference_labels without reference: PML ignores them; ours checks they are the
    query's, now in the narrower dtype (float32 copies of float64 tenths were refused)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, 4, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g).double() / 10 + 0.1
    calc = RetrievalAccuracyCalculator(include=PML_METRICS)
    assert calc.get_accuracy(x, labels, reference_labels=labels.float()) == calc.get_accuracy(
        x, labels
    )
    with pytest.raises(ValueError, match="reference_labels given without reference"):
        calc.get_accuracy(x, labels, reference_labels=labels.flip(0))


def test_a_level_on_a_parent_of_pml_logger_quiets_the_calculator(caplog):
    """set_logger_name("proj.pml") and a level on "proj" quiet PML; ours kept warning."""
    import logging

    from pytorch_metric_learning.utils import common_functions

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    args = (x[:3], torch.tensor([0, 1, 2]), x[3:], torch.tensor([5, 6, 7]))
    name, parent = common_functions.LOGGER_NAME, logging.getLogger("proj_review")
    common_functions.set_logger_name("proj_review.pml")
    parent.setLevel(logging.ERROR)
    try:
        with caplog.at_level(logging.WARNING):
            RetrievalAccuracyCalculator(include=("precision_at_1",)).get_accuracy(*args)
    finally:
        parent.setLevel(logging.NOTSET)
        common_functions.set_logger_name(name)
    assert caplog.text == ""


@pytest.mark.parametrize(
    "form",
    [
        lambda d, i: (d, i.numpy().astype(np.uint32)),
        lambda d, i: (d, i.numpy().astype(np.int16)),
        lambda d, i: (d.numpy(), i.numpy()[:, ::-1][:, ::-1]),
        lambda d, i: (None, i),
    ],
    ids=["uint32", "int16", "numpy", "no-distances"],
)
def test_a_knn_funcs_results_are_taken_as_pml_indexes_with_them(form):
    """PML indexes the labels with the returned indices (numpy of any integer dtype) and
    its metrics never read the distances; small or unsigned numpy indices and None
    distances raised."""
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 4, (40,), generator=g)
    inner = CustomKNN(LpDistance())

    def knn(q, k, r, ref_includes_query):
        return form(*inner(q, k, r, ref_includes_query))

    pml = AccuracyCalculator(include=PML_METRICS, knn_func=knn, device=torch.device("cpu"))
    ours = RetrievalAccuracyCalculator(include=PML_METRICS, knn_func=knn)
    assert ours.get_accuracy(x, y) == pytest.approx(pml.get_accuracy(x, y), abs=1e-6)


def test_every_column_a_knn_func_returns_is_read_as_pml():
    """A user's k-nn returning more neighbours than asked: PML's metrics read them all;
    ours cut them to k (MAP 0.116 where PML gives 0.339)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 4, (20,), generator=g)

    def every_neighbour(q, k, r, ref_includes_query):
        d = torch.cdist(q, r).fill_diagonal_(float("inf"))
        values, indices = d.sort(dim=1)
        return values[:, :-1], indices[:, :-1]

    include = ("mean_average_precision", "r_precision", "precision_at_1")
    kwargs = {"include": include, "k": 3, "knn_func": every_neighbour}
    pml = AccuracyCalculator(**kwargs, device=torch.device("cpu")).get_accuracy(x, y)
    assert RetrievalAccuracyCalculator(**kwargs).get_accuracy(x, y) == pytest.approx(pml, abs=1e-6)


@pytest.mark.parametrize("compare", [None, torch.eq])
def test_an_unrelated_label_beyond_2_53_does_not_merge_others(compare):
    """int64 query labels 2^24 and reference labels 2^24 + 1 stay apart; a reference label
    beyond 2^53 elsewhere left the reference int64 and the query float32, and the mixed
    comparison merged them (P@1 1.0)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, generator=g)
    r = torch.cat([q, torch.randn(2, 3, generator=g)])
    query_labels = torch.tensor([2**24, 2**24])
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",), label_comparison_fn=compare)
    for extra in (5, 2**53 + 1):
        reference_labels = torch.tensor([2**24 + 1, 2**24 + 1, extra, extra])
        assert math.isnan(calc.get_accuracy(q, query_labels, r, reference_labels)["precision_at_1"])


def test_a_knn_func_returning_fewer_columns_is_called_once_as_pml():
    """Fewer neighbours than asked: PML calls once and its metrics read what came; ours
    took it for a shallower PML k and called again at that depth (MRR 0.275 vs 0.404)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    inner, calls = CustomKNN(LpDistance()), []

    def fewer(q, k, r, ref_includes_query):
        calls.append(k)
        d, i = inner(q, k, r, ref_includes_query)
        return d[:, : k - 2], i[:, : k - 2]

    include = ("mean_average_precision", "mean_reciprocal_rank", "r_precision")
    kwargs = {"include": include, "k": 5, "knn_func": fewer}
    pml = AccuracyCalculator(**kwargs, device=torch.device("cpu")).get_accuracy(x, y)
    ours = RetrievalAccuracyCalculator(**kwargs, recall_ks=(1,)).get_accuracy(x, y)
    assert calls == [5, 5]
    assert {m: ours[m] for m in include} == pytest.approx(pml, abs=1e-6)


def test_list_distances_with_a_deeper_recall_as_pml():
    """Distances as lists and a Recall@K deeper than PML's k: the first call's distances
    were sliced as an array (TypeError); PML never reads them."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 4, (40,), generator=g)
    inner = CustomKNN(LpDistance())

    def as_lists(q, k, r, ref_includes_query):
        return tuple(t.tolist() for t in inner(q, k, r, ref_includes_query))

    pml = AccuracyCalculator(
        include=("precision_at_1",), k=1, knn_func=as_lists, device=torch.device("cpu")
    ).get_accuracy(x, y)
    ours = RetrievalAccuracyCalculator(
        include=("precision_at_1", "recall_at_8"), k=1, knn_func=as_lists, recall_ks=(1, 8)
    ).get_accuracy(x, y)
    assert ours["precision_at_1"] == pytest.approx(pml["precision_at_1"])
    assert 0 <= ours["recall_at_8"] <= 1


def _first_hit(
    knn_labels,
    query_labels,
    not_lone_query_mask,
    label_counts,
    knn_distances,
    lone_query_labels,
    query,
    reference,
    reference_labels=None,
    ref_includes_query=False,
    label_comparison_fn=None,
):
    """A metric with a fixed signature: exactly the keyword arguments PML passes."""
    return float((knn_labels[:, 0] == query_labels).float().mean())


def _with_first_hit(base):
    class WithFirstHit(base):
        def calculate_first_hit(self, **kwargs):
            return _first_hit(**kwargs)

        def requires_knn(self):
            return [*super().requires_knn(), "first_hit"]

    return WithFirstHit


@pytest.mark.parametrize("knn_func", [None, CustomKNN(LpDistance(normalize_embeddings=False))])
@pytest.mark.parametrize("with_recall", [False, True])
def test_a_subclass_metric_gets_exactly_pml_kwargs(knn_func, with_recall) -> None:
    """A metric that passed its kwargs on to a function with PML's parameters raised
    ``TypeError: unexpected keyword argument '_match'`` (our private cache of matches);
    the kwargs are now PML's, and our own metrics still reuse the matches."""
    x, y = make_data("clustered", 60, 4, 5, seed=1)
    include = ("first_hit", "precision_at_1", *(("recall_at_2",) if with_recall else ()))
    ours = _with_first_hit(RetrievalAccuracyCalculator)(include=include, knn_func=knn_func)
    pml = _with_first_hit(AccuracyCalculator)(
        include=("first_hit", "precision_at_1"), knn_func=knn_func, device=torch.device("cpu")
    )
    got, expected = ours.get_accuracy(x, y), pml.get_accuracy(x, y)
    assert got["first_hit"] == pytest.approx(expected["first_hit"])
    assert got["precision_at_1"] == pytest.approx(expected["precision_at_1"])
    assert not calculator_module._calls_in_progress()  # nothing kept between calls


def test_a_metric_that_calls_get_accuracy_leaves_the_outer_matches() -> None:
    """The call's matches live on the calculator for the call; a metric that evaluates a
    subset through the same calculator gets its own and leaves the outer call's, which
    Recall@K beyond PML's k reads (the lists past k are only there). The metric's name
    sorts first, so that it runs before the outer call's own metrics."""

    class Nested(RetrievalAccuracyCalculator):
        def calculate_early_subset_p1(self, query, query_labels, **_):
            sub = RetrievalAccuracyCalculator.get_accuracy(
                self, query[:20], query_labels[:20], include=("precision_at_1",)
            )
            return sub["precision_at_1"]

        def requires_knn(self):
            return [*super().requires_knn(), "early_subset_p1"]

    x, y = make_data("clustered", 200, 4, 5, seed=2)
    include = ("early_subset_p1", "recall_at_50", "precision_at_1")
    got = Nested(include=include, k=3, recall_ks=(1, 50)).get_accuracy(x, y)
    plain = RetrievalAccuracyCalculator(include=include[1:], k=3, recall_ks=(1, 50))
    expected = plain.get_accuracy(x, y)
    assert got["recall_at_50"] == expected["recall_at_50"]
    assert got["precision_at_1"] == expected["precision_at_1"]
    assert got["early_subset_p1"] == plain.get_accuracy(x[:20], y[:20])["precision_at_1"]


def test_two_threads_evaluating_with_one_calculator_get_their_own_matches() -> None:
    """The call's matches lived on the calculator: a second thread's call replaced the
    first's, whose Recall@K beyond PML's k then read the lists cut at k (0.1544 for
    0.5671). Both calls now wait for each other inside their first metric."""
    barrier = threading.Barrier(2, timeout=60)

    class Meeting(RetrievalAccuracyCalculator):
        def calculate_a_meeting(self, **_):
            barrier.wait()  # both calls are under way, with their matches kept
            return 0.0

        def requires_knn(self):
            return [*super().requires_knn(), "a_meeting"]

    data = [make_data("clustered", 300, 8, 60, seed=s) for s in (5, 6)]
    include = ("a_meeting", "precision_at_1", "recall_at_50")
    calc = Meeting(include=include, k=3, recall_ks=(1, 50))
    expected = [
        RetrievalAccuracyCalculator(include=include[1:], k=3, recall_ks=(1, 50)).get_accuracy(x, y)
        for x, y in data
    ]
    got: list = [None, None]

    def run(i: int) -> None:
        got[i] = calc.get_accuracy(*data[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, e in zip(got, expected, strict=True):
        assert g["recall_at_50"] == e["recall_at_50"] and g["precision_at_1"] == e["precision_at_1"]
    assert not calculator_module._calls_in_progress()
