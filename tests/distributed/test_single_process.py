"""The distributed pieces without a process group (world_size 1): no spawning needed."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.regularizers import LpRegularizer

from pml_margins.distributed import (
    ShardedMarginSoftmaxLoss,
    sample_local_classes,
    shard_range,
    shard_ranges,
    sharded_margin_softmax_cross_entropy,
)
from pml_margins.distributed.partial_fc import num_sampled
from pml_margins.functional import margin_softmax_cross_entropy
from pml_margins.losses import ArcFaceLoss, SoftmaxLoss, SphereFaceLoss
from tests.distributed.cases import SPEC_BY_ID


@pytest.mark.parametrize("spec", SPEC_BY_ID.values(), ids=list(SPEC_BY_ID))
def test_world_size_one_is_the_loss(spec) -> None:
    ref = spec.build(9, 4).double()
    sharded = ShardedMarginSoftmaxLoss(spec.cls, 9, 4, **spec.kwargs).double()
    sharded.loss.load_state_dict(ref.state_dict())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 9, (6,))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(0)  # the same draw for both (ElasticFace's margins)
    a = sharded(xa, y)
    torch.manual_seed(0)
    b = ref(xb, y)
    (a + b).backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(sharded.W_local.grad, ref.W.grad)
    for name, value in ref.named_buffers():  # AdaCos's scale, AdaFace's statistics
        torch.testing.assert_close(dict(sharded.loss.named_buffers())[name], value)


@pytest.mark.parametrize("loss_type", [ArcFaceLoss, SoftmaxLoss, SphereFaceLoss])
def test_keeping_every_column_equals_the_unsampled_path_exactly(loss_type) -> None:
    """0.97 * 9 rounds to 9: the sampling path runs with all columns, bit for bit equal."""
    full = ShardedMarginSoftmaxLoss(loss_type, 9, 4)
    sampled = ShardedMarginSoftmaxLoss(loss_type, 9, 4, sample_rate=0.97)
    sampled.load_state_dict(full.state_dict())
    x, y = torch.randn(5, 4), torch.randint(0, 9, (5,))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = full(xa, y), sampled(xb, y)
    (a + b).backward()
    assert torch.equal(sampled.sampled_classes, torch.arange(9))
    assert torch.equal(a, b)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(full.W_local.grad, sampled.W_local.grad)


def test_unsampled_columns_get_zero_gradient() -> None:
    loss_fn = ShardedMarginSoftmaxLoss(ArcFaceLoss, 40, 4, sample_rate=0.25, seed=1)
    loss_fn(torch.randn(3, 4), torch.tensor([0, 5, 5])).backward()
    kept = loss_fn.sampled_classes
    assert len(kept) == 10 and torch.isin(torch.tensor([0, 5]), kept).all()
    dropped = torch.ones(40, dtype=torch.bool)
    dropped[kept] = False
    assert (loss_fn.W_local.grad[:, dropped] == 0).all()
    assert (loss_fn.W_local.grad[:, kept].abs().sum(0) > 0).all()


def test_sample_local_classes() -> None:
    labels = torch.tensor([3, 12, 4, 3, 19])  # shard [10, 20): positives 12, 19
    index, target = sample_local_classes(labels, 10, 10, 0.3, torch.Generator().manual_seed(0))
    assert len(index) == 3 and torch.isin(torch.tensor([2, 9]), index).all()
    assert torch.equal(index, index.sort().values)
    assert target[[0, 2, 3]].tolist() == [-1, -1, -1]
    assert index[target[1]] == 2 and index[target[4]] == 9
    # more positives than the rate allows: all positives, nothing else
    index, _ = sample_local_classes(torch.arange(10, 20), 10, 10, 0.1)
    assert torch.equal(index, torch.arange(10))
    assert num_sampled(0.05, 10) == 1 and num_sampled(1.0, 7) == 7
    assert num_sampled(0.25, 10) == 2 and num_sampled(0.35, 10) == 4  # Python round: half to even


@pytest.mark.parametrize("rate", [0.5, 0.3, 0.01])
def test_one_shard_draws_the_single_process_stream(rate: float) -> None:
    """The module's promise: on one rank, with the same stream, the same classes as
    sample_classes at every step, also after a step whose positives fill the shard."""
    from pml_margins.functional import sample_classes

    ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batches = [torch.arange(8), torch.tensor([0]), torch.tensor([1, 6]), torch.tensor([5])]
    for labels in batches:
        index, _ = sample_local_classes(labels, 0, 8, rate, ours)
        single = sample_classes(labels, 8, rate, theirs)
        expected = torch.arange(8) if single is None else single[0]
        assert torch.equal(index, expected), (labels, index, expected)


def test_core_without_process_group_is_the_single_process_core() -> None:
    z, y = torch.randn(6, 8).tanh().double(), torch.randint(0, 8, (6,))
    scale = torch.rand(6, dtype=torch.float64) + 1
    a = sharded_margin_softmax_cross_entropy(z, y, lambda c: c - 0.35, scale)
    b = margin_softmax_cross_entropy(z, y, lambda c: c - 0.35, scale)
    torch.testing.assert_close(a, b)


def test_shard_ranges() -> None:
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert shard_range(10, 3, 2) == (7, 10)
    with pytest.raises(ValueError, match="every rank owns"):
        shard_ranges(2, 3)
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 3, 3)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="ClassWeightLoss"):
        ShardedMarginSoftmaxLoss(torch.nn.Linear, 10, 4)
    for rate in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sample_rate"):
            ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, sample_rate=rate)
    with pytest.raises(ValueError, match="both"):
        ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=1)
    with pytest.raises(ValueError, match="chunk_size"):
        ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, chunk_size=4)
    with pytest.raises(ValueError, match="weight_regularizer"):
        ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, weight_regularizer=LpRegularizer())
    loss_fn = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=1, world_size=2)
    assert (loss_fn.class_start, loss_fn.class_end) == (5, 10)
    assert loss_fn.W_local.shape == (4, 5)
    assert "classes=[5, 10)" in repr(loss_fn)
    with pytest.raises(ValueError, match="holds shard 1 of 2, but its process group makes"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 1]))  # offline: for checkpoints only
    whole = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        whole(torch.randn(2, 4), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="width"):
        whole(torch.randn(2, 3), torch.tensor([0, 1]))


def test_shards_are_initialised_per_rank_and_reproducibly() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a0 = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=2, seed=5)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
    a1 = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=1, world_size=2, seed=5)
    b0 = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=2, seed=5)
    c0 = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=2, seed=6)
    assert not torch.equal(a0.W_local, a1.W_local)
    assert torch.equal(a0.W_local, b0.W_local)
    assert not torch.equal(a0.W_local, c0.W_local)


def test_second_backward_through_the_same_graph_raises() -> None:
    """The backward reuses the softmax buffer in place: a second backward (retain_graph)
    is named, where it failed in autograd's version check ("modified by an inplace
    operation"), one process allowing it."""
    loss_fn = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4)
    loss = loss_fn(torch.randn(5, 4, requires_grad=True), torch.randint(0, 10, (5,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"retain_graph=True\) is not supported"):
        loss.backward()


@pytest.mark.parametrize("loss_type", [ArcFaceLoss, SoftmaxLoss])
def test_partial_fc_on_one_rank_equals_the_single_process_partial_fc(loss_type) -> None:
    """Same random stream, same kept classes, same loss and gradients as ``sample_rate=``
    of the ordinary (fused) loss."""
    ref = loss_type(50, 4, sample_rate=0.3).double()
    sharded = ShardedMarginSoftmaxLoss(loss_type, 50, 4, sample_rate=0.3, seed=2).double()
    sharded.loss.load_state_dict(ref.state_dict())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([1, 7, 7, 30, 49, 2])
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a = sharded(xa, y)
    torch.manual_seed(sharded.sampler_seed())  # the sharded sampler's seed, for the global RNG
    b = ref(xb, y)
    (a + b).backward()
    assert len(sharded.sampled_classes) == 15
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(sharded.W_local.grad, ref.W.grad)


@pytest.mark.parametrize("loss_type", [ArcFaceLoss, SoftmaxLoss])
def test_partial_fc_negatives_do_not_follow_the_initial_weights(loss_type) -> None:
    """The sampler's stream is not the initialisation's: with the same seed, the first
    step kept the negatives whose columns drew the largest initial values (``|W[0, j]|``
    of the kept negatives 1.18-1.27x the mean for ArcFace, 1.8x for Softmax)."""
    ratios = []
    for seed in range(5):
        loss = ShardedMarginSoftmaxLoss(
            loss_type, 4000, 8, sample_rate=0.1, seed=seed, rank=0, world_size=1
        )
        first_row = loss.W_local.detach()[0].abs()
        loss(torch.randn(4, 8), torch.arange(4))
        negatives = loss.sampled_classes[loss.sampled_classes >= 4]
        assert len(negatives) == 396
        ratios.append(first_row[negatives].mean() / first_row.mean())
    assert 0.93 < torch.stack(ratios).mean() < 1.07
    assert loss.sampler_seed() != loss._stream_seed()


def test_cosine_logits_matches_pml_cosine_with_gradients() -> None:
    from pytorch_metric_learning.distances import CosineSimilarity

    from pml_margins.distributed.local_logits import cosine_logits

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cosine_logits, (x, w))
    g = torch.randn(5, 7, dtype=torch.float64)
    ours = torch.autograd.grad((cosine_logits(x, w) * g).sum(), (x, w))
    pml = torch.autograd.grad((CosineSimilarity()(x, w.t()) * g).sum(), (x, w))
    for a, b in zip(ours, pml, strict=True):
        torch.testing.assert_close(a, b)


def test_cosine_logits_degenerate_columns_follow_normalize() -> None:
    """A column of norm below ``F.normalize``'s eps is divided by eps with no radial term
    (the clamp stops the norm's gradient), one of norm exactly eps keeps it, as PML's
    ``CosineSimilarity``: the radial term was kept below eps (dL/dW 6.6x off)."""
    from pytorch_metric_learning.distances import CosineSimilarity

    from pml_margins.distributed.local_logits import cosine_logits

    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    w[:, 2] = torch.tensor([3e-13, -2e-13, 1e-13, 0.5e-13], dtype=torch.float64)
    w[:, 4] = torch.tensor([1e-12, 0.0, 0.0, 0.0], dtype=torch.float64)
    g = torch.randn(5, 6, dtype=torch.float64)
    grads = []
    for logits in (cosine_logits, lambda a, b: CosineSimilarity()(a, b.t())):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        (logits(xx, ww) * g).sum().backward()
        grads.append((xx.grad, ww.grad))
    (x_ours, w_ours), (x_pml, w_pml) = grads
    torch.testing.assert_close(x_ours, x_pml)
    # the degenerate columns' gradients are ~1e12: compare relative to their size
    torch.testing.assert_close(w_ours, w_pml, rtol=1e-9, atol=1e-3)


def test_which_losses_take_the_cosine_path() -> None:
    from pml_margins.distributed.sharded_loss import _cosine_scale

    x = torch.randn(2, 3)
    cosine = {
        i for i, s in SPEC_BY_ID.items() if _cosine_scale(s.build(4, 3), x, False) is not None
    }
    plain = {"softmax", "softmax_nobias", "subcenter", "subcenter_k2_big_margin"}
    assert cosine == set(SPEC_BY_ID) - plain


def test_state_dict_round_trip_resumes_the_partial_fc_draws() -> None:
    """``state_dict()`` holds the sampler (``_extra_state``): a loss loaded from it draws
    the same classes as the one that went on (PyTorch's convention for module state)."""
    torch.manual_seed(0)
    a = ShardedMarginSoftmaxLoss(ArcFaceLoss, 1000, 8, sample_rate=0.1, seed=3)
    batches = [(torch.randn(6, 8), torch.randint(0, 1000, (6,))) for _ in range(5)]
    for x, y in batches[:3]:
        a(x, y)
    b = ShardedMarginSoftmaxLoss(ArcFaceLoss, 1000, 8, sample_rate=0.1, seed=99)
    b.load_state_dict(torch.load(_saved(a.state_dict()), weights_only=True))
    for x, y in batches[3:]:
        a(x, y)
        b(x, y)
        assert torch.equal(a.sampled_classes, b.sampled_classes)
    with pytest.raises(ValueError, match="extra state must be a dict with the key"):
        b.set_extra_state({"generator": None})
    # a state dict saved without the sampler (the earlier format): it starts from the seed
    old_format = {k: v for k, v in a.state_dict().items() if k != "_extra_state"}
    c = ShardedMarginSoftmaxLoss(ArcFaceLoss, 1000, 8, sample_rate=0.1, seed=3)
    c.load_state_dict(old_format)
    fresh = ShardedMarginSoftmaxLoss(ArcFaceLoss, 1000, 8, sample_rate=0.1, seed=3)
    assert torch.equal(c.sampler_state(), fresh.sampler_state())
    wrapped = torch.nn.ModuleDict({"loss": c})
    wrapped.load_state_dict({f"loss.{k}": v for k, v in old_format.items()})


def _saved(state: dict) -> object:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_the_public_function_takes_minus_inf_logits_as_the_single_process_one():
    """-inf masks a class (found by review: refused as NaN/Inf by its new checks); NaN
    and +inf are refused."""
    import math

    from pml_margins.functional import margin_softmax_cross_entropy

    z = torch.randn(4, 6).tanh()
    z[:, 5] = -math.inf
    y = torch.tensor([0, 1, 2, 3])
    got = sharded_margin_softmax_cross_entropy(z, y, lambda c: c - 0.35, 30.0)
    torch.testing.assert_close(got, margin_softmax_cross_entropy(z, y, lambda c: c - 0.35, 30.0))
    z[0, 1] = math.nan
    with pytest.raises(ValueError, match=r"local_logits contains NaN or \+Inf"):
        sharded_margin_softmax_cross_entropy(z, y, None, 30.0)


@pytest.mark.parametrize("shape", [(), (1,), (4, 1)], ids=str)
def test_a_learnable_scale_with_minus_inf_logits_gets_a_finite_gradient(shape):
    """(found by review) -inf (a masked class) times the scale's zero softmax gradient
    made the scale's gradient NaN, in both functions; it is the finite difference with the
    masked column dropped."""
    import math

    from pml_margins.functional import margin_softmax_cross_entropy

    z = torch.randn(4, 6, dtype=torch.float64).tanh()
    z[:, 5] = -math.inf
    y = torch.tensor([0, 1, 2, 3])
    for fn in (margin_softmax_cross_entropy, sharded_margin_softmax_cross_entropy):
        s = torch.full(shape, 2.0, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(z, y, lambda c: c - 0.2, s).sum(), s)
        kept = torch.full(shape, 2.0, dtype=torch.float64, requires_grad=True)
        (expected,) = torch.autograd.grad(fn(z[:, :5], y, lambda c: c - 0.2, kept).sum(), kept)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    # forward mode (found by review; the sharded function has no jvp): the reverse value
    s0 = torch.full(shape, 2.0, dtype=torch.float64)

    def loss(s):
        return margin_softmax_cross_entropy(z, y, lambda c: c - 0.2, s).sum()

    forward = torch.func.jacfwd(loss)(s0)
    torch.testing.assert_close(forward, torch.func.jacrev(loss)(s0), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(forward).all()
    two = torch.full((4,), 2.0, dtype=torch.float64)  # the same value, with or without grad
    plain = margin_softmax_cross_entropy(z, y, None, two)
    learnable = margin_softmax_cross_entropy(z, y, None, two.clone().requires_grad_(True))
    assert torch.equal(plain, learnable.detach())
    for fn in (margin_softmax_cross_entropy, sharded_margin_softmax_cross_entropy):
        with pytest.raises(ValueError, match=r"scale must lie in \(0, 1e\+15\]"):  # as numbers
            fn(z, y, None, torch.zeros(4, dtype=torch.float64))


def test_masked_logits_and_a_scale_with_a_derivative_in_a_loss_and_in_forward_ad():
    """(found by review) inside a loss whose base_logits mask a class, a learned scale's
    gradient was NaN; a torch.autograd.forward_ad dual scale's tangent too."""
    import math

    import torch.autograd.forward_ad as fw

    from pml_margins.functional import margin_softmax_cross_entropy
    from pml_margins.losses import CosFaceLoss

    class Masked(CosFaceLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.s = torch.nn.Parameter(torch.tensor(30.0, dtype=torch.float64))

        def base_logits(self, embeddings):
            cos = self.cosine(embeddings).clone()
            cos[:, 4] = -math.inf
            return cos, self.s

    torch.manual_seed(0)
    loss = Masked(num_classes=5, embedding_size=8).double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    loss(x, y).backward()
    assert torch.isfinite(loss.s.grad)
    z = torch.randn(4, 6, dtype=torch.float64).tanh()
    z[0, 3] = -math.inf
    labels = torch.tensor([0, 5, 2, 2])
    with fw.dual_level():
        dual = fw.make_dual(torch.tensor(30.0, dtype=torch.float64), torch.tensor(1.0).double())
        tangent = fw.unpack_dual(margin_softmax_cross_entropy(z, labels, None, dual).sum()).tangent
    expected = torch.func.jacfwd(lambda s: margin_softmax_cross_entropy(z, labels, None, s).sum())(
        torch.tensor(30.0, dtype=torch.float64)
    )
    torch.testing.assert_close(tangent, expected)
    compiled = torch.compile(margin_softmax_cross_entropy, backend="eager")  # hides the dual
    with fw.dual_level():
        dual = fw.make_dual(torch.tensor(30.0, dtype=torch.float64), torch.tensor(1.0).double())
        tangent = fw.unpack_dual(compiled(z, labels, None, dual).sum()).tangent
    torch.testing.assert_close(tangent, expected)
    for bad in (torch.tensor(1e300, dtype=torch.float64), torch.tensor(0), torch.tensor(-1)):
        with pytest.raises(ValueError, match=r"scale must lie in \(0, 1e\+15\]"):
            margin_softmax_cross_entropy(z, labels, None, bad)


def test_the_sharded_functional_names_a_logit_function_of_another_shape() -> None:
    """It applied them unchecked: a (N, 1) non-target function returned zero losses."""
    z, y = torch.randn(4, 6).tanh(), torch.tensor([0, 0, 0, 0])
    with pytest.raises(ValueError, match="non_target_logit_fn must return one value per"):
        sharded_margin_softmax_cross_entropy(
            z, y, lambda c: c - 0.35, 10.0, non_target_logit_fn=lambda c: c.amax(1, keepdim=True)
        )
    with pytest.raises(ValueError, match="target_logit_fn must return one value per"):
        sharded_margin_softmax_cross_entropy(z, y, lambda c: c[:1], 10.0)


def test_settings_code_compares_numbers_by_value() -> None:
    """One normalization for every agreement (a reducer's bounds, a functional's scale):
    10, 10.0 and numpy's 10 agree; a bool, another value or a string do not."""
    import numpy as np

    from pml_margins.distributed.collectives import settings_code

    ten = settings_code(("low", 10))
    assert ten == settings_code(("low", 10.0)) == settings_code(("low", np.float32(10)))
    assert ten == settings_code(("low", np.int64(10)))
    assert len({ten, settings_code(("low", 11.0)), settings_code(("low", "10"))}) == 3
    assert settings_code(True) != settings_code(1.0)


def test_a_hooked_distance_is_called_as_by_the_single_process_loss() -> None:
    """The sharded loss read the loss's declaration directly: a hook on the distance fired
    in the single-process loss (83.70) and not in the sharded one (59.76)."""
    torch.manual_seed(0)
    sharded = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 8)
    single = ArcFaceLoss(10, 8)
    single.load_state_dict(sharded.loss.state_dict())
    x, y = torch.randn(16, 8), torch.arange(16) % 10
    calls = []
    for loss in (sharded.loss, single):
        loss.distance.register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    torch.testing.assert_close(sharded(x, y), single(x, y))
    assert len(calls) == 2


def test_a_failed_load_changes_nothing() -> None:
    """torch copied the entries that fit before raising: a sharded CurricularFace kept the
    failed checkpoint's t (0 -> 0.75)."""
    from pml_margins.losses import CurricularFaceLoss

    loss = ShardedMarginSoftmaxLoss(CurricularFaceLoss, 10, 8, sample_rate=0.5)
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in loss.state_dict().items()}
    state = dict(loss.state_dict())
    state["loss.W"], state["loss.t"] = torch.randn(8, 11), torch.tensor(0.75)
    state["_extra_state"] = {"sampler_state": torch.Generator().manual_seed(3).get_state()}
    with pytest.raises(RuntimeError, match=r"size mismatch for loss\.W"):
        loss.load_state_dict(state)
    after = loss.state_dict()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(after[key], value), key
    assert torch.equal(
        after["_extra_state"]["sampler_state"], before["_extra_state"]["sampler_state"]
    )


def test_partial_fc_with_a_hooked_distance_equals_the_single_process_loss() -> None:
    """Partial FC never calls the distance in one process; the sharded loss called a
    hooked one (45.83 against 56.48 with a x0.5 hook)."""
    torch.manual_seed(0)
    sharded = ShardedMarginSoftmaxLoss(ArcFaceLoss, 30, 4, sample_rate=0.5, seed=2)
    single = ArcFaceLoss(30, 4, sample_rate=0.5)
    single.load_state_dict(sharded.loss.state_dict())
    for loss in (sharded.loss, single):
        loss.distance.register_forward_hook(lambda m, i, o: o * 0.5)
    x, y = torch.randn(12, 4), torch.arange(12)
    a = sharded(x, y)
    torch.manual_seed(sharded.sampler_seed())  # the sharded sampler's seed, for the global RNG
    b = single(x, y)
    assert len(sharded.sampled_classes) < 30
    torch.testing.assert_close(a, b)


def test_with_value_checks_off_a_row_without_one_owner_is_nan():
    """Unchecked, a label no rank owns trained its row toward no class (a finite loss,
    55.657 for the label 11 of 11 classes); its loss and gradients are NaN instead, the
    other rows untouched. With the checks on it is refused."""
    import pml_margins

    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    target = torch.tensor([0, 5, -1, 2])
    with pml_margins.value_checks(False):
        out = sharded_margin_softmax_cross_entropy(z, target, None, 30.0)
    out.sum().backward()
    assert out.isnan().tolist() == [False, False, True, False]
    assert z.grad.isnan().any(dim=1).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="owned by exactly one rank"):
        sharded_margin_softmax_cross_entropy(z, target, None, 30.0)
    x = torch.randn(4, 6, requires_grad=True)
    with pml_margins.value_checks(False):
        loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 11, 6)(x, torch.tensor([1, 2, 11, 3]))
    assert loss.isnan()


