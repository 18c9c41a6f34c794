"""The exact k-nn against a float64 brute force (numpy, direct formula)."""

import sys

import numpy as np
import pytest
import torch
from conftest import brute_force_neighbours, make_data
from threadpoolctl import threadpool_info

from pml_margins.evaluation import exact_knn, float32_error_bound
from pml_margins.evaluation import knn as knn_module


def _check(q, r, k, exclude_self=False, metric="euclidean", **kw):
    values, indices = exact_knn(q, r, k, metric=metric, exclude_self=exclude_self, **kw)
    if isinstance(q, torch.Tensor):  # the brute force reads the given values in float64
        q, r = q.double(), r.double()
    ref_metric = "dot" if metric == "dot" else "euclidean"
    expected = brute_force_neighbours(q, r, exclude_self, ref_metric)[:, :k]
    np.testing.assert_array_equal(indices.numpy(), expected)
    q64, r64 = np.asarray(q, np.float64), np.asarray(r, np.float64)
    picked = r64[expected]
    if metric == "dot":
        want = (picked * q64[:, None]).sum(-1)
    else:
        want = ((picked - q64[:, None]) ** 2).sum(-1)
        want = np.sqrt(want) if metric == "euclidean" else want
    np.testing.assert_allclose(values.double().numpy(), want, rtol=1e-6, atol=1e-6)
    return values, indices


@pytest.mark.parametrize("offset", [0.0, 100.0, 1e3, 1e4, 1e6])
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_off_centre_data_equal_brute_force(offset, same, backend):
    # issue 16.1: 1000 + N(0, 1) had 253 of 400 nearest neighbours wrong
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 32, generator=g) + offset
    if same:
        _check(x, x, 5, exclude_self=True, block_rows=64, backend=backend)
    else:
        _check(x[:150], x[150:], 5, block_rows=64, backend=backend)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "dot"])
@pytest.mark.parametrize("block_rows", [None, 3, 7, 64])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_duplicates_tie_exactly_and_go_to_the_lower_index(metric, block_rows, backend):
    # issue 16.2: copies of one point got 1.2657978 and 1.2657980
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 13, generator=g).repeat(10, 1) + 50.0  # odd width, off-centre
    values, indices = _check(x, x, 15, True, metric, block_rows=block_rows, backend=backend)
    for row in range(len(x)):  # the 9 other copies: equal values, ascending indices
        copies = indices[row, :9] if metric != "dot" else None
        if copies is not None:
            assert torch.equal(copies, torch.tensor([i for i in range(row % 5, 50, 5) if i != row]))
            assert (values[row, :9] == 0).all()
        assert len(torch.unique(values[row, :9])) == 1


