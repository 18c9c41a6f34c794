"""Corners a PML user reaches, found by an independent review: each equals PML or is a
clear error (bf16 and bool inputs, a float64 default dtype, huge float labels, numpy
integers, custom metrics on the sharded calculator, float64 extremes, CLI files)."""

from __future__ import annotations

import fractions
import os
import re
import warnings

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_margins.cli import main
from pml_margins.distributed.evaluation import ShardedRetrievalAccuracyCalculator
from pml_margins.evaluation import RetrievalAccuracyCalculator, exact_knn
from pml_margins.evaluation.calculator import LATER_SETTINGS

KNN_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def _data(n=60, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_bfloat16_embeddings_get_pmls_clustering_metrics():
    x, y = _data()
    x = x.bfloat16()
    ours = RetrievalAccuracyCalculator(include=("NMI", "AMI")).get_accuracy(x, y)
    torch.manual_seed(0)
    pml = AccuracyCalculator(include=("NMI", "AMI")).get_accuracy(x.float(), y)
    assert ours == pytest.approx(pml)


def test_a_float64_default_dtype_changes_nothing():
    x, y = _data()
    expected = RetrievalAccuracyCalculator(include=KNN_METRICS).get_accuracy(x, y)
    knn = exact_knn(x, x, 5, exclude_self=True)
    whole = exact_knn(x, x, 59, exclude_self=True)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = RetrievalAccuracyCalculator(include=KNN_METRICS).get_accuracy(x, y)
        for backend in ("faiss", "torch"):
            values, indices = exact_knn(x, x, 5, exclude_self=True, backend=backend)
            assert values.dtype == torch.float32 and torch.equal(indices, knn[1])
            assert torch.equal(values, knn[0])
        values, indices = exact_knn(x, x, 59, exclude_self=True)
        assert values.dtype == torch.float32 and torch.equal(values, whole[0])
    finally:
        torch.set_default_dtype(before)
    assert got == expected


def test_float_labels_beyond_int64_are_compared_as_given():
    """They collapsed into one class (int64 overflow), then were refused; float labels now
    stay floats and are compared exactly (PML's float32 would merge labels closer than
    its spacing, as it merges integers beyond 2^24)."""
    x, _ = _data(n=40)
    labels = torch.tensor([1e19, 2e19] * 20, dtype=torch.float64)
    calc = RetrievalAccuracyCalculator(include=KNN_METRICS)
    assert calc.get_accuracy(x, labels) == calc.get_accuracy(x, torch.tensor([0, 1] * 20))
    got = calc.get_accuracy(x, labels / 1e19, x, torch.tensor([1.0] * 39 + [3e19]))
    assert got == calc.get_accuracy(x, torch.tensor([1, 2] * 20), x, torch.tensor([1] * 39 + [3]))


@pytest.mark.parametrize(
    "calculator", [RetrievalAccuracyCalculator, ShardedRetrievalAccuracyCalculator]
)
def test_ref_includes_query_compares_an_integer_query_without_truncation(calculator):
    query = torch.tensor([[1], [2]])
    reference = torch.tensor([[1.9], [2.9], [5.0], [7.0]])
    with pytest.raises(ValueError, match="ref_includes_query=True needs"):
        calculator(include=("precision_at_1",)).get_accuracy(
            query, torch.tensor([0, 1]), reference, torch.tensor([0, 1, 0, 1]), True
        )


def test_bool_labels_and_bool_codes_as_pml():
    x, y = _data()
    codes = x > 0  # binary hash codes
    for query, labels in ((x, y % 2 == 0), (codes, y)):
        ours = RetrievalAccuracyCalculator(include=KNN_METRICS).get_accuracy(query, labels)
        pml = AccuracyCalculator(include=KNN_METRICS).get_accuracy(query.float(), labels.float())
        assert ours == pytest.approx(pml)


@pytest.mark.parametrize("k", [np.int64(3), torch.tensor(3), np.int32(3)])
def test_numpy_and_tensor_integers_are_integers(k):
    x, _ = _data()
    expected = exact_knn(x, x, 3, exclude_self=True)
    got = exact_knn(x, x, k, exclude_self=True, block_rows=np.int64(16))
    assert torch.equal(got[1], expected[1])
    calc = RetrievalAccuracyCalculator(recall_ks=np.array([1, 2, 4]))
    assert calc.recall_ks == (1, 2, 4) and all(type(v) is int for v in calc.recall_ks)
    for bad in (np.bool_(True), torch.tensor([3]), 3.0):
        with pytest.raises(ValueError, match="k must be"):
            exact_knn(x, x, bad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32], ids=str)
