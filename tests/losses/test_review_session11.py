"""Corners found by review (2026-12-01, second session): running statistics set by hand or
left uninitialized, a diverging AdaCos scale, raw inner-product logits that overflow, a
loss's sizes replaced after construction, a refused ``W`` that moved statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pytorch_metric_learning.distances import DotProductSimilarity, LpDistance
from pytorch_metric_learning.reducers import DoNothingReducer, SumReducer, ThresholdReducer

import pml_margins
from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.losses import (
    AdaCosLoss,
    AdaFaceLoss,
    ArcFaceLoss,
    CenterLoss,
    CosFaceLoss,
    CurricularFaceLoss,
    ElasticFaceLoss,
    MagFaceLoss,
    NormSoftmaxLoss,
    ProxyCircleLoss,
    SoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)

CLASS_WEIGHT_LOSSES = [
    SoftmaxLoss,
    NormSoftmaxLoss,
    SphereFaceLoss,
    CosFaceLoss,
    ArcFaceLoss,
    SubCenterArcFaceLoss,
    CurricularFaceLoss,
    AdaFaceLoss,
    MagFaceLoss,
    ElasticFaceLoss,
    AdaCosLoss,
    ProxyCircleLoss,
]
_NAMED = {"ids": lambda c: getattr(c, "__name__", "")}
STATISTICS = [
    (CurricularFaceLoss, {"t": 0.0}),
    (AdaFaceLoss, {"batch_mean": 20.0, "batch_std": 100.0}),
]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    items = module.state_dict().items()
    return {k: v.detach().clone() for k, v in items if isinstance(v, torch.Tensor)}


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


@pytest.mark.parametrize("loss_type", CLASS_WEIGHT_LOSSES, ids=lambda c: c.__name__)
def test_reset_parameters_after_to_empty_gives_the_constructed_loss(loss_type) -> None:
    """A loss built on the meta device and materialized with ``to_empty`` held whatever
    memory it got (CurricularFace's t -2.2e36, a loss of 55.47, no error), and there was
    no way to initialize the buffers: ``reset_parameters()`` gives the loss as
    constructed under the same seed, buffers included."""
    torch.manual_seed(0)
    built = _state(loss_type(11, 8))
    with torch.device("meta"):
        loss = loss_type(11, 8)
    loss.to_empty(device="cpu")
    for buffer in loss.buffers():
        buffer.fill_(-2.2e36)
    torch.manual_seed(0)
    loss.reset_parameters()
    assert _equal_states(_state(loss), built)


def test_reset_parameters_of_center_loss_and_of_a_shard() -> None:
    for update in ("ema", "sgd"):
        centre = CenterLoss(5, 4, update=update)
        with torch.no_grad():
            centre.centers.fill_(3.0)
        centre.reset_parameters()
        assert not centre.centers.any()
    sharded = ShardedMarginSoftmaxLoss(CurricularFaceLoss, 10, 4, rank=1, world_size=2, seed=3)
    built = _state(sharded)
    with torch.no_grad():
        sharded.W_local.zero_()
        sharded.loss.t.fill_(0.5)
    before = torch.random.get_rng_state()
    sharded.reset_parameters()
    assert torch.equal(torch.random.get_rng_state(), before)  # its own seeded stream
    assert _equal_states(_state(sharded), built)


def test_the_meta_error_names_reset_parameters() -> None:
    with torch.device("meta"):
        loss = ArcFaceLoss(5, 4)
    with pytest.raises(ValueError, match=r"reset_parameters\(\)"):
        loss(torch.randn(4, 4), torch.arange(4))


@pytest.mark.parametrize(
    ("loss_type", "initial"), STATISTICS, ids=lambda c: getattr(c, "__name__", "")
)
def test_a_statistic_set_by_hand_is_checked_as_a_loaded_one(loss_type, initial) -> None:
    """``loss.t = nan`` gave NaN losses and ``batch_std = -1`` was taken, where a state dict
    with these values is refused: the same checks, and nothing changes on a refusal."""
    loss = loss_type(11, 8)
    for name in initial:
        for bad, error in (
            (torch.tensor(float("nan")), "non-finite"),
            (math.inf, "non-finite"),
            (torch.zeros(2), "shape"),
            (torch.tensor(True), "real"),
            (torch.tensor(1 + 1j), "real"),
        ):
            with pytest.raises(ValueError, match=error):
                setattr(loss, name, bad)
            assert float(getattr(loss, name)) == initial[name]
        with pytest.raises(TypeError, match="running statistic"):
            setattr(loss, name, None)
        setattr(loss, name, 0.25)  # a number: into the buffer
        held = getattr(loss, name)
        assert held.shape == () and held.dtype == torch.float32 and float(held) == 0.25
        setattr(loss, name, torch.tensor([0.5], dtype=torch.float16, requires_grad=False))
        held = getattr(loss, name)
        assert held.shape == () and held.dtype == torch.float32 and float(held) == 0.5
    if loss_type is AdaFaceLoss:
        with pytest.raises(ValueError, match="batch_std must be >= 0"):
            loss.batch_std = torch.tensor(-1.0)
    loss.reset_running_stats()
    assert {n: float(getattr(loss, n)) for n in initial} == initial


def test_center_loss_centres_set_by_hand_are_checked() -> None:
    loss = CenterLoss(5, 4)
    with pytest.raises(ValueError, match="non-finite centers"):
        loss.centers = torch.full((5, 4), float("nan"))
    with pytest.raises(ValueError, match=r"shape \(5, 4\)"):
        loss.centers = torch.zeros(3, 4)
    loss.centers = torch.ones(5, 4, dtype=torch.float64)
    assert loss.centers.dtype == torch.float64 and float(loss.centers.sum()) == 20.0
    loss.reset_running_stats()
    assert not loss.centers.any()


def test_adacos_reset_running_stats_restores_the_constructors_scale() -> None:
    loss = AdaCosLoss(101, 4)
    loss.scale = 7
    loss.reset_running_stats()
    assert float(loss.scale) == math.sqrt(2) * math.log(100)
    given = AdaCosLoss(5, 4, scale=12.5)
    given.scale = 3.0
    given.reset_running_stats()
    assert float(given.scale) == 12.5


def test_a_diverging_dynamic_adacos_scale_stays_within_the_bound_and_loads() -> None:
    """Collapsed features (target angle past pi/4, non-target cosines near 1) grow the
    paper's scale ~1.4-fold a step: after 110 steps 1.2e17, which its own state dict then
    refused to load, after 250 steps inf and an inf loss, silently."""
    for mode in ({}, {"chunk_size": 2}):
        loss = AdaCosLoss(3, 2, **mode)
        with torch.no_grad():
            loss.W.copy_(torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
        x, y = torch.tensor([[1.0, 0.0]] * 4), torch.zeros(4, dtype=torch.long)
        for _ in range(300):
            value = loss(x, y)
        assert math.isfinite(float(value))
        assert float(loss.scale) == 1e15
        AdaCosLoss(3, 2).load_state_dict(loss.state_dict())


@pytest.mark.parametrize("mode", [{}, {"chunk_size": 2}], ids=["default", "chunked"])
def test_unnormalized_logits_that_overflow_are_refused(mode) -> None:
    """Without norms (SoftmaxLoss, NSL over a raw dot product, an unnormalized
    LpDistance) nothing refused logits beyond float32: NaN and inf losses and NaN
    gradients, silently (a first fix bounded |x| |w| before the step: it refused logits
    that fit, cost SoftmaxLoss 45% of a small step and broke vmap)."""
    softmax = SoftmaxLoss(5, 6, **mode)
    with torch.no_grad():
        softmax.W.fill_(1e21)
    labels = torch.arange(4)
    for x in (torch.full((4, 6), 1e18), torch.full((4, 6), 1e290, dtype=torch.float64)):
        with pytest.raises(ValueError, match="non-finite losses"):
            softmax(x.requires_grad_(), labels)
    assert torch.isinf(softmax.get_logits(torch.full((4, 6), 1e18))).all()  # as PML: as computed
    nsl = NormSoftmaxLoss(5, 6, distance=DotProductSimilarity(normalize_embeddings=False), **mode)
    with pytest.raises(ValueError, match="non-finite losses"):
        nsl(torch.full((4, 6), 1e37), labels)
    miner_tuple = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="non-finite losses"):
        nsl(torch.full((4, 6), 1e37), labels, miner_tuple)
    squared = SoftmaxLoss(6, 4, distance=LpDistance(normalize_embeddings=False, power=2))
    with torch.no_grad():
        squared.W.fill_(1e20)
    with pytest.raises(ValueError, match="non-finite losses"):
        squared(torch.randn(4, 4), labels)
    with pml_margins.value_checks(False):  # the documented switch turns it off too
        assert math.isnan(float(nsl(torch.full((4, 6), 1e37), labels)))


@pytest.mark.parametrize(
    "reducer",
    [DoNothingReducer(), ThresholdReducer(high=1e30), ThresholdReducer(low=-1), SumReducer()],
    ids=lambda r: type(r).__name__,
)
def test_overflowing_rows_are_refused_whatever_the_reducer(reducer) -> None:
    """A check of the reduced loss missed a reducer that returns the rows (NaN returned)
    or drops NaN rows (0.0 returned): each row's loss is checked before the reducer."""
    loss = SoftmaxLoss(4, 8, reducer=reducer)
    with torch.no_grad():
        loss.W.copy_(torch.randn(8, 4).sign() * 10)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)).abs() * 1e37
    with pytest.raises(ValueError, match="non-finite losses"):
        loss(x, torch.arange(6) % 4)