def test_the_query_label_fingerprint_sees_their_order() -> None:
    """The ranks' query labels are compared by a fingerprint of their elements *in
    order* (found by review: only labels that differ as multisets were tried, and an
    order-blind fingerprint passed): a permutation, one changed label or a float's bit
    pattern change it; equal labels, on any dtype of the same values, do not."""
    from pml_margins.distributed.evaluation import _content_code

    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    assert _content_code(labels) == _content_code(labels.clone())
    assert _content_code(labels) != _content_code(labels.flip(0))
    assert _content_code(labels) != _content_code(labels[[1, 0, *range(2, 8)]])
    changed = labels.clone()
    changed[5] = 8
    assert _content_code(labels) != _content_code(changed)
    floats = labels.float()
    assert _content_code(floats) != _content_code(floats.flip(0))
    assert _content_code(floats) != _content_code(torch.where(floats == 9, -0.0, floats))


def test_ranks_values_are_equal_up_to_a_relative_1e_6() -> None:
    """The documented tolerance of the ranks' running statistics: a relative 1e-6 (found
    by review: only a 4.8% difference was probed, and a tolerance of 0.04 passed)."""
    from pml_margins.distributed.collectives import EQUAL_VALUES_RTOL, _differ

    assert EQUAL_VALUES_RTOL == 1e-6
    for value in (0.7, 20.0, -3e4):
        assert _differ(max(value, value * (1 + 3e-6)), min(value, value * (1 + 3e-6)))
        assert not _differ(max(value, value * (1 + 5e-7)), min(value, value * (1 + 5e-7)))
    assert _differ(1e-3, 0.0) and not _differ(0.0, 0.0)


