"""Defects found by this session's review, each test failing on the code before its fix."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.reducers import DivisorReducer, MeanReducer

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.losses import AdaCosLoss, AdaFaceLoss, CurricularFaceLoss

STATISTIC_LOSSES = [CurricularFaceLoss, AdaFaceLoss, AdaCosLoss]


@pytest.mark.parametrize("loss_type", STATISTIC_LOSSES)
@pytest.mark.parametrize("sharded", [False, True])
def test_a_step_whose_reducer_fails_moves_no_running_statistic(loss_type, sharded) -> None:
    """PML's DivisorReducer without a divisor raises after the loss's rows are formed:
    CurricularFace's t, AdaFace's norm statistics and AdaCos's dynamic scale had already
    moved (CenterLoss's centres did not)."""
    torch.manual_seed(0)
    if sharded:
        holder = ShardedMarginSoftmaxLoss(loss_type, 5, 8, reducer=DivisorReducer())
        loss_fn, inner = holder, holder.loss
    else:
        loss_fn = inner = loss_type(5, 8, reducer=DivisorReducer())
    before = {name: value.clone() for name, value in inner.named_buffers()}
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    with pytest.raises(KeyError, match="divisor"):
        loss_fn(x, y)
    for name, value in inner.named_buffers():
        assert torch.equal(value, before[name]), name
    # the same loss with a working reducer moves them
    inner.reducer = MeanReducer()
    loss_fn(x, y)
    assert any(not torch.equal(v, before[n]) for n, v in inner.named_buffers())


def test_an_eval_step_that_fails_copies_nothing() -> None:
    """In eval mode no statistic moves, so the step keeps no copy to put back."""
    loss_fn = CurricularFaceLoss(5, 8).eval()
    assert loss_fn.statistics_kept() == {}
    assert set(loss_fn.train().statistics_kept()) == {"t"}


@pytest.mark.parametrize("how", ["assigned", "loaded"])
def test_a_sparse_statistic_is_refused_by_name(how) -> None:
    """A sparse tensor as CurricularFace's t failed inside torch (NotImplementedError:
    'aten::ne.Scalar' from the 'SparseCPU' backend, a page of dispatcher keys)."""
    loss_fn = CurricularFaceLoss(5, 8)
    sparse = torch.tensor([0.3]).to_sparse()
    with pytest.raises(TypeError, match="t must be a dense tensor"):
        if how == "assigned":
            loss_fn.t = sparse
        else:
            loss_fn.load_state_dict({**loss_fn.state_dict(), "t": sparse})
    assert float(loss_fn.t) == 0.0


def test_replaced_sgd_centres_of_another_shape_are_refused_by_name() -> None:
    """update="sgd" centres are a plain Parameter: one of PML's W layout (D, C) failed with
    a raw IndexError, a (C + 1, D) one was taken."""
    from pml_margins.losses import CenterLoss

    x, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 3] * 2)
    for shape in ((3, 4), (4, 4), (5, 3)):
        loss_fn = CenterLoss(num_classes=4, embedding_size=3, update="sgd")
        loss_fn.centers = torch.nn.Parameter(torch.randn(*shape))
        with pytest.raises(ValueError, match=r"centers have shape .* need \(4, 3\)"):
            loss_fn(x, y)
    loss_fn.centers = torch.nn.Parameter(torch.randn(4, 3))
    assert torch.isfinite(loss_fn(x, y))


def test_pml_reduction_that_vmap_cannot_batch_is_explained() -> None:
    """An embedding regularizer or a ThresholdReducer under vmap failed with vmap's raw
    "dynamic shape" / "inplace arithmetic" errors, which name neither; the reducers that
    vmap batches (SumReducer, say) still run."""
    from pytorch_metric_learning.reducers import SumReducer, ThresholdReducer
    from pytorch_metric_learning.regularizers import LpRegularizer

    from pml_margins.losses import ArcFaceLoss, CircleLoss

    xs, ys = torch.randn(3, 6, 4), torch.tensor([[0, 0, 1, 1, 2, 2]] * 3)
    for loss_fn, named in (
        (CircleLoss(embedding_regularizer=LpRegularizer()), "LpRegularizer"),
        (ArcFaceLoss(3, 4, embedding_regularizer=LpRegularizer()).eval(), "LpRegularizer"),
        (CircleLoss(reducer=ThresholdReducer(low=0)), "ThresholdReducer"),
    ):
        with pytest.raises(RuntimeError, match=f"under torch.func.vmap: PML's .*{named}"):
            torch.func.vmap(torch.func.grad(lambda e, y, f=loss_fn: f(e, y)))(xs, ys)
    summed = CircleLoss(reducer=SumReducer())
    grads = torch.func.vmap(torch.func.grad(lambda e, y: summed(e, y)))(xs, ys)
    assert grads.shape == xs.shape