def test_overflowing_rows_are_refused_under_torch_func() -> None:
    loss = SoftmaxLoss(4, 8)
    with torch.no_grad():
        loss.W.copy_(torch.randn(8, 4).sign() * 10)
    x, y = torch.full((3, 6, 8), 1e37), torch.arange(6) % 4
    with pytest.raises(ValueError, match="non-finite losses"):
        torch.func.grad(lambda xx: loss(xx, y))(x[0])
    with pytest.raises(ValueError, match="non-finite losses"):
        torch.func.vmap(lambda xx: loss(xx, y))(x)


def test_large_unnormalized_logits_that_fit_and_non_finite_weights() -> None:
    """Logits that fit stay accepted whatever the norms (rows of norm 1e20 against
    columns of norm 1e20 at right angles: logits 0), with plain cross-entropy's value; a
    NaN in W or the bias gives a non-finite loss, refused."""
    softmax = SoftmaxLoss(5, 6)
    x = torch.zeros(4, 6)
    x[:, 0] = 1e20
    with torch.no_grad():
        softmax.W.zero_()
        softmax.W[1, :] = 1e20
    value = softmax(x.requires_grad_(), torch.arange(4))
    logits = x.detach().double() @ softmax.W.detach().double() + softmax.bias.detach().double()
    want = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    assert math.isclose(float(value), float(want), rel_tol=1e-6)
    big = SoftmaxLoss(5, 6)(torch.full((4, 6), 1e20), torch.arange(4))
    assert math.isfinite(float(big)) and float(big) > 1e19
    nan_w = SoftmaxLoss(5, 6)
    with torch.no_grad():
        nan_w.W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite losses"):
        nan_w(torch.randn(4, 6), torch.arange(4))


