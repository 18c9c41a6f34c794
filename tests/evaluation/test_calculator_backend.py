"""Issue 16: the calculators take the exact k-nn's ``backend`` as a public parameter (as
``exact_knn`` does), with the same results whichever backend runs, and checked at
construction."""

import sys
from unittest import mock

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_margins.cli import main
from pml_margins.distributed import ShardedRetrievalAccuracyCalculator
from pml_margins.distributed import evaluation as sharded_module
from pml_margins.evaluation import RetrievalAccuracyCalculator, cli_eval, knn
from pml_margins.evaluation import calculator as calculator_module

CALCULATORS = [RetrievalAccuracyCalculator, ShardedRetrievalAccuracyCalculator]


def _data():
    """Off-centre data with exact duplicates: where a float32 pass alone would go wrong."""
    g = torch.Generator().manual_seed(3)
    base = 1000 + torch.randn(60, 16, generator=g)
    x = torch.cat([base, base[:20]])  # 20 exact duplicates
    return x, torch.arange(80) % 7


@pytest.mark.parametrize("cls", CALCULATORS)
@pytest.mark.parametrize("distance", [None, "cosine"])
def test_every_backend_gives_the_same_metrics_and_reaches_the_knn(cls, distance):
    from pytorch_metric_learning.distances import CosineSimilarity

    x, y = _data()
    dist = CosineSimilarity() if distance else None
    results, seen = {}, []
    real = knn.knn_float64

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend", args[-1] if len(args) == 9 else "auto"))
        return real(*args, **kwargs)

    for backend in ("auto", "faiss", "torch"):
        calc = cls(k=12, distance=dist, backend=backend, recall_ks=(1, 5))
        assert calc.backend == backend
        with (
            mock.patch.object(knn, "knn_float64", spy),
            mock.patch.object(sharded_module, "knn_float64", spy),
        ):
            results[backend] = calc.get_accuracy(x, y)
    assert results["auto"] == results["faiss"] == results["torch"]
    assert seen == ["auto", "faiss", "torch"]


@pytest.mark.parametrize("cls", CALCULATORS)
def test_bad_backends_are_refused_at_construction(cls, monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'sklearn'"):
        cls(backend="sklearn")
    with pytest.raises(ValueError, match=r"backend must be one of .* got array"):
        cls(backend=np.array(["faiss"]))  # (compared element-wise, it passed `in`)
    with pytest.raises(ValueError, match="backend='faiss' needs CPU tensors, got device cuda"):
        cls(backend="faiss", device="cuda")
    monkeypatch.setitem(sys.modules, "faiss", None)  # not installed
    with pytest.raises(ImportError):
        cls(backend="faiss")
    assert cls(backend="torch").backend == "torch"


def test_a_knn_func_run_as_pml_takes_only_auto():
    custom = CustomKNN(LpDistance(p=1))
    calc = RetrievalAccuracyCalculator(knn_func=custom)
    assert calc.backend == "auto"
    with pytest.raises(ValueError, match=r"backend='torch' .* LpDistance\(p=1, power=1"):
        RetrievalAccuracyCalculator(knn_func=custom, backend="torch")
    from pytorch_metric_learning.utils.inference import FaissKNN

    with pytest.raises(
        ValueError,
        match=r"but FaissKNN\(index_init_fn=IndexFlatL2, reset_before=False\) runs as PML's ",
    ):
        RetrievalAccuracyCalculator(knn_func=FaissKNN(reset_before=False), backend="faiss")


def test_the_calculator_passes_backend_and_threads_to_exact_knn():
    x, y = _data()
    calc = RetrievalAccuracyCalculator(k=5, backend="torch", num_threads=1)
    with mock.patch.object(
        calculator_module, "exact_knn", wraps=calculator_module.exact_knn
    ) as wrapped:
        calc.get_accuracy(x, y, include=("precision_at_1",))
    assert wrapped.call_args.kwargs["backend"] == "torch"
    assert wrapped.call_args.kwargs["num_threads"] == 1


def test_cli_backend_and_threads_flags(tmp_path, capsys):
    import numpy as np

    x, y = _data()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    argv = ["eval", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")]
    outputs = []
    for flags in ([], ["--backend", "torch", "--num-threads", "1"], ["--backend", "faiss"]):
        assert main([*argv, *flags]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    assert main([*argv, "--num-threads", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--num-threads" in err
    assert cli_eval.BACKEND_CHOICES == knn.BACKENDS


def test_thread_counts_are_bounded_everywhere(tmp_path, capsys):
    """A million threads crashed torch's pool (bad_alloc, a traceback from the CLI)."""
    from pml_margins.distributed import sharded_exact_knn

    x = torch.randn(10, 3)
    too_many = knn.MAX_THREADS + 1
    for call in (
        lambda: RetrievalAccuracyCalculator(num_threads=too_many),
        lambda: ShardedRetrievalAccuracyCalculator(num_threads=too_many),
        lambda: knn.exact_knn(x, x, 2, num_threads=too_many),
        lambda: sharded_exact_knn(x, x, 2, num_threads=too_many),
    ):
        with pytest.raises(ValueError, match=r"num_threads must be an integer in \[1, 1024\]"):
            call()
    assert knn.check_num_threads(knn.MAX_THREADS) == knn.MAX_THREADS
    import numpy as np

    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", np.arange(10) % 2)
    argv = ["eval", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")]
    assert main([*argv, "--num-threads", "1000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--num-threads must be an integer in [1, 1024]" in err


def test_big_endian_numpy_input_is_read():
    """torch.from_numpy refuses non-native byte order with its own message (PML too); the
    calculator and exact_knn read such arrays (saved on another machine) as they are."""
    import numpy as np

    x, y = _data()
    big_x, big_y = x.numpy().astype(">f4"), y.numpy().astype(">i8")
    calc = RetrievalAccuracyCalculator(k=10)
    assert calc.get_accuracy(big_x, big_y) == calc.get_accuracy(x, y)
    got = knn.exact_knn(big_x, x.numpy().astype(">f8"), 3)
    expected = knn.exact_knn(x, x.double(), 3)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
    assert np.asarray(big_x).dtype.byteorder == ">"  # the caller's array is left as it was
