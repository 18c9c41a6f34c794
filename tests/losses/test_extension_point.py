"""The fused path is taken only when a loss declares its logits (``fused_logits``)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.functional import FusedLogits
from pml_margins.losses import ArcFaceLoss, ClassWeightLoss, CosFaceLoss, SphereFaceLoss
from tests.losses.reference import arcface_cos, target_softmax_cross_entropy

K, C, D, B = 3, 7, 6, 10


class SubCenterArcFace(ArcFaceLoss):
    """``W`` holds K sub-centres per class; the class cosine is their max."""

    def __init__(self, num_classes: int, embedding_size: int, **kwargs) -> None:
        super().__init__(num_classes * K, embedding_size, **kwargs)
        self.num_classes = num_classes

    def base_logits(self, embeddings):
        cosine = self.cosine(embeddings).view(embeddings.shape[0], self.num_classes, K)
        return cosine.amax(2), self.logit_scale(embeddings)

    def logit_scale(self, embeddings):  # restated harmlessly, as in the probe
        return self.scale


class SubCenterViaCosine(ArcFaceLoss):
    """The same, through an override of ``cosine`` only."""

    def __init__(self, num_classes: int, embedding_size: int, **kwargs) -> None:
        super().__init__(num_classes * K, embedding_size, **kwargs)
        self.num_classes = num_classes

    def cosine(self, embeddings):
        return super().cosine(embeddings).view(embeddings.shape[0], -1, K).amax(2)


class MaxOverSubCentres:
    """A mixin (not a ClassWeightLoss) that redefines the cosine."""

    def cosine(self, embeddings):
        return super().cosine(embeddings).view(embeddings.shape[0], -1, K).amax(2)


class SubCenterViaMixin(MaxOverSubCentres, ArcFaceLoss):
    """The same through a mixin earlier in the bases: the class itself defines nothing."""

    def __init__(self, num_classes: int, embedding_size: int, **kwargs) -> None:
        super().__init__(num_classes * K, embedding_size, **kwargs)
        self.num_classes = num_classes


class SubCenterSubclass(SubCenterArcFace):
    """A further subclass that overrides only the target logit."""

    def target_logit_fn(self):
        return lambda c: c - 0.2


def _subcenter_reference(loss, x, y, psi) -> torch.Tensor:
    w = F.normalize(loss.W.detach().double(), dim=0)
    cos = (F.normalize(x.double(), dim=1) @ w).view(len(y), C, K).amax(2)
    rows = torch.arange(len(y))
    return target_softmax_cross_entropy(64 * cos, y, 64 * psi(cos[rows, y])).mean()


@pytest.mark.parametrize(
    ("cls", "psi"),
    [
        (SubCenterArcFace, lambda c: arcface_cos(c, 0.5)),
        (SubCenterViaCosine, lambda c: arcface_cos(c, 0.5)),
        (SubCenterSubclass, lambda c: c - 0.2),
        (SubCenterViaMixin, lambda c: arcface_cos(c, 0.5)),
    ],
    ids=["base_logits", "cosine", "grandchild", "mixin"],
)
def test_subclass_that_redefines_logits_takes_the_plain_path(cls, psi) -> None:
    torch.manual_seed(0)
    loss = cls(C, D)
    x = torch.randn(B, D)
    y = torch.randint(0, C, (B,))
    assert loss.fused_logits(x) is None
    expected = _subcenter_reference(loss, x, y, psi)
    torch.testing.assert_close(loss(x, y).double(), expected, rtol=1e-6, atol=1e-5)


def test_subclass_that_redefines_logits_rejects_fused_only_options() -> None:
    loss = SubCenterArcFace(C, D, sample_rate=0.5)
    with pytest.raises(ValueError, match="sample_rate are not supported"):
        loss(torch.randn(B, D), torch.randint(0, C, (B,)))


class DeclaredCosFace(CosFaceLoss):
    """Redefines ``base_logits`` and declares the same form explicitly: fused."""

    def base_logits(self, embeddings):
        weights = F.normalize(self.weights_for(embeddings), dim=0)
        return F.normalize(embeddings.to(weights.dtype), dim=1) @ weights, self.scale

    def fused_logits(self, embeddings) -> FusedLogits:
        return FusedLogits(True, True, self.scale)


def test_declared_subclass_is_fused_and_equals_its_plain_value() -> None:
    torch.manual_seed(0)
    fused = DeclaredCosFace(C, D, chunk_size=2)
    plain = CosFaceLoss(C, D)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    assert fused.fused_logits(x) is not None
    torch.testing.assert_close(fused(x, y), plain(x, y))


def test_default_losses_declare_their_forms() -> None:
    x = torch.randn(B, D)
    form = ArcFaceLoss(C, D, scale=10.0).fused_logits(x)
    assert form == FusedLogits(True, True, 10.0)
    sphere = SphereFaceLoss(C, D).fused_logits(x)
    torch.testing.assert_close(sphere.scale, torch.linalg.vector_norm(x, dim=1))
    assert ClassWeightLoss.fused_logits is not SubCenterArcFace.fused_logits


def test_sharded_loss_reads_the_same_declaration() -> None:
    torch.manual_seed(0)
    sharded = ShardedMarginSoftmaxLoss(SubCenterArcFace, C, D, rank=0, world_size=1)
    x = torch.randn(B, D)
    y = torch.randint(0, C, (B,))
    expected = _subcenter_reference(sharded.loss, x, y, lambda c: arcface_cos(c, 0.5))
    torch.testing.assert_close(sharded(x, y).double(), expected, rtol=1e-6, atol=1e-5)


class BatchCentredCosFace(CosFaceLoss):
    """A margin from a batch statistic: 0.2 plus the batch's mean target cosine / 10.

    Written only with ``prepare_step`` (which reads the statistics over all classes) and a
    per-row ``extra_losses``, as the ClassWeightLoss docstring describes.
    """

    @contextmanager
    def prepare_step(self, embeddings, labels, statistics):
        self.step_margin = 0.2 + statistics.target_cosines().mean() / 10
        try:
            yield
        finally:
            self.step_margin = None

    def target_logit_fn(self):
        return lambda c: c - self.step_margin

    def extra_losses(self, embeddings, labels):
        return 0.1 * embeddings.norm(dim=1)


def test_batch_statistic_hook_single_process_and_sharded() -> None:
    torch.manual_seed(0)
    loss = BatchCentredCosFace(C, D, scale=16.0).double()
    sharded = ShardedMarginSoftmaxLoss(BatchCentredCosFace, C, D, scale=16.0).double()
    sharded.loss.load_state_dict(loss.state_dict())
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B,))
    cos = F.normalize(x.detach(), dim=1) @ F.normalize(loss.W.detach(), dim=0)
    rows = torch.arange(B)
    margin = 0.2 + cos[rows, y].mean() / 10
    expected = target_softmax_cross_entropy(16 * cos, y, 16 * (cos[rows, y] - margin))
    expected = (expected + 0.1 * x.detach().norm(dim=1)).mean()
    out, out_sharded = loss(x, y), sharded(x, y)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out_sharded, expected)
    grads = [torch.autograd.grad(v, x)[0] for v in (out, out_sharded)]
    torch.testing.assert_close(grads[0], grads[1])
    assert loss.step_margin is None and sharded.loss.step_margin is None  # cleared on exit