def test_non_contiguous_labels_raise_no_warning(dtype):
    """A column of a label matrix (found by review: int64 labels were copied to float32
    before the ``searchsorted`` they guard, so only other dtypes reach it as views)."""
    x, y = _data()
    two_level = torch.stack([y, y // 2], dim=1).to(dtype)
    assert not two_level[:, 1].is_contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RetrievalAccuracyCalculator(include=KNN_METRICS).get_accuracy(x, two_level[:, 1])


def _with_reference_metric(base):
    class WithCentroidDistance(base):
        def calculate_centroid_distance(self, query, reference, **kwargs):
            return float((query - reference.mean(0)).norm(dim=1).mean())

        def requires_knn(self):
            return [*super().requires_knn(), "centroid_distance"]

    return WithCentroidDistance


def test_a_subclass_metric_reading_reference_gets_the_whole_set_when_sharded():
    q, ql = _data(n=20)
    r, rl = _data(n=50, seed=1)
    r = r + 5
    single = _with_reference_metric(RetrievalAccuracyCalculator)(include=("centroid_distance",))
    sharded = _with_reference_metric(ShardedRetrievalAccuracyCalculator)(
        include=("centroid_distance", "precision_at_1")
    )
    expected = single.get_accuracy(q, ql, r, rl)["centroid_distance"]
    assert sharded.get_accuracy(q, ql, r, rl)["centroid_distance"] == pytest.approx(expected)
    assert sharded._own_metrics(("precision_at_1", "recall_at_1"), ()) == []


@pytest.mark.parametrize("scale", [1e-170, 1e160])
def test_float64_extremes_whose_squares_leave_float64_are_refused(scale):
    x = torch.randn(50, 4, dtype=torch.float64) * scale
    with pytest.raises(ValueError, match="squared distances and products neither underflow"):
        exact_knn(x, x, 5, exclude_self=True)
    exact_knn(x / scale * 1e100, x / scale * 1e100, 5)  # inside the range: fine


def test_cli_files_that_cannot_be_read_are_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("e.npy", np.random.default_rng(0).random((20, 4), dtype=np.float32))
    np.save("l.npy", np.arange(20) % 3)
    (tmp_path / "garbage.pt").write_text("hello")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    torch.save({"x": fractions.Fraction(1, 2)}, "obj.pt")
    np.save("scalar.npy", np.array(3.0))
    os.symlink("loop2.json", "loop.json")  # a loop of links
    os.symlink("loop.json", "loop2.json")
    torch.save(torch.eye(20).to_sparse(), "sparse.pt")
    torch.save(torch.empty(20, 4, device="meta"), "meta.pt")
    with warnings.catch_warnings():  # quantized tensors' creation is deprecated
        warnings.simplefilter("ignore")
        torch.save(torch.quantize_per_tensor(torch.rand(20, 4), 0.1, 0, torch.qint8), "q.pt")
    cases = [
        (["--embeddings", "scalar.npy"], "scalar.npy: query must be 2-D"),
        (["--embeddings", "sparse.pt"], "sparse.pt: query must be a dense tensor"),
        (["--embeddings", "meta.pt"], "meta.pt: its tensor has no data"),
        (["--embeddings", "q.pt"], "q.pt: query must be a dense tensor, got a quantized one"),
        (["--embeddings", "garbage.pt"], "garbage.pt: cannot read: not a .pt file: it is neither"),
        (["--embeddings", "bad.npz"], "bad.npz: cannot read: not a valid .npz file"),
        (["--embeddings", "obj.pt"], "obj.pt: cannot read: torch.load(weights_only=True)"),
        (["--embeddings", "e.npy", "--device", "foo"], "--device: not a device: 'foo'"),
        (["--embeddings", "e.npy", "--output", "no/such/dir.json"], "its directory does not"),
        (["--embeddings", "e.npy", "--output", "."], "it is a directory"),
        # found by review: caught after the whole computation, or named wrongly
        (["--embeddings", "e.npy", "--output", "l.npy/x.json"], "l.npy is a file"),
        (["--embeddings", "e.npy", "--output", "/proc/x.json"], "/proc/x.json: cannot write"),
        (["--embeddings", "e.npy", "--output", "loop.json"], "loop.json: cannot write"),
        (["--embeddings", "e.npy", "--output", "x" * 300 + ".json"], "File name too long"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv, "--labels", "l.npy"]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
        assert captured.out == ""  # refused before any metric was computed
    left = [p for p in tmp_path.glob("*.json") if not p.is_symlink()]
    assert not left  # nothing left behind by the checks


def test_cli_output_to_a_pipe_or_through_a_dangling_link(tmp_path, capsys, monkeypatch):
    """(found by review of its writability check) a pipe was opened and closed before the
    results, ending its reader; a dangling link was replaced by a file."""
    import os
    import threading

    monkeypatch.chdir(tmp_path)
    np.save("e.npy", np.random.default_rng(0).random((20, 4), dtype=np.float32))
    np.save("l.npy", np.arange(20) % 3)
    argv = ["eval", "--embeddings", "e.npy", "--labels", "l.npy", "--metrics", "precision_at_1"]
    os.symlink("target.json", "link.json")
    assert main([*argv, "--output", "link.json"]) == 0
    assert (
        os.path.islink("link.json") and "precision_at_1" in (tmp_path / "target.json").read_text()
    )
    os.mkfifo("fifo")
    received = []
    reader = threading.Thread(target=lambda: received.append(open("fifo").read()))
    reader.start()
    assert main([*argv, "--output", "fifo"]) == 0
    reader.join(timeout=30)
    assert received and "precision_at_1" in received[0]
    capsys.readouterr()


def test_cli_reads_big_endian_arrays(tmp_path, capsys):
    x, y = _data()
    np.save(tmp_path / "be.npy", x.numpy().astype(">f4"))
    np.save(tmp_path / "y.npy", y.numpy().astype(">i8"))
    argv = ["eval", "--embeddings", str(tmp_path / "be.npy"), "--labels", str(tmp_path / "y.npy")]
    assert main([*argv, "--metrics", "precision_at_1"]) == 0
    expected = RetrievalAccuracyCalculator(include=("precision_at_1",)).get_accuracy(x, y)
    assert f"{expected['precision_at_1']:.4f}" in capsys.readouterr().out


def test_cli_metrics_naming_a_recall_k_add_it(tmp_path, capsys):
    x, y = _data()
    np.save(tmp_path / "e.npy", x.numpy())
    np.save(tmp_path / "l.npy", y.numpy())
    argv = ["eval", "--embeddings", str(tmp_path / "e.npy"), "--labels", str(tmp_path / "l.npy")]
    assert main([*argv, "--metrics", "recall_at_3", "precision_at_1"]) == 0
    expected = RetrievalAccuracyCalculator(include=("recall_at_3",), recall_ks=(3,))
    value = expected.get_accuracy(x, y)["recall_at_3"]
    assert f"| recall_at_3 | {value:.4f} |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "metric",
    ["mean_average_precision_at_r", "mean_average_precision", "r_precision", "precision_at_1"],
)
def test_a_query_label_missing_from_hand_made_counts_is_nan_as_in_pml(metric):
    """Counts given by hand without a query's label, the query in the reference set: its
    relevant count is 0 (not -1, which made an average precision of -0.0)."""
    kwargs = {
        "knn_labels": torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
        "query_labels": torch.tensor([0.0, 1.0]),
        "not_lone_query_mask": torch.ones(2, dtype=torch.bool),
        "label_counts": (torch.tensor([0.0]), torch.tensor([3])),
        "ref_includes_query": True,
    }
    ours = getattr(RetrievalAccuracyCalculator(), f"calculate_{metric}")(**kwargs)
    pml = getattr(AccuracyCalculator(), f"calculate_{metric}")(**kwargs)
    assert ours == pytest.approx(pml, nan_ok=True)


def test_relevant_counts_never_go_below_zero():
    from pml_margins.evaluation import relevant_counts

    count, relevant = relevant_counts(torch.tensor([5, 8]), torch.tensor([5, 5, 7]), True)
    assert count.tolist() == [2, 0] and relevant.tolist() == [1, 0]


def test_int64_minimum_embeddings_get_their_clustering_metrics():
    """abs(-2^63) overflows int64 back to -2^63: the range check read 3 and handed faiss
    the unscaled values, whose k-means aborted the process (so: in a subprocess)."""
    script = (
        "import torch\n"
        "from pml_margins.evaluation import RetrievalAccuracyCalculator as C\n"
        "x = torch.zeros(40, 8, dtype=torch.int64); x[::2] = -2**63; x[1::4, 1] = 3\n"
        "y = torch.arange(40) % 2\n"
        "print(C(include=('NMI', 'AMI')).get_accuracy(x, y))\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "{'AMI': 1.0, 'NMI': 1.0}"


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_embeddings_get_every_default_metric(dtype, tmp_path):
    """torch has no abs for uint16/32/64: the default metrics (NMI/AMI) raised
    NotImplementedError, and the CLI printed a traceback."""
    x = torch.arange(40).reshape(10, 4).to(dtype)
    y = torch.arange(10) // 2
    ours = RetrievalAccuracyCalculator().get_accuracy(x, y)
    torch.manual_seed(0)
    pml = AccuracyCalculator().get_accuracy(x.float(), y)
    assert {k: ours[k] for k in pml} == pytest.approx(pml)
    if dtype == torch.uint16:
        np.save(tmp_path / "e.npy", x.numpy())
        np.save(tmp_path / "l.npy", y.numpy())
        args = ["eval", "--embeddings", str(tmp_path / "e.npy"), "--labels"]
        assert main([*args, str(tmp_path / "l.npy")]) == 0


def test_a_users_knn_is_not_asked_for_zero_neighbours():
    """num_excluded_queries alone needs no search, but a user's knn_func was called with
    k=0, which faiss's HNSW index refuses."""
    import faiss
    from pytorch_metric_learning.utils.inference import FaissKNN

    q, ql = _data(20, 3, 4, seed=1)
    r, rl = _data(25, 3, 4, seed=2)
    knn = FaissKNN(index_init_fn=lambda d: faiss.IndexHNSWFlat(d, 8))
    for include in [("num_excluded_queries",), ("num_excluded_queries", "NMI")]:
        result = RetrievalAccuracyCalculator(include=include, knn_func=knn).get_accuracy(
            q, ql, r, rl
        )
        assert result["num_excluded_queries"] == 0


@pytest.mark.parametrize(
    "calculator", [RetrievalAccuracyCalculator, ShardedRetrievalAccuracyCalculator]
)
def test_get_accuracy_refuses_a_str_include_or_exclude(calculator):
    """The constructor refused a str; get_accuracy read it letter by letter: include=
    'precision_at_1' returned {} and exclude='NMI' matched as a substring."""
    x, y = _data()
    calc = calculator()
    for kwargs in ({"include": "precision_at_1"}, {"exclude": "NMI"}):
        with pytest.raises(TypeError, match="must be a tuple or list, got str"):
            calc.get_accuracy(x, y, **kwargs)
    assert set(calc.get_accuracy(x, y, include=["precision_at_1"])) == {"precision_at_1"}


def _equal(a, b):
    return a == b


def _stable(result: dict) -> str:
    """The metrics without NMI/AMI, whose k-means need not repeat run to run (faiss's
    threads: the settings under test decide the k-nn), as text (exact, NaN equal to NaN,
    per-class lists too)."""
    return repr({k: v for k, v in result.items() if k not in ("NMI", "AMI")})


def _same_as_built(change: dict, built_with: dict | None = None) -> None:
    """A calculator given ``change`` after construction computes what one built with it
    computes (all metrics, offset data: the search's distance matters)."""
    x, y = _data(n=80, classes=5)
    x = x + torch.tensor([3.0, 0.0, 0.0, 0.0])
    later = RetrievalAccuracyCalculator(**(built_with or {}))
    for name, value in change.items():
        setattr(later, name, value)
    settings = {**(built_with or {}), **change}
    if "distance" in change or "knn_func" in change:  # (each replaces the other)
        settings.pop("knn_func" if "distance" in change else "distance", None)
    fresh = RetrievalAccuracyCalculator(**settings)
    assert _stable(later.get_accuracy(x, y)) == _stable(fresh.get_accuracy(x, y))
    assert re.sub(" at 0x[0-9a-f]+", "", repr(later)) == re.sub(" at 0x[0-9a-f]+", "", repr(fresh))


def test_settings_assigned_later_act_as_at_construction():
    """distance was derived once at construction: a later value was shown but ignored (the
    search stayed squared Euclidean: P@1 0.2 for cosine's 0.2167); k = -3 was taken
    unchecked (P@1 0.0); a later recall_ks was shown by repr but computed nothing."""
    from pytorch_metric_learning.distances import CosineSimilarity, SNRDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    _same_as_built({"distance": CosineSimilarity()})
    _same_as_built({"knn_func": CustomKNN(CosineSimilarity())}, {"distance": CosineSimilarity()})
    _same_as_built({"distance": CosineSimilarity()}, {"knn_func": CustomKNN(CosineSimilarity())})
    _same_as_built({"distance": SNRDistance()})
    _same_as_built({"k": 5})
    _same_as_built({"k": "max_bin_count", "avg_of_avgs": True})
    _same_as_built({"label_comparison_fn": _equal}, {"include": ("precision_at_1",)})
    _same_as_built({"block_rows": 7, "num_threads": 1, "backend": "torch"})
    calc = RetrievalAccuracyCalculator(recall_ks=(1, 4))
    with pytest.raises(AttributeError, match="recall_ks is fixed at construction"):
        calc.recall_ks = (1, 16)
    calc.recall_ks = [4, 1]  # its own value: no change
    assert calc.recall_ks == (1, 4) and "recall_at_4" in calc.get_accuracy(*_data())


def test_settings_assigned_as_read_back_change_nothing():
    """Each setting read and assigned back: the same metrics. Re-assigning the read-back
    None of the search that was not given (knn_func on the exact path) or PML's EQUALITY
    comparison must not reset or replace anything."""
    import faiss
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN, FaissKNN

    x, y = _data(n=80, classes=5)
    x = x + torch.tensor([3.0, 0.0, 0.0, 0.0])
    builds = [
        {},
        {"distance": CosineSimilarity()},
        {"knn_func": CustomKNN(CosineSimilarity())},
        {"knn_func": FaissKNN(index_init_fn=faiss.IndexFlatIP)},
        {"include": ("precision_at_1",), "label_comparison_fn": _equal},
        {"return_per_class": True, "k": 7, "block_rows": 9, "num_threads": 1},
    ]
    for built_with in builds:
        calc = RetrievalAccuracyCalculator(**built_with)
        expected = _stable(calc.get_accuracy(x, y))
        for name in (*LATER_SETTINGS, "kmeans_func"):
            setattr(calc, name, getattr(calc, name))
        assert _stable(calc.get_accuracy(x, y)) == expected, built_with
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",))
    calc.label_comparison_fn = calc.label_comparison_fn
    with pytest.raises(ValueError, match="must be 1-D"):  # still equality: 1-D labels only
        calc.get_accuracy(x, torch.stack([y, y], 1))


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("k", -3, ValueError),
        ("k", True, TypeError),
        ("recall_ks", (0,), ValueError),
        ("num_threads", 0, ValueError),
        ("block_rows", 0, ValueError),
        ("backend", "gpu", ValueError),
        ("label_comparison_fn", 3, TypeError),
        ("label_comparison_fn", _equal, NotImplementedError),  # with NMI/AMI
        ("avg_of_avgs", True, ValueError),  # with return_per_class
        ("avg_of_avgs", "no", TypeError),  # (a string was taken by its truthiness)
        ("return_per_class", 1, TypeError),
        ("device", "meta", ValueError),
        ("knn_func", 3, TypeError),
    ],
)
def test_a_bad_setting_assigned_later_is_refused_and_changes_nothing(name, value, error):
    calc = RetrievalAccuracyCalculator(return_per_class=(name == "avg_of_avgs"))
    before = repr(calc), _stable(calc.get_accuracy(*_data()))
    with pytest.raises(error):
        setattr(calc, name, value)
    assert repr(calc) == before[0]
    assert _stable(calc.get_accuracy(*_data())) == before[1]


@pytest.mark.parametrize("name", ["avg_of_avgs", "return_per_class"])
@pytest.mark.parametrize("value", ["yes", "no", 1, None])
def test_the_averaging_switches_must_be_bools(name, value):
    """``avg_of_avgs="no"`` switched averaging on by its truthiness (PML's too)."""
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        RetrievalAccuracyCalculator(**{name: value})
    assert getattr(RetrievalAccuracyCalculator(**{name: np.bool_(True)}), name) is True


def test_the_sharded_calculator_refuses_a_search_assigned_later():
    from pytorch_metric_learning.distances import SNRDistance

    calc = ShardedRetrievalAccuracyCalculator()
    with pytest.raises(ValueError, match="cannot see the other ranks"):
        calc.distance = SNRDistance()
    assert calc.knn_func is None and calc.distance is None and calc.group is None


def test_the_sharded_calculator_names_the_faiss_knn_it_refuses():
    """A FaissKNN that keeps or reuses an index runs as PML's, which cannot see the other
    ranks: refused with its settings (the message showed the object's address)."""
    from pytorch_metric_learning.utils.inference import FaissKNN

    with pytest.raises(
        ValueError, match=r"got FaissKNN\(index_init_fn=IndexFlatL2, reset_after=False\)"
    ):
        ShardedRetrievalAccuracyCalculator(knn_func=FaissKNN(reset_after=False))
    with pytest.raises(
        ValueError, match=r"got FaissKNN\(index_init_fn=IndexFlatL2, reset_before=False\)"
    ):
        ShardedRetrievalAccuracyCalculator(knn_func=FaissKNN(reset_before=False))


def test_a_subclass_with_its_own_state_takes_later_settings():
    """A subclass whose metrics or hooks hang on state of its own (set before
    ``super().__init__``) kept working when a setting is assigned later."""

    class WithPrecisionAt3(RetrievalAccuracyCalculator):
        def __init__(self, **kwargs):
            self.calculate_precision_at_3 = lambda knn_labels, query_labels, **kw: 0.5
            super().__init__(**kwargs)

        def requires_knn(self):
            return [*super().requires_knn(), "precision_at_3"]

    calc = WithPrecisionAt3(include=("precision_at_3", "precision_at_1"))
    calc.k = "max_bin_count"
    assert calc.get_accuracy(*_data())["precision_at_3"] == 0.5


def test_later_settings_corners_found_by_the_fix_review():
    """A custom comparison with NMI/AMI was refused at construction but taken after a
    get_accuracy(include=...) had narrowed the current metrics; a calculator built with
    PML's EQUALITY changed when it was assigned back; del then assign raised; a distance
    changed in place and assigned again kept the old search; check_search saw a
    half-built calculator."""
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import EQUALITY

    x, y = _data(n=80, classes=5)
    calc = RetrievalAccuracyCalculator()
    calc.get_accuracy(x, y, include=("precision_at_1",))
    with pytest.raises(NotImplementedError, match="clustering"):
        calc.label_comparison_fn = _equal
    calc = RetrievalAccuracyCalculator(label_comparison_fn=EQUALITY, include=("precision_at_1",))
    expected = calc.get_accuracy(x, y + 0.5)  # EQUALITY given: the user's comparison
    calc.label_comparison_fn = calc.label_comparison_fn
    assert calc.get_accuracy(x, y + 0.5) == expected
    calc = RetrievalAccuracyCalculator()
    raw = LpDistance(normalize_embeddings=False)  # (the default search's ranking)
    for name, value in (("distance", raw), ("knn_func", None), ("backend", "auto")):
        delattr(calc, name)
        setattr(calc, name, value)
    assert _stable(calc.get_accuracy(x, y)) == _stable(
        RetrievalAccuracyCalculator().get_accuracy(x, y)
    )
    distance = LpDistance()
    calc = RetrievalAccuracyCalculator(distance=distance, include=("precision_at_1",))
    distance.normalize_embeddings = False
    calc.distance = distance
    fresh = RetrievalAccuracyCalculator(distance=distance, include=("precision_at_1",))
    assert calc.exact == fresh.exact == ("euclidean", False)

    class OnCpuOnly(RetrievalAccuracyCalculator):
        def check_search(self, exact, knn_func):
            if self.device is not None and self.device.type != "cpu":
                raise ValueError("cpu only")

    assert OnCpuOnly(device="cpu").get_accuracy(x, y)


def test_later_settings_corners_found_by_the_second_fix_review():
    """del then None kept the old search or comparison (or crashed on unpacking); a
    subclass's check_search was skipped for a later backend."""
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    x, y = _data(n=80, classes=5)
    default = _stable(RetrievalAccuracyCalculator().get_accuracy(x, y))
    for built_with, name in (
        ({"distance": CosineSimilarity()}, "distance"),
        ({"knn_func": CustomKNN(LpDistance(p=1))}, "knn_func"),
    ):
        calc = RetrievalAccuracyCalculator(**built_with)
        delattr(calc, name)
        setattr(calc, name, None)
        assert _stable(calc.get_accuracy(x, y)) == default, name
    calc = RetrievalAccuracyCalculator(label_comparison_fn=_equal, include=("precision_at_1",))
    del calc.label_comparison_fn
    calc.label_comparison_fn = None
    with pytest.raises(ValueError, match="must be 1-D"):  # the default comparison again
        calc.get_accuracy(x, torch.stack([y, y], 1))
    calc = RetrievalAccuracyCalculator()
    del calc.knn_func
    calc.k = 5  # (the check of the search reads what is there)

    class NoTorchBackend(RetrievalAccuracyCalculator):
        def check_search(self, exact, knn_func):
            if self.backend == "torch":
                raise ValueError("no torch backend")

    calc = NoTorchBackend()
    with pytest.raises(ValueError, match="no torch backend"):
        calc.backend = "torch"
    assert calc.backend == "auto"


def test_knn_func_reads_back_as_given_and_none_means_the_constructors_none():
    """A ``knn_func`` mapped to the exact k-nn read back as ``None`` (PML's reads back the
    object), so ``calc.knn_func = None`` was taken as "unchanged": the calculator kept
    cosine while every setting read as the default. ``None`` now means what it means in
    the constructor, and reading back gives what was given."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    x, y = _data(n=120, d=8, classes=12)
    x = x + 0.5
    include = ("precision_at_1", "mean_average_precision_at_r")
    default = _stable(RetrievalAccuracyCalculator(include=include).get_accuracy(x, y))
    cosine = _stable(
        RetrievalAccuracyCalculator(include=include, distance=CosineSimilarity()).get_accuracy(x, y)
    )
    assert default != cosine
    knn = CustomKNN(CosineSimilarity())
    calc = RetrievalAccuracyCalculator(include=include, knn_func=knn)
    assert calc.knn_func is knn and calc.distance is None
    calc.distance = None  # the knn_func's search stays, as RAC(knn_func=knn, distance=None)
    assert calc.knn_func is knn
    assert _stable(calc.get_accuracy(x, y)) == cosine
    calc.knn_func = None  # as RAC(knn_func=None): the default search
    assert calc.knn_func is None
    assert _stable(calc.get_accuracy(x, y)) == default
    calc = RetrievalAccuracyCalculator(include=include, distance=CosineSimilarity())
    calc.knn_func = None  # as RAC(distance=cosine, knn_func=None): cosine
    assert _stable(calc.get_accuracy(x, y)) == cosine
    calc.distance = None
    assert _stable(calc.get_accuracy(x, y)) == default


def test_include_and_exclude_assigned_later_are_refused():
    """They were taken as new attributes and silently ignored (AMI still computed); PML
    reads them only at construction, and per call in ``get_accuracy``."""
    calc = RetrievalAccuracyCalculator(include=("precision_at_1", "AMI"))
    for name in ("include", "exclude"):
        with pytest.raises(AttributeError, match="chosen at construction"):
            setattr(calc, name, ("precision_at_1",))
    assert set(calc.get_accuracy(*_data())) == {"precision_at_1", "AMI"}


def test_a_calculator_pickled_before_the_search_moved_runs_as_it_did():
    """Calculators pickled before ``knn_func`` read back as given (it held the search,
    ``None`` for the exact k-nn) failed with ``AttributeError: _custom_knn``."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = RetrievalAccuracyCalculator(
        include=("precision_at_1",), knn_func=CustomKNN(CosineSimilarity())
    )
    want = calc.get_accuracy(*_data())
    old = {**calc.__dict__, "knn_func": None}
    del old["_custom_knn"]
    restored = RetrievalAccuracyCalculator.__new__(RetrievalAccuracyCalculator)
    restored.__setstate__(old)
    assert restored.get_accuracy(*_data()) == want