def test_the_sharded_loss_refuses_overflowing_logits_and_takes_what_one_process_takes() -> None:
    """The sharded loss gave NaN where one process refuses, and refused rows of norm 1e20
    (their squares overflow) that one process takes: SoftmaxLoss takes no norm."""
    sharded = ShardedMarginSoftmaxLoss(SoftmaxLoss, 6, 8, rank=0, world_size=1)
    labels = torch.arange(8) % 6
    assert math.isfinite(float(sharded(torch.full((8, 8), 1e20), labels)))
    with torch.no_grad():
        sharded.W_local.fill_(1e30)
    with pytest.raises(ValueError, match="non-finite losses"):
        sharded(torch.full((8, 8), 1e10), labels)


def test_raw_logit_check_under_vmap() -> None:
    """Per-sample gradients of SoftmaxLoss by vmap, and a batch of losses, still work (a
    first version of the overflow check failed there)."""
    loss = SoftmaxLoss(5, 6)
    params = dict(loss.named_parameters())
    x, y = torch.randn(4, 6), torch.arange(4)

    def one(p, xi, yi):
        return torch.func.functional_call(loss, p, (xi[None], yi[None]))

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    assert grads["W"].shape == (4, 6, 5)
    batched = torch.func.vmap(lambda xx: loss(xx, y))(torch.randn(3, 4, 6))
    assert batched.shape == (3,)


@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("num_classes", 0, ValueError, "num_classes must be >= 1"),
        ("num_classes", None, TypeError, "num_classes must be an int"),
        ("num_classes", "5", TypeError, "num_classes must be an int"),
        ("embedding_size", 0, ValueError, "embedding_size must be >= 1"),
        ("W", None, TypeError, "W must be a tensor"),
    ],
)
def test_sizes_replaced_after_construction_get_a_clear_error(name, value, error, match) -> None:
    """``num_classes = 0`` set later failed in ``ZeroDivisionError``, ``None`` in a bare
    comparison error, ``W = None`` in an ``AttributeError``."""
    for loss_type in (ArcFaceLoss, CurricularFaceLoss):
        loss = loss_type(5, 4)
        setattr(loss, name, value)
        with pytest.raises(error, match=match):
            loss(torch.randn(8, 4), torch.arange(8) % 5)


