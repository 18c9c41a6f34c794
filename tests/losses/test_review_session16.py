"""Regressions found by the session-16 reviews (each test fails on the code before)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from pml_margins.losses import CircleLoss


@pytest.mark.parametrize("reducer", [None, "mean"])
@pytest.mark.parametrize("miner", [None, "multi_similarity"])
def test_circle_loss_in_cross_batch_memory_with_every_row_enqueued_equals_pml(miner, reducer):
    # PML's CrossBatchMemory passes no query rows (embeddings[~enqueue_mask]) against the
    # memory: a loss of 0, as PML's CircleLoss gives; ours refused the empty batch after
    # the wrapper had already filled its queue
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, generator=g)
    labels = torch.randint(0, 3, (8,), generator=g)
    everything = torch.ones(8, dtype=torch.bool)
    following = torch.randn(8, 4, generator=g)
    results = []
    from pytorch_metric_learning.reducers import MeanReducer

    options = {"reducer": MeanReducer()} if reducer else {}  # (a mean of no anchors: NaN)
    for loss in (
        CircleLoss(m=0.25, gamma=64, **options),
        pml_losses.CircleLoss(m=0.25, gamma=64, **options),
    ):
        mining = pml_miners.MultiSimilarityMiner() if miner else None
        memory = pml_losses.CrossBatchMemory(loss, 4, memory_size=32, miner=mining)
        leaf = x.clone().requires_grad_(True)
        value = memory(leaf, labels, enqueue_mask=everything)
        value.backward()
        results.append((value.item(), memory.queue_idx, leaf.grad))
        # the next step, with queries, sees the enqueued rows
        second = memory(following, labels)
        results[-1] += (second.item(),)
    (ours, ours_idx, ours_grad, ours_next), (theirs, theirs_idx, theirs_grad, theirs_next) = results
    assert ours == theirs == 0.0 and ours_idx == theirs_idx == 8
    assert ours_next == pytest.approx(theirs_next, rel=1e-5)
    assert ours_grad is None or not ours_grad.any()
    assert theirs_grad is None or not theirs_grad.any()


def test_circle_loss_takes_no_queries_against_a_reference_set_and_no_empty_batch_alone():
    x, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    empty = torch.zeros(0, 4, requires_grad=True)
    no_labels = torch.zeros(0, dtype=torch.long)
    value = CircleLoss()(empty, no_labels, ref_emb=x, ref_labels=labels)
    value.backward()
    assert value.item() == 0.0
    with pytest.raises(ValueError, match="embeddings is empty"):
        CircleLoss()(empty, no_labels)


@pytest.mark.parametrize(
    "hook", ["modify_cosine_of_target_classes", "scale_logits", "get_cosine", "cast_types"]
)
def test_a_subclass_defining_a_pml_hook_is_refused_where_it_would_be_ignored(hook):
    # PML's LargeMarginSoftmaxLoss calls these steps; ours never does, so a PML-style
    # subclass silently trained without its margin
    from pml_margins.losses import ArcFaceLoss, ClassWeightLoss, CosFaceLoss

    for base in (ArcFaceLoss, CosFaceLoss, ClassWeightLoss):
        with pytest.raises(TypeError, match=f"defines {hook}: a step of PML's"):
            type("Ported", (base,), {hook: lambda self, *args: args[0]})
    mixin = type("Mixin", (), {hook: lambda self, *args: args[0]})
    with pytest.raises(TypeError, match=f"defines {hook}: a step of PML's"):
        type("Mixed", (mixin, ArcFaceLoss), {})
    with pytest.raises(TypeError, match="a step of PML's"):
        type("Both", (ArcFaceLoss, pml_losses.ArcFaceLoss), {})


def test_norm_softmax_names_scale_for_pmls_temperature():
    from pml_margins.losses import NormSoftmaxLoss

    with pytest.raises(TypeError, match=r"scale = 1 / temperature.*scale=1/0\.05"):
        NormSoftmaxLoss(5, 4, temperature=0.05)


@pytest.mark.parametrize("loss_name", ["magface", "elasticface"])
def test_per_row_arcface_targets_take_the_margin_at_the_rounded_threshold(loss_name):
    # elastic_arc_target (ElasticFace-Arc in training, MagFace without easy_margin) kept
    # `cosine > -cos m` in the cosines' dtype: the fallback at -0.87758255 for m = 0.5
    import math

    from pml_margins.losses import ArcFaceLoss, ElasticFaceLoss, MagFaceLoss

    cosine = torch.tensor(math.cos(math.pi - 0.5), dtype=torch.float32)
    x = torch.stack([cosine, torch.sqrt(1 - cosine * cosine)]).reshape(1, 2)
    labels = torch.tensor([0])
    if loss_name == "magface":
        loss = MagFaceLoss(2, 2, l_m=0.5, u_m=0.5, lambda_g=0.0, easy_margin=False)
    else:
        loss = ElasticFaceLoss(2, 2, margin=0.5, sigma=1e-12)
    arcface = ArcFaceLoss(2, 2)
    loss.W.data, arcface.W.data = torch.eye(2), torch.eye(2)
    assert loss(x, labels).item() == pytest.approx(arcface(x, labels).item(), rel=1e-5)
    assert arcface(x, labels).item() == pytest.approx(94.68324, rel=1e-5)