def test_no_pairs_give_positive_zero() -> None:
    """A negative sum of similarities times 0 gave -0.0 (printed as -0., signbit set)."""
    from pml_margins.functional import circle_loss_whole
    from pml_margins.losses import CircleLoss

    zero = circle_loss_whole(torch.empty(0), torch.tensor([-0.3]), 0.25, 256.0)
    assert zero.item() == 0.0 and not torch.signbit(zero)
    x = -torch.rand(4, 3) - 1  # similarities of one class only: no negative pair
    whole = CircleLoss(per_anchor=False)(x, torch.zeros(4, dtype=torch.long))
    assert whole.item() == 0.0 and not torch.signbit(whole)


def test_adacos_dynamic_scale_is_zero_dim_for_any_one_element_scale() -> None:
    """A (1,) scale gave a (1,) new scale, where the docstring promises a 0-dim one."""
    from pml_margins.losses.adacos import adacos_dynamic_scale

    torch.manual_seed(0)
    cosine, labels = torch.rand(6, 5) * 2 - 1, torch.tensor([0, 1, 2, 3, 4, 0])
    expected = adacos_dynamic_scale(cosine, labels, 3.0)
    for scale in (torch.tensor(3.0), torch.tensor([3.0]), torch.tensor([[3.0]])):
        new = adacos_dynamic_scale(cosine, labels, scale)
        assert new.shape == () and torch.equal(new, expected)


def test_a_scheduler_on_w_says_it_is_a_learned_parameter() -> None:
    """The refusal called W "a buffer the loss sets itself, as AdaCos's scale"."""
    from pml_margins.losses import ArcFaceLoss
    from pml_margins.schedules import MarginScheduler

    with pytest.raises(ValueError, match=r"ArcFaceLoss\.W is a tensor \(a learned parameter\)"):
        MarginScheduler(ArcFaceLoss(5, 4), 1, 3, total_steps=4, attr="W")
    with pytest.raises(ValueError, match="a buffer the loss sets itself"):
        MarginScheduler(AdaCosLoss(5, 4), 1, 3, total_steps=4, attr="scale")


def test_statistics_made_in_inference_mode_train_there() -> None:
    """From the review of the change: keeping the statistics read each one's version
    counter, which an inference tensor lacks: every training step of a loss built under
    torch.inference_mode() failed there."""
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    for loss_type in STATISTIC_LOSSES:
        with torch.inference_mode():
            loss_fn = loss_type(5, 8)
            before = [b.clone() for b in loss_fn.buffers()]
            assert torch.isfinite(loss_fn(x, y))
            after = list(loss_fn.buffers())
            assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_keeping_the_statistics_adds_no_graph_break() -> None:
    """From the review of the change: the statistics' copy, a comprehension with an
    assignment expression, broke every compiled class-weight loss's graph ("Read
    uninitialized cell"), ArcFace's too (no statistics)."""
    from torch._dynamo.utils import counters

    from pml_margins.losses import ArcFaceLoss

    torch._dynamo.reset()
    counters.clear()
    for loss_type in (ArcFaceLoss, CurricularFaceLoss):
        compiled = torch.compile(loss_type(5, 8), backend="eager")
        compiled(torch.randn(6, 8, requires_grad=True), torch.tensor([0, 1, 2, 3, 4, 0]))
    reasons = [str(reason) for reason in counters["graph_break"]]
    assert not [r for r in reasons if "uninitialized cell" in r], reasons
    torch._dynamo.reset()