@pytest.mark.parametrize("mode", [{}, {"chunk_size": 3}], ids=["default", "chunked"])
@pytest.mark.parametrize(
    ("loss_type", "initial"), STATISTICS, ids=lambda c: getattr(c, "__name__", "")
)
def test_a_refused_w_of_a_restating_subclass_moves_no_statistic(loss_type, initial, mode) -> None:
    """A subclass that restates ``fused_logits`` (the documented extension route) may keep
    sub-centres under another name, so a ``W`` with a multiple of the classes' columns is
    refused only where its declaration is read, after the step's statistics moved
    (CurricularFace's t 0 -> 0.0017, AdaFace's batch_mean 20 -> 19.82): now put back."""

    class Restating(loss_type):
        def fused_logits(self, embeddings):
            return super().fused_logits(embeddings)

    torch.manual_seed(0)
    loss = Restating(5, 4, **mode)
    loss.W = torch.nn.Parameter(torch.randn(4, 10))
    with pytest.raises(ValueError, match=r"need \(4, 5\)"):
        loss(torch.randn(8, 4) * 3, torch.arange(8) % 5)
    assert {n: float(getattr(loss, n)) for n in initial} == initial
    loss.W = torch.nn.Parameter(torch.randn(4, 5))  # a good W afterwards: the step runs
    loss(torch.randn(8, 4) * 3, torch.arange(8) % 5)
    assert {n: float(getattr(loss, n)) for n in initial} != initial


def test_curricular_t_outside_the_cosines_range_and_meta_statistics_are_refused() -> None:
    """``t = 1e38`` (set or loaded) gave NaN losses: ``t`` averages cosines. A meta tensor
    assigned to a real loss's statistic was taken and failed at the next step."""
    loss = CurricularFaceLoss(10, 4)
    with pytest.raises(ValueError, match=r"t must lie in \[-1, 1\]"):
        loss.t = 1e38
    with pytest.raises(ValueError, match=r"t must lie in \[-1, 1\]"):
        loss.load_state_dict({**loss.state_dict(), "t": torch.tensor(1.5)})
    with pytest.raises(ValueError, match="meta device"):
        loss.t = torch.tensor(0.5, device="meta")
    assert float(loss.t) == 0.0 and not loss.t.is_meta
    loss.t = -1.0
    assert float(loss.t) == -1.0


def test_reset_parameters_called_on_the_shards_loss_alone_draws_its_stream() -> None:
    """FSDP materializes a meta-built module by calling ``reset_parameters`` on the modules
    that hold parameters: for a sharded loss that is the inner loss, which drew ``W_local``
    from the global RNG instead of its rank's seeded stream."""
    for loss_type in (ArcFaceLoss, SoftmaxLoss):
        built = ShardedMarginSoftmaxLoss(loss_type, 11, 8, rank=1, world_size=2, seed=3)
        with torch.device("meta"):
            meta = ShardedMarginSoftmaxLoss(loss_type, 11, 8, rank=1, world_size=2, seed=3)
        meta.to_empty(device="cpu")
        meta.loss.reset_parameters()
        assert _equal_states(_state(meta), _state(built))


def test_losses_pickled_before_their_reset_state_was_kept() -> None:
    """An AdaCos pickled before its initial scale was kept leaves its scale (a given or a
    shard's one cannot be told: the paper's fixed scale of the shard's classes was wrong);
    a shard pickled before its inner loss kept the seed still draws its stream."""
    loss = AdaCosLoss(101, 4, scale=10.0, dynamic=False)
    del loss.__dict__["_initial_scale"]
    loss.reset_running_stats()
    assert float(loss.scale) == 10.0
    built = ShardedMarginSoftmaxLoss(ArcFaceLoss, 11, 8, rank=1, world_size=2, seed=3)
    shard = ShardedMarginSoftmaxLoss(ArcFaceLoss, 11, 8, rank=1, world_size=2, seed=3)
    del shard.loss.__dict__["_init_seed"]
    with torch.no_grad():
        shard.W_local.zero_()
    shard.reset_parameters()
    assert _equal_states(_state(shard), _state(built))


def test_curricular_t_trained_to_its_bound_reloads_and_a_bool_t_is_refused() -> None:
    """With momentum 1 and targets on their class columns rounding took t to 1.0000001,
    which its own state dict could not load; a bool t failed inside the check."""
    loss = CurricularFaceLoss(5, 7, momentum=1.0)
    x = 3 * loss.W.detach().t()[torch.arange(5)]
    for _ in range(3):
        loss(x, torch.arange(5))
    assert -1 <= float(loss.t) <= 1
    CurricularFaceLoss(5, 7).load_state_dict(loss.state_dict())
    with pytest.raises(ValueError, match="must be real"):
        loss.load_state_dict({**loss.state_dict(), "t": torch.tensor(True)})