def test_float64_queries_are_searched_as_given_and_left_unchanged() -> None:
    """The ranks' check of the query set summarised float64 queries clamped to >= 0 in
    place: the caller's tensor (or numpy array) was changed and the search ran on the
    clamped rows (P@1 and MAP@R off; found by review)."""
    from pml_margins.distributed.evaluation import (
        ShardedRetrievalAccuracyCalculator,
        sharded_exact_knn,
    )
    from pml_margins.evaluation import RetrievalAccuracyCalculator, exact_knn

    g = torch.Generator().manual_seed(0)
    query = torch.randn(6, 3, generator=g, dtype=torch.float64)
    reference = torch.randn(20, 3, generator=g, dtype=torch.float64)
    before = query.clone()
    for given in (query, query.numpy()):
        got = sharded_exact_knn(given, reference, 3)
        for a, b in zip(got, exact_knn(before, reference, 3), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(query, before)  # (the array shares the tensor's memory)
    labels = torch.arange(20) % 4
    x = torch.randn(20, 3, generator=g, dtype=torch.float64) - 0.5
    x_before, calc = x.clone(), {"exclude": ("NMI", "AMI")}
    expected = RetrievalAccuracyCalculator(**calc).get_accuracy(x_before, labels)
    for given in (x, x.numpy()):
        assert ShardedRetrievalAccuracyCalculator(**calc).get_accuracy(given, labels) == expected
    with_queries = ShardedRetrievalAccuracyCalculator(**calc).get_accuracy(
        query, labels[:6], reference, labels
    )
    assert with_queries == RetrievalAccuracyCalculator(**calc).get_accuracy(
        before, labels[:6], reference, labels
    )
    assert torch.equal(x, x_before) and torch.equal(query, before)


def test_the_sharded_cross_entropy_runs_without_data_dependent_shapes() -> None:
    """Forward and backward pick the owned targets with gather/scatter_add_: on the meta
    device (no values, like a GPU tensor the host would have to wait for) they run; the
    boolean indexing before (torch.nonzero: a host sync per step on a GPU) could not."""
    from pml_margins.distributed.sharded_margin_softmax import _ShardedSoftmaxCrossEntropy

    logits = torch.randn(6, 4, device="meta", requires_grad=True)
    target = torch.tensor([0, 1, -1, 3, 2, 0], device="meta")
    _ShardedSoftmaxCrossEntropy.apply(logits, target, None, False).sum().backward()
    assert logits.grad.shape == (6, 4) and logits.grad.device.type == "meta"


@pytest.mark.parametrize("functions", ["target", "both"])
def test_the_sharded_softmax_with_margins_reads_nothing_back(functions) -> None:
    """With a target (and a non-target) logit function the owned target entries were found
    by ``torch.nonzero`` and boolean indexing: a host sync per step on a GPU, with the value
    checks off too, though the docstring says the softmax reads nothing back (found by
    review). Checked on the ops the call runs (a profile), checks left to the caller; the
    values equal the single-process margin softmax."""
    from torch.profiler import ProfilerActivity, profile

    from pml_margins.functional.target_logits import arcface_target
    from pml_margins.validation import CHECKED_BY_CALLER

    torch.manual_seed(0)
    cosine = (torch.rand(6, 5, dtype=torch.float64) * 2 - 1).requires_grad_()
    labels = torch.tensor([0, 1, 4, 3, 2, 0])
    scale = torch.full((6,), 8.0, dtype=torch.float64)
    margin = lambda c: arcface_target(c, 0.5)  # noqa: E731
    other = (lambda c: c * 1.1) if functions == "both" else None
    with CHECKED_BY_CALLER, profile(activities=[ProfilerActivity.CPU]) as trace:
        got = sharded_margin_softmax_cross_entropy(cosine, labels, margin, scale, None, other)
        got.sum().backward()
    reads = ("aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense", "aten::item")
    assert not {event.name for event in trace.events()} & set(reads)
    leaf = cosine.detach().clone().requires_grad_()
    want = margin_softmax_cross_entropy(leaf, labels, margin, scale, non_target_logit_fn=other)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(cosine.grad, leaf.grad)


def test_partial_fc_sampling_reads_back_only_the_positive_count() -> None:
    """``sample_local_classes`` reads one number, the count of the shard's positives (its
    documented read); boolean-mask indexing made two more host syncs (found by review)."""
    from torch.profiler import ProfilerActivity, profile

    labels = torch.tensor([3, 7, 12, 3, 25, 9])  # 7, 9, 12 owned by the shard [5, 15)
    generator = torch.Generator().manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        index, target = sample_local_classes(labels, 5, 10, 0.5, generator)
    names = [event.name for event in trace.events()]
    assert names.count("aten::_local_scalar_dense") == 1
    assert not {"aten::nonzero", "aten::masked_select"} & set(names)
    kept = (index + 5).tolist()
    assert len(kept) == 5 and {7, 9, 12} <= set(kept)
    expected = [kept.index(c) if c in kept else -1 for c in labels.tolist()]
    assert target.tolist() == expected
    empty_index, none_owned = sample_local_classes(labels, 40, 0, 0.5)
    assert empty_index.numel() == 0 and none_owned.tolist() == [-1] * 6


def test_any_integer_seed_builds_a_shard_and_a_float_one_is_refused() -> None:
    """``seed * 1_000_003 + rank`` went to ``torch.manual_seed`` unreduced: a seed beyond
    ~1.8e13 (``torch.initial_seed()`` of an unseeded process) overflowed; 1.9 became 1
    (found by review). Seeds that fit keep their streams."""
    big = 2**62 + 5
    loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 9, 4, seed=big, rank=1, world_size=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((big * 1_000_003 + 1) % 2**64)
        expected = ArcFaceLoss(4, 4).W
    torch.testing.assert_close(loss.W_local, expected, rtol=0, atol=0)
    small = ShardedMarginSoftmaxLoss(ArcFaceLoss, 9, 4, seed=7, rank=1, world_size=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7 * 1_000_003 + 1)
        torch.testing.assert_close(small.W_local, ArcFaceLoss(4, 4).W, rtol=0, atol=0)
    for bad in (1.9, True, "3"):
        with pytest.raises(TypeError, match="seed must be an integer"):
            ShardedMarginSoftmaxLoss(ArcFaceLoss, 9, 4, seed=bad)


def test_sample_rate_is_checked_when_assigned_and_in_sample_local_classes() -> None:
    """Only the constructor checked it: 0 and -2 trained with one column per rank, NaN
    failed in ``round``; ``sample_local_classes`` took 0, -1 and 7 (found by review)."""
    loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 9, 4, sample_rate=0.5)
    for bad, error in ((0.0, ValueError), (-2.0, ValueError), (1.5, ValueError),
                       (float("nan"), ValueError), ("0.5", TypeError)):  # fmt: skip
        with pytest.raises(error, match="sample_rate"):
            loss.sample_rate = bad
        assert loss.sample_rate == 0.5
        with pytest.raises(error, match="sample_rate"):
            sample_local_classes(torch.tensor([1, 2]), 0, 9, bad)
    loss.sample_rate = 1
    assert loss.sample_rate == 1.0


def test_a_meta_shard_with_partial_fc_gives_its_state_and_refuses_loads_clearly() -> None:
    """With ``sample_rate < 1`` its sampler state built a meta generator: ``state_dict``
    and ``load_state_dict`` raised torch's "META device type not an accelerator" instead
    of the shard's own error (found by review). The state is the seed's (none saved)."""
    with torch.device("meta"):
        loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, sample_rate=0.5)
    state = loss.state_dict()
    assert loss.sampler_state() is None and state["loss.W"].is_meta
    source = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, sample_rate=0.5).state_dict()
    with pytest.raises(ValueError, match="meta device, where nothing loads"):
        loss.load_state_dict(source)
