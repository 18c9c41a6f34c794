"""The fused path is taken only when a loss declares its logits (``fused_logits``)."""

from __future__ import annotations

import types
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import pml_margins
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
    # SphereFace's feature-norm scale: declared, the core takes the norms itself
    assert SphereFaceLoss(C, D).fused_logits(x) == FusedLogits(True, True, 1.0, scale_by_norm=True)
    assert SphereFaceLoss(C, D, scale=3.0).fused_logits(x) == FusedLogits(
        True, True, 3.0, scale_by_norm=True
    )
    normalized = SphereFaceLoss(C, D, scale=30.0, feature_norm=False)
    assert normalized.fused_logits(x) == FusedLogits(True, True, 30.0)

    class LearnedScale(SphereFaceLoss):
        def logit_scale(self, embeddings):
            return torch.full((len(embeddings),), 7.0)

    learned = LearnedScale(C, D).fused_logits(x)  # an overridden scale is not replaced
    assert not learned.scale_by_norm and torch.equal(learned.scale, torch.full((B,), 7.0))


class _ClampedNorms(SphereFaceLoss):
    def feature_norms(self, embeddings):
        return super().feature_norms(embeddings).clamp(max=1.0)


class _OwnForm(SphereFaceLoss):
    def fused_logits(self, embeddings):
        form = super().fused_logits(embeddings)
        return FusedLogits(form.normalize_embeddings, form.normalize_weight, form.scale)


@pytest.mark.parametrize("cls", [_ClampedNorms, _OwnForm], ids=["feature_norms", "fused_logits"])
def test_sphereface_subclasses_building_on_its_norm_keep_it(cls) -> None:
    """A subclass that redefines how the norm is made (``feature_norms``) or builds its own
    form on SphereFace's (``fused_logits``) gets the norms as a tensor scale, as before
    ``scale_by_norm``: the fused value equals its plain path's and the sharded loss's."""
    torch.manual_seed(3)
    x, y = torch.randn(B, D, dtype=torch.float64) * 3, torch.randint(0, C, (B,))
    loss_fn = cls(C, D).double()
    form = loss_fn.fused_logits(x)
    assert not form.scale_by_norm and isinstance(form.scale, torch.Tensor)
    fused = loss_fn(x, y)
    with pml_margins.autograd_only():
        plain = loss_fn(x, y)
    sharded = ShardedMarginSoftmaxLoss(cls, C, D, rank=0, world_size=1).double()
    sharded.loss.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(sharded(x, y), fused)
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


class LearnedScaleCosFace(CosFaceLoss):
    """A learned scale, returned as the 0-dim parameter itself (a ``(B,)`` one works too)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.learned = torch.nn.Parameter(torch.tensor(10.0))

    def logit_scale(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.learned


@pytest.mark.parametrize(
    "mode", [{}, {"chunk_size": 3}, {"sample_rate": 1.0}, "autograd_only"], ids=str
)
def test_learned_zero_dim_scale_in_every_mode(mode) -> None:
    """s (cos - m) with a learned 0-dim s: the value and the gradients in x, W and s
    equal the formula's, on the dense, blocked and plain paths alike."""
    import pml_margins

    torch.manual_seed(0)
    kwargs = mode if isinstance(mode, dict) else {}
    loss = LearnedScaleCosFace(7, 5, margin=0.3, **kwargs).double()
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (9,))
    with pml_margins.autograd_only(mode == "autograd_only"):
        value = loss(x, y)
    cos = F.normalize(x, dim=1) @ F.normalize(loss.W, dim=0)
    target = cos.gather(1, y[:, None]).squeeze(1) - 0.3
    expected = target_softmax_cross_entropy(loss.learned * cos, y, loss.learned * target).mean()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    params = (x, loss.W, loss.learned)
    for a, b in zip(
        torch.autograd.grad(value, params), torch.autograd.grad(expected, params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sharded_loss_refuses_parameters_not_split_by_class() -> None:
    sharded = ShardedMarginSoftmaxLoss(LearnedScaleCosFace, 7, 5)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 6])
    with pytest.raises(
        ValueError, match=r"cannot train LearnedScaleCosFace's parameters .*\(learned\)"
    ):
        sharded(x, y)
    sharded.loss.learned.requires_grad_(False)
    assert torch.isfinite(sharded(x, y))


def test_plain_path_refusal_names_the_redefined_logits() -> None:
    loss = SubCenterArcFace(7, 5, chunk_size=3)
    with pytest.raises(ValueError, match="redefines base_logits, cosine or weights_for with"):
        loss(torch.randn(4, 5), torch.tensor([0, 1, 2, 6]))


def test_logits_redefined_by_weights_for_on_the_instance_or_after_the_class_go_plain() -> None:
    """The fused core read none of these (found by review): weights_for overridden by a
    subclass, base_logits set on an instance or patched on a class after its definition."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 6, 3, 4])

    def flipped_base_logits(self, embeddings):
        cos, scale = ArcFaceLoss.base_logits(self, embeddings)
        return -cos, scale

    class FlippedWeights(ArcFaceLoss):
        def weights_for(self, embeddings):
            return -super().weights_for(embeddings)

    class Patched(ArcFaceLoss):
        pass

    reference = ArcFaceLoss(7, 5).double()
    flipped = FlippedWeights(7, 5).double()
    instance = ArcFaceLoss(7, 5).double()
    instance.base_logits = types.MethodType(flipped_base_logits, instance)
    Patched.base_logits = flipped_base_logits
    patched = Patched(7, 5).double()
    for loss in (flipped, instance, patched):
        loss.load_state_dict(reference.state_dict())
        with pml_margins.autograd_only():
            expected = loss(x, y)  # the plain path: the methods as they are
        assert not torch.allclose(expected, reference(x, y))
        torch.testing.assert_close(loss(x, y), expected, rtol=0, atol=0)
        loss.chunk_size = 3
        with pytest.raises(ValueError, match="runs on the plain path"):
            loss(x, y)


@pytest.mark.parametrize(
    "form",
    [
        FusedLogits(True, True, torch.tensor(2.0), scale_by_norm=True),  # a tensor scale
        FusedLogits(False, False, 2.0, scale_by_norm=True),  # raw embeddings
    ],
    ids=["tensor scale", "raw embeddings"],
)
def test_a_misdeclared_norm_scale_is_refused_sharded_as_in_one_process(form) -> None:
    class Misdeclared(CosFaceLoss):
        def fused_logits(self, embeddings):
            return form

    x, y = torch.randn(B, D), torch.randint(0, C, (B,))
    with pytest.raises(ValueError, match="scale_by_norm needs"):
        Misdeclared(C, D)(x, y)
    sharded = ShardedMarginSoftmaxLoss(Misdeclared, C, D, rank=0, world_size=1)
    with pytest.raises(ValueError, match="scale_by_norm needs"):
        sharded(x, y)