def test_results_do_not_depend_on_block_size_or_threads():
    x, _ = make_data("clustered", 600, 16, 20, seed=2)
    x = torch.cat([x, x[:100]]) + 1000.0  # duplicates straddling blocks
    threads_before = (torch.get_num_threads(), threadpool_info())
    runs = [
        exact_knn(x, x, 12, exclude_self=True, block_rows=b, num_threads=t, backend=e)
        for b in (None, 7, 64, 333)
        for t in (1, 2)
        for e in ("faiss", "torch")
    ]
    for values, indices in runs[1:]:
        assert torch.equal(indices, runs[0][1]) and torch.equal(values, runs[0][0])
    _check(x, x, 12, exclude_self=True, block_rows=64)
    assert (torch.get_num_threads(), threadpool_info()) == threads_before  # restored


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_large_duplicate_groups_use_the_retry_path(monkeypatch, backend):
    # 40 copies per point: far more than the first pass's margin around k = 3
    calls = []
    original = knn_module._candidate_pass

    def spy(a, *args):
        calls.append((len(a), args[2]))
        return original(a, *args)

    monkeypatch.setattr(knn_module, "_candidate_pass", spy)
    x = torch.randn(3, 6).repeat(40, 1)
    _check(x, x, 3, exclude_self=True, block_rows=16, backend=backend)
    assert len(calls) > 1 and calls[1][1] > calls[0][1]


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_error_bound_holds(metric, offset):
    """float32 candidate costs (the tile products both backends select from) lie within
    the bound of the exact ones: float64, from the unrounded centred and scaled data;
    Euclidean as |a - b|^2 / 2."""
    g = torch.Generator().manual_seed(3)
    q64 = torch.randn(64, 200, generator=g, dtype=torch.float64) * 3 + offset
    r64 = torch.randn(300, 200, generator=g, dtype=torch.float64) * 3 + offset
    a, b, a_norms, b_norms = knn_module._float32_operands(q64, r64, metric, False, False)
    centre = r64.mean(0) if metric != "dot" else torch.zeros(200, dtype=torch.float64)
    qc, rc = q64 - centre, r64 - centre
    scale = 2.0 ** -np.frexp(max(float(qc.abs().max()), float(rc.abs().max())))[1]
    qc, rc = qc * scale, rc * scale
    right, out = torch.empty(b.shape), torch.empty(len(a) * len(b))
    approx = knn_module._tile_costs(a, b, metric, right, out).double()
    if metric == "dot":
        exact = -(qc @ rc.T)
    else:
        exact = ((qc[:, None] - rc[None]) ** 2).sum(-1) / 2
    torch.testing.assert_close(a_norms, qc.norm(dim=1), rtol=1e-6, atol=0)
    bound = float32_error_bound(a_norms, float(b_norms.max()), 200, metric)
    err = (approx - exact).abs().max(dim=1).values
    assert (err <= bound).all()
    assert (err > bound / 1e4).all()  # and the bound is not vacuous


def test_huge_values_and_integers_and_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(80, 8, generator=g) * 1e18  # squares overflow float32
    _check(x, x, 4, exclude_self=True)
    xi = torch.randint(-3, 4, (70, 5), generator=g)  # PML's tests use integer embeddings
    values, _ = _check(xi, xi, 6, exclude_self=True)
    assert values.dtype == torch.float32
    xd = torch.randn(90, 6, generator=g, dtype=torch.float64) + 1e8
    values, _ = _check(xd, xd, 3, exclude_self=True)
    assert values.dtype == torch.float64