@pytest.mark.parametrize(
    "mode",
    [{}, {"chunk_size": 2}, {"reducer": SumReducer()}, {"sample_rate": 0.99}],
    ids=["default", "chunked", "sum", "partial-fc"],
)
def test_a_reduction_that_overflows_finite_rows_is_refused(mode) -> None:
    """Each row's loss 2e38 (finite), their mean or sum inf: a check of the rows alone
    returned inf silently (the direct small-problem path refused it, another batch not)."""
    loss = SoftmaxLoss(2, 2, bias=False, **mode)
    with torch.no_grad():
        loss.W.copy_(torch.tensor([[-1e19, 1e19], [0.0, 0.0]]))
    x = torch.zeros(8, 2)
    x[:, 0] = 1e19
    with pytest.raises(ValueError, match="reduced loss is not finite"):
        loss(x, torch.zeros(8, dtype=torch.long))


def test_unbounded_distances_that_claim_normalization_are_checked() -> None:
    """SNRDistance on a constant row (variance 0) and a cosine to the power 0.5 gave NaN,
    silently (PML's NormalizedSoftmaxLoss gives NaN there too): only plain normalized
    cosines are bounded."""
    from pytorch_metric_learning.distances import CosineSimilarity, SNRDistance

    labels = torch.arange(4) % 3
    with pytest.raises(ValueError, match="non-finite losses"):
        SoftmaxLoss(3, 4, distance=SNRDistance())(torch.ones(4, 4), labels)
    for loss_type in (ArcFaceLoss, CosFaceLoss, NormSoftmaxLoss):
        loss = loss_type(3, 4, distance=CosineSimilarity(power=0.5))
        x = -loss.W.detach().t()[labels] + 0.01 * torch.randn(4, 4)
        with pytest.raises(ValueError, match="non-finite losses"):
            loss(x, labels)


def test_a_failed_step_leaves_nothing_that_breaks_a_copy() -> None:
    """A step that failed after its rows were kept (a reducer's error) left the rows and
    their graph on the loss: ``deepcopy``/``AveragedModel`` then raised; now only a flag
    without graph is kept, cleared by the next forward."""
    from pytorch_metric_learning.reducers import ClassWeightedReducer, MeanReducer

    loss = SoftmaxLoss(10, 16, reducer=ClassWeightedReducer(torch.ones(3)))
    x, y = torch.randn(8, 16, requires_grad=True), torch.arange(8)
    with pytest.raises(IndexError):
        loss(x, y)
    loss.reducer = MeanReducer()
    copy.deepcopy(loss)
    torch.optim.swa_utils.AveragedModel(loss)
    loss.compute_loss(x, y, None, x, y)  # PML's public method, called alone
    copy.deepcopy(loss)
    assert math.isfinite(float(loss(x, y)))


def test_a_compiled_step_checks_its_result() -> None:
    """``torch.compile`` skipped the check of the loss: a silent NaN where eager raises."""
    loss = SoftmaxLoss(10, 16)
    with torch.no_grad():
        loss.W.mul_(1e20)
    compiled = torch.compile(loss, backend="eager")
    with pytest.raises(ValueError, match="non-finite losses"):
        compiled(torch.randn(8, 16) * 1e19, torch.arange(8))
    fine = SoftmaxLoss(10, 16)
    x = torch.randn(8, 16)
    assert torch.equal(
        torch.compile(fine, backend="eager")(x, torch.arange(8)), fine(x, torch.arange(8))
    )


def test_finite_flags_of_every_kind_of_result() -> None:
    from pml_margins.validation import check_finite_flags, finite_flag

    assert finite_flag(torch.tensor(1 + 1j)) is True
    assert finite_flag(torch.tensor(complex("nan"))) is False
    assert finite_flag(torch.tensor([1.0, math.inf], dtype=torch.bfloat16)).item() is False
    assert finite_flag(torch.empty(0)) is None and finite_flag(None) is None
    with pml_margins.value_checks(False):
        assert finite_flag(torch.tensor(math.nan)) is None
    flags = (True, torch.tensor(False), torch.tensor(True))
    errors = [lambda i=i: ValueError(str(i)) for i in range(3)]
    with pytest.raises(ValueError, match="1"):
        check_finite_flags(flags, errors)
