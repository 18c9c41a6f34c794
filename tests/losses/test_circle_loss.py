"""CircleLoss: formula references (float64, written here), PML equality, miners, ref_emb."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

import pml_margins.losses.circle as circle_module
from pml_margins.functional import (
    circle_loss_dense,
    circle_loss_dense_negatives,
    circle_loss_masked,
    circle_loss_pairs,
    segment_logsumexp,
)
from pml_margins.losses import CircleLoss

F64 = torch.float64


# --- references written from the formulas ------------------------------------------
def _cos(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (x / x.norm(dim=1, keepdim=True)) @ (r / r.norm(dim=1, keepdim=True)).T


def _anchor_loss(sp: torch.Tensor, sn: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    """log(1 + sum_j exp(g a_n (s_n - m)) * sum_i exp(-g a_p (s_p - (1 - m)))), a's detached."""
    a_p = torch.clamp(1 + m - sp.detach(), min=0)
    a_n = torch.clamp(sn.detach() + m, min=0)
    neg = torch.exp(gamma * a_n * (sn - m)).sum()
    pos = torch.exp(-gamma * a_p * (sp - (1 - m))).sum()
    return torch.log(1 + neg * pos)


def _pairs_from(labels, ref_labels, same_set):
    pos, neg = set(), set()
    for a in range(len(labels)):
        for r in range(len(ref_labels)):
            if same_set and a == r:
                continue
            (pos if labels[a] == ref_labels[r] else neg).add((a, r))
    return pos, neg


def _pairs_from_tuple(indices_tuple):
    if len(indices_tuple) == 3:
        a, p, n = (t.tolist() for t in indices_tuple)
        return set(zip(a, p, strict=True)), set(zip(a, n, strict=True))
    a1, p, a2, n = (t.tolist() for t in indices_tuple)
    return set(zip(a1, p, strict=True)), set(zip(a2, n, strict=True))


def ref_per_anchor(x, r, pos, neg, m, gamma):
    """Mean over anchors with a non-zero loss (PML's AvgNonZeroReducer)."""
    sim = _cos(x, r)
    losses = []
    for a in range(x.shape[0]):
        ps = [sim[a, j] for (i, j) in sorted(pos) if i == a]
        ns = [sim[a, j] for (i, j) in sorted(neg) if i == a]
        if ps and ns:
            losses.append(_anchor_loss(torch.stack(ps), torch.stack(ns), m, gamma))
    losses = [v for v in losses if v > 0]
    return torch.stack(losses).mean() if losses else (x * 0).sum()


def ref_whole(x, r, pos, neg, m, gamma):
    sim = _cos(x, r)
    if not pos or not neg:
        return (x * 0).sum()
    sp = torch.stack([sim[i, j] for (i, j) in sorted(pos)])
    sn = torch.stack([sim[i, j] for (i, j) in sorted(neg)])
    return _anchor_loss(sp, sn, m, gamma)