def test_numpy_input_and_cosine():
    rng = np.random.default_rng(5)
    q, r = rng.standard_normal((30, 7)).astype(np.float32), rng.standard_normal((50, 7))
    _check(q, r, 4, metric="dot")
    values, indices = exact_knn(q, r, 4, metric="dot", normalize=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    np.testing.assert_array_equal(
        indices.numpy(), brute_force_neighbours(qn, rn, False, "dot")[:, :4]
    )
    np.testing.assert_allclose(
        values.numpy(), np.sort(qn @ rn.T, axis=1)[:, ::-1][:, :4], rtol=1e-6
    )


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("same", [True, False])
def test_faiss_heaps_keep_the_smallest_costs(metric, same):
    """Each candidate pass (mirror tiles included) keeps, per row, the smallest costs: a full
    sort of the whole cost matrix is the reference (one product, so its float32
    rounding differs from the tiles' in the last bits)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(230, 9, generator=g) * 4 + 20
    q, r = (x, x) if same else (x[:100], x[100:])
    a, b, _, _ = knn_module._float32_operands(q, r, metric, False, same)
    full = knn_module._tile_costs(a, b, metric, torch.empty(b.shape), torch.empty(len(a) * len(b)))
    if same:
        full.fill_diagonal_(torch.inf)
    self_columns = torch.arange(len(a)) if same else None
    width = 11
    for workers in (0, 1, 3):  # torch.topk; faiss heaps in 1 or 3 threads, merged
        costs, columns = knn_module._candidate_pass(
            a, b, metric, width, self_columns, 32, workers, False
        )
        expected = torch.sort(full, dim=1).values[:, :width]
        torch.testing.assert_close(torch.sort(costs, dim=1).values, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(full.gather(1, columns), costs, rtol=0, atol=1e-6)


def test_coordinates_near_the_float32_limit():
    # centred on the mean (-2e38), 3e38 becomes 5e38: beyond float32, so the scale is
    # chosen in float64; distances beyond float32 come back as inf, as float32 values
    x = torch.tensor([[3.0e38, 0.0]] + [[-3.0e38, float(i)] for i in range(5)])
    x = torch.cat([x, torch.tensor([[1e-30, 0.0], [0.0, 1e-30]])])
    for backend in ("faiss", "torch"):
        for metric, k in (("euclidean", 4), ("dot", 2)):
            values, indices = exact_knn(x, x, k, metric=metric, exclude_self=True, backend=backend)
            want = brute_force_neighbours(x, x, True, metric)[:, :k]
            np.testing.assert_array_equal(indices.numpy(), want)
            x64 = x.double().numpy()
            if metric == "dot":
                exact = (x64[want] * x64[:, None]).sum(-1)
            else:
                exact = np.sqrt(((x64[want] - x64[:, None]) ** 2).sum(-1))
            with np.errstate(over="ignore"):  # float32 values beyond its range: inf
                exact = exact.astype(np.float32)
            np.testing.assert_allclose(values.numpy(), exact, rtol=1e-6)
    with pytest.raises(ValueError, match="float64"):
        big = torch.tensor([[1.7e308], [-1.7e308], [-1.7e308]], dtype=torch.float64)
        exact_knn(big, big, 1)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_reduced_precision_matmul_settings_are_ignored_and_restored(device):
    # TF32 (CUDA) or bfloat16 (CPU oneDNN) products would break the float32 error bound
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = (torch.randn(400, 48, generator=torch.Generator().manual_seed(9)) + 300).to(device)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        _, indices = exact_knn(x, x, 6, exclude_self=True, backend="torch")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    want = brute_force_neighbours(x.cpu(), x.cpu(), True)[:, :6]
    np.testing.assert_array_equal(indices.cpu().numpy(), want)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_reduced_precision_through_the_new_precision_api_is_ignored_and_restored(backend):
    """``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (torch >= 2.9's way to turn
    on TF32) made every call fail: the legacy getter the engine read raises after it
    (found by review)."""
    matmul = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    if not all(hasattr(b, "fp32_precision") for b in matmul):
        pytest.skip("torch < 2.9: no per-backend fp32_precision")
    x = torch.randn(400, 48, generator=torch.Generator().manual_seed(9)) + 300
    before = [b.fp32_precision for b in matmul]
    try:
        matmul[0].fp32_precision, matmul[1].fp32_precision = "tf32", "bf16"
        _, indices = exact_knn(x, x, 6, exclude_self=True, backend=backend)
        assert [b.fp32_precision for b in matmul] == ["tf32", "bf16"]
    finally:
        for b, value in zip(matmul, before, strict=True):
            b.fp32_precision = value
    want = brute_force_neighbours(x, x, True)[:, :6]
    np.testing.assert_array_equal(indices.numpy(), want)


def test_auto_backend_falls_back_to_torch_without_faiss(monkeypatch):
    x, _ = make_data("clustered", 300, 8, 10, seed=8)
    with_faiss = exact_knn(x, x, 7, exclude_self=True)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    without = exact_knn(x, x, 7, exclude_self=True)
    assert torch.equal(without[1], with_faiss[1]) and torch.equal(without[0], with_faiss[0])
    with pytest.raises(ImportError):
        exact_knn(x, x, 7, backend="faiss")


@pytest.mark.parametrize(
    ("query", "error", "match"),
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), ValueError, "NaN or Inf"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), ValueError, "NaN or Inf"),
        (torch.ones(2, 2, dtype=torch.complex64), TypeError, "floating, integer or bool"),
        ([[0.0, 1.0]], TypeError, "torch.Tensor or numpy.ndarray"),
        (torch.ones(3), ValueError, "2-D"),
        (torch.ones(0, 2), ValueError, "empty"),
    ],
)
def test_bad_input(query, error, match):
    # issue 16.7: a NaN row returned indices -1, an Inf row 0, 1, 2
    with pytest.raises(error, match=match):
        exact_knn(query, torch.ones(4, 2), 1)


def test_bad_arguments():
    x = torch.randn(5, 3)
    for k in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match="k must"):
            exact_knn(x, x, k)
    with pytest.raises(ValueError, match="k must"):
        exact_knn(x, x, 5, exclude_self=True)
    with pytest.raises(ValueError, match="width"):
        exact_knn(x, torch.randn(5, 4), 1)
    with pytest.raises(ValueError, match="metric"):
        exact_knn(x, x, 1, metric="cosine")
    with pytest.raises(ValueError, match="block_rows"):
        exact_knn(x, x, 1, block_rows=0)
    with pytest.raises(ValueError, match="num_threads"):
        exact_knn(x, x, 1, num_threads=0)
    with pytest.raises(ValueError, match="backend"):
        exact_knn(x, x, 1, backend="sklearn")
    assert exact_knn(x, x, 0)[1].shape == (5, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    x, _ = make_data("clustered", 3000, 32, 30, seed=6)
    x = torch.cat([x, x[:500]]) + 1000.0
    cpu = exact_knn(x, x, 20, exclude_self=True)
    gpu = exact_knn(x.cuda(), x.cuda(), 20, exclude_self=True)
    assert torch.equal(gpu[1].cpu(), cpu[1])
    assert torch.equal(gpu[0].cpu(), cpu[0])
    with pytest.raises(ValueError, match="CPU"):
        exact_knn(x.cuda(), x.cuda(), 2, backend="faiss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.int64]
)
@pytest.mark.parametrize("metric", ["sqeuclidean", "dot"])
def test_cuda_rescoring_from_each_dtype_equals_cpu(dtype, metric):
    """On CUDA the candidates enter the float64 re-scoring in their own dtype (no float64
    copy): the values and the ties (duplicates) are those of float64 input, bit for bit,
    and (small integer values: every sum exact in any order) the CPU's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 9, (900, 24), generator=gen)
    x = x if dtype == torch.uint8 else x - 100  # off-centre where the dtype holds it
    x = torch.cat([x, x[:300]]).to(dtype)  # 300 rows twice: exact ties
    for normalize in (False, True):
        opts = {"metric": metric, "normalize": normalize, "exclude_self": True}
        gpu = exact_knn(x.cuda(), x.cuda(), 40, **opts)
        wide = exact_knn(x.cuda().double(), x.cuda().double(), 40, **opts)
        assert torch.equal(gpu[1], wide[1])
        assert torch.equal(gpu[0], wide[0].to(gpu[0].dtype))
        if not normalize:
            cpu = exact_knn(x, x, 40, **opts)
            assert torch.equal(gpu[1].cpu(), cpu[1])
            assert torch.equal(gpu[0].cpu(), cpu[0])


def test_inference_mode_reaches_the_rescoring_threads() -> None:
    """Under ``torch.inference_mode`` (Lightning's validation) the float64 re-scoring,
    spread over worker threads, writes its inference-mode output, same result."""
    x = torch.randn(1500, 64, generator=torch.Generator().manual_seed(0))  # many chunks
    with torch.inference_mode():
        values, indices = exact_knn(x, x, 20, exclude_self=True, num_threads=2)
    expected = exact_knn(x, x, 20, exclude_self=True, num_threads=1)
    assert torch.equal(values, expected[0]) and torch.equal(indices, expected[1])


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_a_whole_shard_keeps_the_query_itself_at_the_worst_value(metric) -> None:
    """``self_offset`` with ``k`` = the shard size (sharded evaluation): the query's own
    reference is returned last with the worst value, by index (faiss's heaps left it -1)."""
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(10))
    shard, offset = x[4:9], 4
    runs = [
        knn_module.knn_float64(x, shard, len(shard), metric, self_offset=offset, backend=b)
        for b in ("faiss", "torch")
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    values, indices = runs[0]
    worst = -torch.inf if metric == "dot" else torch.inf
    for i in range(offset, offset + len(shard)):
        assert indices[i, -1] == i - offset and values[i, -1] == worst
    assert (indices >= 0).all() and torch.isfinite(values[:offset]).all()


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("normalize", [False, True])
def test_whole_lists_skip_the_float32_pass_and_equal_the_brute_force(metric, normalize):
    """k = N - 1 (PML's k=None): every reference is re-scored in place (no gather, no
    float32 candidates), with duplicates and a large offset; values equal the gathered
    re-scoring's bit for bit."""
    from pml_margins.evaluation import knn as engine

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 24, generator=g)[torch.randint(0, 25, (90,), generator=g)] + 500.0
    _, indices = exact_knn(x, x, len(x) - 1, metric=metric, normalize=normalize, exclude_self=True)
    x64 = x.double()  # the brute force with the engine's float64 formulas
    if normalize:
        x64 = x64 / torch.linalg.vector_norm(x64, dim=-1, keepdim=True).clamp(min=1e-12)
    if metric == "dot":
        key = -(x64[:, None] * x64[None]).sum(-1)
    else:
        key = ((x64[:, None] - x64[None]) ** 2).sum(-1)
    key.fill_diagonal_(torch.inf)
    want = torch.sort(key, dim=1, stable=True).indices[:, : len(x) - 1]
    assert torch.equal(indices, want)
    columns = torch.stack([torch.randperm(len(x), generator=g) for _ in range(len(x))])
    with engine.thread_limit(1, libraries=False):
        wide = engine._rescore_wide(x, x, columns, metric, normalize, 2)
        one_column = [columns[:, c : c + 1] for c in range(len(x))]
        gathered = torch.cat(
            [engine._rescore(x, x, c, metric, normalize, 1) for c in one_column], 1
        )
    assert torch.equal(wide, gathered)