def test_an_old_pickle_built_with_a_distance_reads_back_no_knn_func():
    """Its pickled ``knn_func`` held the derived search; read back as given it showed a
    ``CustomKNN`` never given, and ``distance = None`` then kept the old search."""
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = RetrievalAccuracyCalculator(include=("precision_at_1",), distance=LpDistance(p=1))
    old = {**calc.__dict__, "knn_func": CustomKNN(LpDistance(p=1))}
    del old["_custom_knn"]
    restored = RetrievalAccuracyCalculator.__new__(RetrievalAccuracyCalculator)
    restored.__setstate__(old)
    assert restored.knn_func is None
    restored.distance = None
    fresh = RetrievalAccuracyCalculator(include=("precision_at_1",))
    assert restored.get_accuracy(*_data()) == fresh.get_accuracy(*_data())


def test_older_calculator_pickles_keep_their_search_and_check_later_settings():
    """A pickle from before later settings were checked (no ``_built``) took any value
    (``k = -3``) and ignored a distance; one whose ``knn_func`` mapped to a non-default
    exact search changed search when a setting was assigned as read back."""
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    x, y = _data(n=60, d=4, classes=5)
    x = x + 2.0
    for given in ({"knn_func": CustomKNN(LpDistance())}, {}):
        calc = RetrievalAccuracyCalculator(include=("precision_at_1",), **given)
        want = _stable(calc.get_accuracy(x, y))
        old = {**calc.__dict__, "knn_func": None}
        for name in ("_custom_knn", "_built", "_recall_ks_built", "_own_recall_ks", "backend"):
            del old[name]
        restored = RetrievalAccuracyCalculator.__new__(RetrievalAccuracyCalculator)
        restored.__setstate__(old)
        for name in ("knn_func", "distance"):
            setattr(restored, name, getattr(restored, name))
            assert _stable(restored.get_accuracy(x, y)) == want, (given, name)
        with pytest.raises(ValueError):
            restored.k = -3
        restored.distance = CosineSimilarity()
        cosine = RetrievalAccuracyCalculator(
            include=("precision_at_1",), distance=CosineSimilarity()
        )
        assert _stable(restored.get_accuracy(x, y)) == _stable(cosine.get_accuracy(x, y))