def _data(b=12, d=6, classes=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y


def _value_and_grad(fn, *inputs):
    value = fn()
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), [
        torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs, strict=True)
    ]


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- formula ----------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "gamma"), [(0.25, 32.0), (0.4, 80.0), (0.0, 4.0), (0.25, 128.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_labels_only_matches_formula(m, gamma, seed):
    x, y = _data(seed=seed)
    pos, neg = _pairs_from(y.tolist(), y.tolist(), same_set=True)
    ours = _value_and_grad(lambda: CircleLoss(m=m, gamma=gamma)(x, y), x)
    ref = _value_and_grad(lambda: ref_per_anchor(x, x, pos, neg, m, gamma), x)
    _close(ours[0], ref[0])
    _close(ours[1][0], ref[1][0])


@pytest.mark.parametrize("seed", [0, 1])
def test_whole_batch_matches_seed_formula(seed):
    """Seed 003: one log-sum over each unordered pair of the batch once."""
    x, y = _data(seed=seed)
    pos, neg = _pairs_from(y.tolist(), y.tolist(), same_set=True)
    pos = {(i, j) for (i, j) in pos if i < j}
    neg = {(i, j) for (i, j) in neg if i < j}
    ours = _value_and_grad(lambda: CircleLoss(m=0.25, gamma=16, per_anchor=False)(x, y), x)
    ref = _value_and_grad(lambda: ref_whole(x, x, pos, neg, 0.25, 16), x)
    _close(ours[0], ref[0])
    _close(ours[1][0], ref[1][0])


def test_whole_batch_with_a_second_view_keeps_every_pair():
    """``loss(x, y, None, r, y)``: the labels object is the batch's (PML's rule drops the
    ``(i, i)`` positives), but ``r`` is another set: no pair is taken as a duplicate."""
    x, y = _data(seed=5)
    r, _ = _data(seed=6)
    pos, neg = _pairs_from(y.tolist(), y.tolist(), same_set=True)
    loss = CircleLoss(m=0.25, gamma=16, per_anchor=False)
    _check_whole(lambda: loss(x, y, None, r, y), x, r, pos, neg)


def _check_whole(call, x, r, pos, neg):
    """``call()``'s value and gradients against the whole-set reference on ``pos``/``neg``."""
    ours = _value_and_grad(call, x, r)
    ref = _value_and_grad(lambda: ref_whole(x, r, pos, neg, 0.25, 16), x, r)
    _close(ours[0], ref[0])
    for a, b in zip(ours[1], ref[1], strict=True):
        _close(a, b)


def test_whole_batch_with_mined_pairs_and_ref():
    x, y = _data(seed=3)
    r, ry = _data(b=7, seed=4)
    it = pml_miners.MultiSimilarityMiner(epsilon=0.5)(x, y, r, ry)
    pos, neg = _pairs_from_tuple(it)
    loss = CircleLoss(m=0.25, gamma=16, per_anchor=False)
    _check_whole(lambda: loss(x, y, it, r, ry), x, r, pos, neg)
    pos, neg = _pairs_from(y.tolist(), ry.tolist(), same_set=False)
    _check_whole(lambda: loss(x, y, None, r, ry), x, r, pos, neg)


def test_mined_pairs_with_duplicates_match_formula():
    x, y = _data(seed=5)
    it = pml_miners.TripletMarginMiner(margin=1.0, type_of_triplets="all")(x, y)
    assert len(it[0]) > len(set(zip(it[0].tolist(), it[1].tolist(), strict=True)))
    pos, neg = _pairs_from_tuple(it)
    ours = _value_and_grad(lambda: CircleLoss(m=0.25, gamma=32)(x, y, it), x)
    ref = _value_and_grad(lambda: ref_per_anchor(x, x, pos, neg, 0.25, 32), x)
    _close(ours[0], ref[0])
    _close(ours[1][0], ref[1][0])


def _frozen_alpha_loss(x, pos, neg, m, gamma, x0):
    """Per-anchor mean loss with the alphas evaluated at x0 (constants, as the paper says)."""
    sim, sim0 = _cos(x, x), _cos(x0, x0)
    losses = []
    for a in range(x.shape[0]):
        ps = [j for (i, j) in sorted(pos) if i == a]
        ns = [j for (i, j) in sorted(neg) if i == a]
        if ps and ns:
            a_p = torch.clamp(1 + m - sim0[a, ps], min=0)
            a_n = torch.clamp(sim0[a, ns] + m, min=0)
            neg_sum = torch.exp(gamma * a_n * (sim[a, ns] - m)).sum()
            pos_sum = torch.exp(-gamma * a_p * (sim[a, ps] - (1 - m))).sum()
            losses.append(torch.log1p(neg_sum * pos_sum))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("mined", [False, True])
def test_gradient_matches_finite_differences_with_frozen_alphas(mined):
    """gradcheck-style: central differences of the loss with the alphas held constant.

    (``torch.autograd.gradcheck`` on the loss itself cannot pass: the paper detaches
    the alphas, so the analytic gradient is deliberately not the total derivative.)
    """
    x, y = _data(b=6, d=3, classes=2, seed=7)
    it = pml_miners.BatchHardMiner()(x, y) if mined else None
    pos, neg = _pairs_from_tuple(it) if mined else _pairs_from(y.tolist(), y.tolist(), True)
    (grad,) = torch.autograd.grad(CircleLoss(m=0.25, gamma=4)(x, y, it), x)
    x0, eps = x.detach(), 1e-6
    numeric = torch.zeros_like(x0)
    for k in range(x0.numel()):
        step = torch.zeros_like(x0).view(-1)
        step[k] = eps
        step = step.view_as(x0)
        up = _frozen_alpha_loss(x0 + step, pos, neg, 0.25, 4, x0)
        down = _frozen_alpha_loss(x0 - step, pos, neg, 0.25, 4, x0)
        numeric.view(-1)[k] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-7)


def test_gradcheck_segment_logsumexp():
    values = torch.randn(9, dtype=F64, requires_grad=True)
    segments = torch.tensor([0, 0, 2, 2, 2, 3, 0, 3, 3])
    assert torch.autograd.gradcheck(lambda v: segment_logsumexp(v, segments, 5)[0], (values,))


# --- PML equality ---------------------------------------------------------------------
MINERS = {
    "none": lambda: None,
    "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(epsilon=0.1),
    "pair_margin": lambda: pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
    "triplet_margin": lambda: pml_miners.TripletMarginMiner(margin=0.2),
    "triplet_all": lambda: pml_miners.TripletMarginMiner(margin=1.0, type_of_triplets="all"),
    "batch_hard": lambda: pml_miners.BatchHardMiner(),
}


@pytest.mark.parametrize("miner", sorted(MINERS))
@pytest.mark.parametrize(("dtype", "tol"), [(F64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("m", [0.25, -0.2, 0.7, 3.0], ids=lambda m: f"m={m}")
def test_matches_pml(miner, dtype, tol, m):
    """Also for a negative ``m`` and one above 0.5 (the optima cross), which PML takes."""
    x, y = _data(b=24, d=8, classes=5, seed=11, dtype=dtype)
    mine = MINERS[miner]()
    it = mine(x, y) if mine is not None else None
    ours = _value_and_grad(lambda: CircleLoss(m=m, gamma=64)(x, y, it), x)
    theirs = _value_and_grad(lambda: pml_losses.CircleLoss(m=m, gamma=64)(x, y, it), x)
    _close(ours[0], theirs[0], tol)
    _close(ours[1][0], theirs[1][0], tol)


@pytest.mark.parametrize("path", ["dense", "dense_negatives", "pairs"])
@pytest.mark.parametrize("miner", ["none", "multi_similarity", "batch_hard", "triplet_all"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_every_evaluation_path_matches_pml(monkeypatch, path, miner, with_ref):
    """The per-anchor loss is evaluated densely or from pair lists by size; all agree."""
    monkeypatch.setattr(circle_module, "_choose_path", lambda *_: path)
    x, y = _data(b=20, d=8, classes=4, seed=12)
    r, ry = _data(b=9, d=8, classes=4, seed=17) if with_ref else (None, None)
    mine = MINERS[miner]()
    it = mine(x, y, r, ry) if mine is not None else None
    inputs = (x, r) if with_ref else (x,)
    ours = _value_and_grad(lambda: CircleLoss(m=0.4, gamma=80)(x, y, it, r, ry), *inputs)
    theirs = _value_and_grad(lambda: pml_losses.CircleLoss()(x, y, it, r, ry), *inputs)
    _close(ours[0], theirs[0], 1e-9)
    for a, b in zip(ours[1], theirs[1], strict=True):
        _close(a, b, 1e-8)  # gradients reach ~10 at gamma = 80


@pytest.mark.parametrize("per_anchor", [True, False])
def test_masked_function_matches_the_formula(per_anchor):
    """The fixed-shape function (Circle inside torch.func transforms): values and gradients
    (alphas detached) of the paper's per-anchor / whole-set loss, rows without a positive or
    a negative 0 with zero gradients."""
    g = torch.Generator().manual_seed(9)
    sim = (torch.rand(7, 9, generator=g, dtype=F64) * 2 - 1).requires_grad_(True)
    pos = torch.rand(7, 9, generator=g) < 0.3
    pos[2] = False  # no positive
    neg = ~pos
    neg[4] = False  # no negative
    m, gamma = 0.25, 32.0
    got = circle_loss_masked(sim, pos, neg, m, gamma, per_anchor)
    if per_anchor:
        rows = [
            _anchor_loss(sim[a][pos[a]], sim[a][neg[a]], m, gamma)
            if pos[a].any() and neg[a].any()
            else (sim[a] * 0).sum()
            for a in range(7)
        ]
        expected = torch.stack(rows)
    else:
        expected = _anchor_loss(sim[pos], sim[neg], m, gamma)
    _close(got, expected)
    (grad,) = torch.autograd.grad(got.sum(), sim)
    (grad_expected,) = torch.autograd.grad(expected.sum(), sim)
    _close(grad, grad_expected)
    if per_anchor:
        assert torch.equal(grad[[2, 4]], torch.zeros(2, 9, dtype=F64))


def test_path_choice():
    choose = circle_module._choose_path
    assert choose(10, 10, 1000) == "pairs"
    assert choose(10, 900, 1000) == "dense_negatives"
    assert choose(500, 500, 1000) == "dense"


@pytest.mark.parametrize("miner", ["none", "multi_similarity", "triplet_margin"])
def test_ref_emb_matches_pml(miner):
    x, y = _data(b=10, d=6, classes=3, seed=13)
    r, ry = _data(b=14, d=6, classes=3, seed=14)
    mine = MINERS[miner]()
    it = mine(x, y, r, ry) if mine is not None else None
    ours = _value_and_grad(lambda: CircleLoss(m=0.25, gamma=64)(x, y, it, r, ry), x, r)
    theirs = _value_and_grad(lambda: pml_losses.CircleLoss(m=0.25, gamma=64)(x, y, it, r, ry), x, r)
    _close(ours[0], theirs[0])
    for a, b in zip(ours[1], theirs[1], strict=True):
        _close(a, b)


def test_ref_emb_without_ref_labels_uses_indices():
    x, y = _data(b=6, seed=15)
    r, ry = _data(b=5, seed=16)
    it = pml_miners.MultiSimilarityMiner(epsilon=1.0)(x, y, r, ry)
    _close(CircleLoss()(x, None, it, r), pml_losses.CircleLoss(m=0.25, gamma=256)(x, y, it, r, ry))


@pytest.mark.parametrize("per_anchor", [True, False])
def test_a_second_view_without_ref_labels_takes_the_labels_as_pml(per_anchor):
    """``ref_emb`` of the batch's size without ``ref_labels``: PML pairs row ``j`` of it
    with label ``j`` (``get_all_pairs_indices(labels, None)``, no pair ``(i, i)``); another
    size is refused (PML would index past it or pair rows with the wrong labels)."""
    x, y = _data(b=12, d=6, classes=3, seed=17)
    r, _ = _data(b=12, d=6, classes=3, seed=18)
    loss = CircleLoss(m=0.4, gamma=80, per_anchor=per_anchor)
    ours = _value_and_grad(lambda: loss(x, y, None, r), x, r)
    if per_anchor:
        pml = pml_losses.CircleLoss(m=0.4, gamma=80)
        theirs = _value_and_grad(lambda: pml(x, y, None, r), x, r)
        _close(ours[0], theirs[0])
        for a, b in zip(ours[1], theirs[1], strict=True):
            _close(a, b)
    same = loss(x, y, None, r, y)
    _close(ours[0], same)  # = ref_labels given as the labels themselves
    with pytest.raises(ValueError, match="without ref_labels and has 5 rows, not 12"):
        CircleLoss()(x, y, None, r[:5])


def test_a_distance_assigned_after_construction_is_checked():
    """Like one given to the constructor: Circle is defined on cosines, not distances."""
    x, y = _data(seed=19)
    loss = CircleLoss()
    loss.distance = LpDistance()
    with pytest.raises(TypeError, match="must be a CosineSimilarity, got LpDistance"):
        loss(x, y)


def test_cross_batch_memory_matches_pml():
    ours = pml_losses.CrossBatchMemory(
        CircleLoss(m=0.25, gamma=64), embedding_size=8, memory_size=40
    )
    theirs = pml_losses.CrossBatchMemory(
        pml_losses.CircleLoss(m=0.25, gamma=64), embedding_size=8, memory_size=40
    )
    for step in range(4):
        x, y = _data(b=16, d=8, classes=4, seed=20 + step, dtype=torch.float32)
        a = _value_and_grad(lambda x=x, y=y: ours(x, y), x)
        b = _value_and_grad(lambda x=x, y=y: theirs(x, y), x)
        _close(a[0], b[0], 2e-5)
        _close(a[1][0], b[1][0], 2e-5)


def test_distributed_wrapper_efficient_path_matches_pml():
    """What DistributedLossWrapper(efficient=True) computes on each rank, simulated here.

    Rank 0 holds the first half: loss(emb, labels, indices_tuple, all_emb, all_labels).
    """
    from pytorch_metric_learning.utils.distributed import get_indices_tuple

    x_all, y_all = _data(b=16, d=8, classes=4, seed=30)
    x, y = x_all[:8], y_all[:8]
    it = get_indices_tuple(y, y_all)
    ours = _value_and_grad(lambda: CircleLoss(m=0.25, gamma=64)(x, y, it, x_all, y_all), x_all)
    theirs = _value_and_grad(
        lambda: pml_losses.CircleLoss(m=0.25, gamma=64)(x, y, it, x_all, y_all), x_all
    )
    _close(ours[0], theirs[0])
    _close(ours[1][0], theirs[1][0])


def test_distributed_wrapper_world_size_one(tmp_path):
    """A real gloo process group of world size 1 (a multi-process run is too slow here)."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        x, y = _data(seed=31)
        wrapped = DistributedLossWrapper(CircleLoss(m=0.25, gamma=64))
        _close(wrapped(x, y), pml_losses.CircleLoss(m=0.25, gamma=64)(x, y))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_wrapper_two_processes(tmp_path):
    """Two gloo ranks on CPU, efficient and not: equal to PML's CircleLoss on every rank
    (~6 s; it was skipped unless an environment variable was set, and its worker's import
    failed when it was: found by review)."""
    import torch.multiprocessing as mp

    from tests.losses._distributed_worker import run

    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    store = str(tmp_path / "store")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run, args=(r, 2, store, outs[r])) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    for out in outs:
        results = torch.load(out)
        for efficient in (False, True):
            ours, theirs = results[(efficient, "ours")], results[(efficient, "pml")]
            _close(ours[0], theirs[0])
            _close(ours[1], theirs[1])


def test_pml_single_pair_quirk_documented():
    """PML returns 0 when each index tensor has <= 1 element; we compute the real loss."""
    x, y = _data(b=3, seed=32)
    it = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    ours = CircleLoss(m=0.25, gamma=8)(x, y, it)
    sim = _cos(x, x)
    _close(ours, _anchor_loss(sim[0, 1:2], sim[0, 2:3], 0.25, 8))
    assert pml_losses.CircleLoss(m=0.25, gamma=8)(x, y, it).item() == 0


# --- stability and precision ----------------------------------------------------------
@pytest.mark.parametrize("gamma", [256.0, 1024.0, 4096.0])
@pytest.mark.parametrize("per_anchor", [True, False])
def test_large_gamma_is_finite_and_exact(gamma, per_anchor):
    x, y = _data(b=32, d=16, classes=4, seed=40, dtype=torch.float32)
    value, (grad,) = _value_and_grad(lambda: CircleLoss(0.25, gamma, per_anchor)(x, y), x)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    x64 = x.detach().double().requires_grad_(True)
    value64, (grad64,) = _value_and_grad(lambda: CircleLoss(0.25, gamma, per_anchor)(x64, y), x64)
    torch.testing.assert_close(value.double(), value64, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-3, atol=1e-3 * grad64.abs().max())


def _autocast_dtypes():
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        dtypes.append(torch.float16)
    except (RuntimeError, AssertionError):  # pragma: no cover - older torch
        pass
    return dtypes


@pytest.mark.parametrize("dtype", _autocast_dtypes())
@pytest.mark.parametrize("miner", ["none", "multi_similarity"])
@pytest.mark.parametrize("gamma", [256.0, 1024.0])
def test_autocast(dtype, miner, gamma):
    x, y = _data(b=32, d=16, classes=4, seed=41, dtype=torch.float32)
    mine = MINERS[miner]()
    it = mine(x, y) if mine is not None else None
    lin = torch.nn.Linear(16, 16).requires_grad_(False)
    with torch.autocast("cpu", dtype=dtype):
        value = CircleLoss(m=0.25, gamma=gamma)(lin(x), y, it)
    (grad,) = torch.autograd.grad(value, x)
    assert value.dtype == torch.float32
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    exact = CircleLoss(m=0.25, gamma=gamma)(lin(x), y, it)
    torch.testing.assert_close(value, exact, rtol=0.1, atol=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_embeddings_are_compared_in_float32(dtype):
    """The loss of half-precision embeddings is that of their (rounded) values in float64
    (the float64 path, itself checked against the paper's formula above, which overflows
    at this gamma): with gamma = 256, cosines rounded to bf16 were half a logit off."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, 8, (64,), generator=g)
    value = CircleLoss(m=0.25, gamma=256.0)(x, y)
    x64 = x.detach().double().requires_grad_(True)
    expected = CircleLoss(m=0.25, gamma=256.0)(x64, y)
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(value, x)
    (grad64,) = torch.autograd.grad(expected, x64)
    assert grad.dtype == dtype
    error = (grad.double() - grad64).norm() / grad64.norm()
    assert error < 4 * torch.finfo(dtype).eps  # the rounding of the gradient itself


# --- degenerate batches ---------------------------------------------------------------
DEGENERATE = {
    "one_class": (torch.zeros(6, dtype=torch.long), None),
    "all_distinct": (torch.arange(6), None),
    "empty_tuple": (
        torch.tensor([0, 0, 1, 1, 2, 2]),
        tuple(torch.empty(0, dtype=torch.long) for _ in range(4)),
    ),
    "positives_only": (
        torch.tensor([0, 0, 1, 1, 2, 2]),
        (
            torch.tensor([0, 2]),
            torch.tensor([1, 3]),
            torch.tensor([], dtype=torch.long),
            torch.tensor([], dtype=torch.long),
        ),
    ),
    "no_anchor_has_both": (
        torch.tensor([0, 0, 1, 1, 2, 2]),
        (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([0])),
    ),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("per_anchor", [True, False])
def test_degenerate_batches_give_zero_and_zero_grads(case, per_anchor):
    labels, it = DEGENERATE[case]
    if not per_anchor and case == "no_anchor_has_both":
        pytest.skip("the whole-batch form pools pairs across anchors")
    x = torch.randn(6, 4, dtype=F64, requires_grad=True)
    value = CircleLoss(m=0.25, gamma=256, per_anchor=per_anchor)(x, labels, it)
    (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    assert value.item() == 0
    assert grad is None or (torch.all(grad == 0) and torch.isfinite(grad).all())


# --- bad inputs -----------------------------------------------------------------------
def _bad_inputs():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    idx = torch.tensor([0, 1])
    return [
        ("arity2", (x, y, (idx, idx)), ValueError, "3 elements"),
        ("arity5", (x, y, (idx,) * 5), ValueError, "3 elements"),
        ("out_of_range", (x, y, (idx, torch.tensor([0, 9]), idx)), ValueError, r"\[0, 4\)"),
        ("negative_index", (x, y, (torch.tensor([-1, 0]), idx, idx)), ValueError, "must lie"),
        ("float_index", (x, y, (idx.float(), idx, idx)), TypeError, "integer"),
        ("ragged", (x, y, (idx, idx[:1], idx)), ValueError, "equal lengths"),
        ("overlap", (x, y, (idx, idx, idx, idx)), ValueError, "both as positive"),
        (
            "ref_width",
            (x, y, None, torch.randn(5, 2), torch.zeros(5, dtype=torch.long)),
            ValueError,
            "width",
        ),
        (
            "ref_length",
            (x, y, None, torch.randn(5, 3), torch.zeros(4, dtype=torch.long)),
            ValueError,
            "ref_labels has length 4",
        ),
        ("ref_labels_alone", (x, y, None, None, y), ValueError, "without ref_emb"),
        ("ref_emb_alone", (x, y, None, torch.randn(5, 3)), ValueError, "without ref_labels"),
        (
            "tuple_range_with_ref",
            (
                x,
                y,
                (idx, torch.tensor([0, 5]), idx),
                torch.randn(5, 3),
                torch.zeros(5, dtype=torch.long),
            ),
            ValueError,
            r"\[0, 5\)",
        ),
        ("nan_labels", (x, torch.tensor([0.0, float("nan"), 1.0, 1.0])), ValueError, "NaN"),
        (
            "inf_ref_labels",
            (x, y, None, x, torch.tensor([0.0, 1.0, 1.0, -math.inf])),
            ValueError,
            "ref_labels contains NaN or Inf",
        ),
        ("complex_labels", (x, y.to(torch.complex64)), TypeError, "real numbers"),
        ("label_length", (x, y[:3]), ValueError, "length 3"),
        ("nan", (torch.full((4, 3), float("nan")), y), ValueError, "NaN"),
        ("empty", (torch.randn(0, 3), y[:0]), ValueError, "empty"),
        ("one_dim", (torch.randn(4), y), ValueError, "2-D"),
        ("nothing", (x,), ValueError, "labels or an indices_tuple"),
    ]


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([True, False] * 4),
        torch.tensor([0.5, 1.5] * 4),
        torch.tensor([0.25, 0.5] * 4),  # two classes (not one after truncation)
        torch.tensor([0.5, 1.5] * 4, dtype=torch.float16),
        torch.tensor([0, 1] * 4, dtype=torch.uint8),
    ],
    ids=["bool", "float", "fractions", "half", "uint8"],
)
def test_labels_compared_for_equality_as_pml(labels: torch.Tensor) -> None:
    """Circle loss only compares labels: bool and floating labels are taken as PML takes
    them (bool ones were refused with a TypeError), alone, with a miner and with a
    reference set, whose labels may have another dtype."""
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, pml = CircleLoss(m=0.4, gamma=80), pml_losses.CircleLoss(m=0.4, gamma=80)
    pairs = pml_miners.MultiSimilarityMiner()(x, labels)
    for args in [
        (x, labels),
        (x, labels, pairs),
        (x, labels, None, x[:5], labels[:5]),
        (x, labels, None, x[:5], labels[:5].long()),
    ]:
        torch.testing.assert_close(ours(*args), pml(*args))


@pytest.mark.parametrize(("name", "args", "exc", "match"), _bad_inputs(), ids=lambda v: str(v))
def test_bad_inputs(name, args, exc, match):
    with pytest.raises(exc, match=match):
        CircleLoss()(*args)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"gamma": 0}, ValueError, "gamma must be > 0"),
        ({"gamma": -1.0}, ValueError, "gamma must be > 0"),
        ({"gamma": float("inf")}, ValueError, "finite"),
        ({"m": -1001.0}, ValueError, r"m must lie in \[-1000.0, 1000.0\]"),
        ({"m": 1e4}, ValueError, r"m must lie in \[-1000.0, 1000.0\]"),
        ({"m": "0.2"}, TypeError, "real number"),
        ({"per_anchor": 1}, TypeError, "per_anchor"),
        ({"distance": LpDistance()}, TypeError, "CosineSimilarity"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CircleLoss(**kwargs)


@pytest.mark.parametrize("kwargs", [{"collect_stats": True}, {"power": 2}])
def test_custom_cosine_distance_is_used(kwargs):
    """The fast normalisation applies to the plain CosineSimilarity only; else the distance."""
    from pytorch_metric_learning.distances import CosineSimilarity

    x, y = _data(seed=62)
    ours = _value_and_grad(lambda: CircleLoss(distance=CosineSimilarity(**kwargs))(x, y), x)
    theirs = _value_and_grad(
        lambda: pml_losses.CircleLoss(m=0.25, gamma=256, distance=CosineSimilarity(**kwargs))(x, y),
        x,
    )
    _close(ours[0], theirs[0])
    _close(ours[1][0], theirs[1][0])


def test_hyperparameters_checked_on_assignment_and_repr():
    loss = CircleLoss(m=0.4, gamma=80)
    with pytest.raises(ValueError, match="gamma"):
        loss.gamma = 0
    assert "m=0.4, gamma=80.0, per_anchor=True" in repr(loss)


def test_reducer_and_embedding_regularizer_honoured():
    from pytorch_metric_learning.regularizers import LpRegularizer

    x, y = _data(seed=50)
    plain = CircleLoss(m=0.25, gamma=32, reducer=MeanReducer())(x, y)
    pml = pml_losses.CircleLoss(m=0.25, gamma=32, reducer=MeanReducer())(x, y)
    _close(plain, pml)
    regular = CircleLoss(m=0.25, gamma=32, embedding_regularizer=LpRegularizer())(x, y)
    expected = CircleLoss(m=0.25, gamma=32)(x, y) + x.norm(dim=1).mean()
    _close(regular, expected)


# --- functional -----------------------------------------------------------------------
def test_segment_logsumexp_matches_torch():
    g = torch.Generator().manual_seed(60)
    values = torch.randn(50, generator=g, dtype=F64) * 300
    segments = torch.randint(0, 7, (50,), generator=g)
    segments[segments == 3] = 4  # segment 3 empty
    lse, present = segment_logsumexp(values, segments, 8)
    for k in range(8):
        if (segments == k).any():
            _close(lse[k], torch.logsumexp(values[segments == k], 0))
            assert present[k]
        else:
            assert lse[k] == 0 and not present[k]


@pytest.mark.parametrize(("dtype", "gamma"), [(F64, 16.0), (torch.float32, 1024.0)])
def test_functional_paths_agree(dtype, gamma):
    """Dense, dense-negatives and pair-list evaluations; rows 0-1 lack positives/negatives."""
    g = torch.Generator().manual_seed(70)
    sim = (torch.rand(6, 9, generator=g, dtype=dtype) * 2 - 1).requires_grad_(True)
    kind = torch.randint(0, 3, (6, 9), generator=g)  # 0 positive, 1 negative, 2 neither
    kind[0] = torch.where(kind[0] == 0, 1, kind[0])
    kind[1] = torch.where(kind[1] == 1, 0, kind[1])
    pos, neg = kind == 0, kind == 1
    keys_p, keys_n = pos.view(-1).nonzero().squeeze(1), neg.view(-1).nonzero().squeeze(1)
    flat = sim.view(-1)
    results = [
        circle_loss_dense(sim, pos, neg, 0.25, gamma),
        circle_loss_dense_negatives(sim, neg, keys_p, 0.25, gamma),
        circle_loss_pairs(flat[keys_p], keys_p // 9, flat[keys_n], keys_n // 9, 6, 0.25, gamma),
    ]
    weights = torch.arange(1.0, 7.0, dtype=dtype)
    grads = [torch.autograd.grad((r * weights).sum(), sim)[0] for r in results]
    for r, gr in zip(results[1:], grads[1:], strict=True):
        torch.testing.assert_close(r, results[0])
        torch.testing.assert_close(gr, grads[0])
    assert results[0][:2].eq(0).all() and grads[0][:2].eq(0).all()
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_huge_finite_embeddings_are_accepted_while_their_norms_fit():
    """The NaN/Inf check must not reject finite values whose sum overflows; rows whose
    squared norm overflows float32 (normalized to zeros: a wrong value) are refused."""
    x = torch.full((4, 3), 1.5e19 / 3**0.5)  # norms 1.5e19: squares fit, their sum does not
    x[1] *= -1
    value = CircleLoss()(x, torch.tensor([0, 0, 1, 1]))
    expected = CircleLoss()(x.double(), torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"row 0 has norm .*: its square overflows"):
        CircleLoss()(torch.full((4, 3), 3e38), torch.tensor([0, 0, 1, 1]))


def test_no_warning_on_plain_call():
    x, y = _data(seed=61)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CircleLoss()(x, y)


def test_softplus_is_exact_above_20_on_both_paths() -> None:
    """Anchors whose log-sum-exp sum z exceeds 20, where F.softplus returns z itself (2e-9
    short, gradient 1): the loss is log(1 + e^z) and both paths' gradients are sigma(z)."""
    from pytorch_metric_learning.reducers import DoNothingReducer

    import pml_margins

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=gen)
    results = []
    for plain in (False, True):
        leaf = x.clone().requires_grad_(True)
        with pml_margins.autograd_only(plain):
            losses = CircleLoss(gamma=32.0, reducer=DoNothingReducer())(leaf, y)["loss"]["losses"]
        results.append((losses.detach(), *torch.autograd.grad(losses.sum(), leaf)))
    (fast, fast_grad), (slow, slow_grad) = results
    assert fast.max() > 20  # the case: softplus past its threshold
    torch.testing.assert_close(fast, slow, rtol=1e-15, atol=0)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("per_anchor", [False, True])
@pytest.mark.parametrize("queries", [0, 5])
def test_an_empty_reference_set_gives_no_pairs_and_a_loss_of_0_as_pml(per_anchor, queries):
    """PML's CircleLoss returns 0 for a reference set of no rows (no pairs); ours refused
    it ("ref_emb is empty"), although the mirror case (no queries) gave 0."""
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning.reducers import MeanReducer

    torch.manual_seed(0)
    x = torch.randn(queries, 6, requires_grad=True)
    y = torch.arange(queries) % 3
    ref, ref_y = torch.randn(0, 6), torch.zeros(0, dtype=torch.long)
    empty = torch.zeros(0, dtype=torch.long)
    for reducer in (None, MeanReducer()):
        kw = {} if reducer is None else {"reducer": reducer}
        ours = CircleLoss(per_anchor=per_anchor, **kw)
        pml = pml_losses.CircleLoss(**kw)
        for args in ((y, None, ref, ref_y), (y, (empty, empty, empty, empty), ref, ref_y)):
            got, want = ours(x, *args), pml(x, *args)
            assert float(got) == float(want) == 0.0
            got.backward()
            assert x.grad is None or not x.grad.any()