@pytest.mark.parametrize(
    ("query", "dtype"),
    [
        (torch.arange(0, 12 * 257, 257)[:, None], torch.bfloat16),  # 257 -> 256 in bfloat16
        (torch.tensor([[2049], [2048], [2051], [0]], dtype=torch.int32), torch.float16),
        (torch.tensor([[2**24 - 1], [2**24], [2**24 + 1], [2**24 + 9]]), torch.float32),
    ],
    ids=["int64_bf16", "int32_fp16", "int64_fp32"],
)
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("metric", ["sqeuclidean", "dot"])
def test_sets_of_other_dtypes_are_not_taken_for_one_another(query, dtype, exclude_self, metric):
    """``torch.equal`` compares after promotion (int64 2^24 + 1 equals its float32
    rounding): the reference's own values are ranked, not the query's."""
    reference = query.to(dtype)
    assert torch.equal(query, reference) and not torch.equal(query.double(), reference.double())
    k = len(query) - 1
    _check(query, reference, k, exclude_self=exclude_self, metric=metric)
    _check(query, reference, 1, exclude_self=exclude_self, metric=metric)


@pytest.mark.parametrize("k", [5, 19])
def test_float64_distances_are_correctly_rounded_square_roots(k):
    """The returned float64 distance is the correctly rounded square root of the exact
    squared distance (torch's vectorized float64 sqrt is 1 ulp off for ~1% of inputs)."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((200, 4)))
    values, indices = exact_knn(x, x, k, metric="euclidean", exclude_self=True)
    squares, same = exact_knn(x, x, k, metric="sqeuclidean", exclude_self=True)
    assert torch.equal(indices, same)
    np.testing.assert_array_equal(values.numpy(), np.sqrt(squares.numpy()))