@pytest.mark.parametrize("inference", [False, True], ids=["grad", "inference_mode"])
@pytest.mark.parametrize("k", [2, 3])
def test_faiss_padding_of_a_short_list_is_no_neighbour(k, inference):
    """An approximate index pads the lists it cannot fill with -1, whose label lookup reads
    the last reference's label: counted, recall_at_2 was 1.0 and MAP 0.5 (PML's) where no
    true neighbour was found; also under inference mode (Lightning's validation), where
    the PML metrics rebuild their matches from knn_labels. With a full list the metrics
    equal PML's."""
    q, r = torch.randn(4, 3), torch.randn(6, 3)
    ql, rl = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 5, 5, 5, 5, 3])
    filled = {"value": 0}

    def knn(query, k, reference, ref_includes_query=False):
        if filled["value"]:  # the label-3 reference first, then 0, 1, ...
            indices = torch.cat([torch.tensor([5]), torch.arange(k - 1)]).repeat(len(query), 1)
        else:  # a label-5 reference, then padding
            indices = torch.full((len(query), k), -1, dtype=torch.long)
            indices[:, 0] = 0
        return torch.zeros(len(query), k), indices

    include = ("precision_at_1", "mean_average_precision", "mean_average_precision_at_r")
    include += ("mean_reciprocal_rank", "r_precision")
    ours = RetrievalAccuracyCalculator(knn_func=knn, include=(*include, "recall_at_2"), k=k)
    with torch.inference_mode(inference):
        result = ours.get_accuracy(q, ql, r, rl)
    assert result == {name: 0.0 for name in (*include, "recall_at_2")}
    filled["value"] = 1  # a full list: as PML
    theirs = AccuracyCalculator(knn_func=knn, include=include, k=k).get_accuracy(q, ql, r, rl)
    result = ours.get_accuracy(q, ql, r, rl)
    assert {n: result[n] for n in include} == pytest.approx(theirs)
    assert result["precision_at_1"] == result["recall_at_2"] == 1.0
