r"""MagFace: ArcFace with a margin that grows with the feature norm, plus a norm regulariser."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from pml_margins.functional.margin_softmax import TargetLogitFn
from pml_margins.functional.target_logits import angle_cosine, safe_sine
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.elasticface import elastic_arc_target
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.losses.step_statistics import StepStatistics
from pml_margins.validation import (
    MAX_LOGIT_TERM,
    check_angle_margin,
    check_bool,
    check_in_interval,
    check_logit_offset,
    check_logit_scale,
    check_ordered,
)

__all__ = ["MagFaceLoss", "magface_margin", "magface_regularizer", "magface_target"]


def magface_margin(
    norms: torch.Tensor, l_a: float, u_a: float, l_m: float, u_m: float
) -> torch.Tensor:
    r"""MagFace's margin (Meng et al., 2021, Eq. 4), linear in the clipped feature norm.

    .. math::
        m(a) = \frac{u_m - l_m}{u_a - l_a}\,(a - l_a) + l_m,
        \qquad a = \mathrm{clip}(\|x\|, l_a, u_a)

    Radians. Differentiable in the norm inside :math:`[l_a, u_a]` (0 outside).
    """
    a = norms.clamp(l_a, u_a)
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regularizer(norms: torch.Tensor, l_a: float, u_a: float) -> torch.Tensor:
    r"""MagFace's :math:`g(a) = 1/a + a/u_a^2` (Eq. 5) of the clipped norm; least at :math:`u_a`."""
    a = norms.clamp(l_a, u_a)
    return 1 / a + a / u_a**2


def magface_target(
    cosine: torch.Tensor, margins: torch.Tensor, easy_margin: bool = False
) -> torch.Tensor:
    r"""MagFace's target logit :math:`\cos(\theta_i + m(a_i))`, a margin per row (radians).

    Where :math:`\theta_i + m_i > \pi`, ArcFace's fallback :math:`\cos\theta_i - m_i\sin m_i`
    (:func:`~pml_margins.losses.elasticface.elastic_arc_target`). With ``easy_margin`` (the
    official code's default) the margin applies only where :math:`\cos\theta_i > 0`, and
    :math:`\cos\theta_i` is kept elsewhere, as ArcFace's easy margin.
    """
    if not easy_margin:
        return elastic_arc_target(cosine, margins)
    margins, cosine = margins.to(cosine.dtype), angle_cosine(cosine)
    with_margin = cosine * torch.cos(margins) - safe_sine(cosine) * torch.sin(margins)
    return torch.where(cosine > 0, with_margin, cosine)


def _range_bound(index: int, name: str, what: str) -> property:
    """A bound of MagFace's ranges: read from, and set through, ``set_ranges`` (checked
    with the other three, so a scheduler cannot set ``l_a >= u_a`` or ``u_m < l_m``)."""

    def get(self: MagFaceLoss) -> float:
        return self._ranges[index]

    def set(self: MagFaceLoss, value: float) -> None:
        ranges = list(self._ranges)
        ranges[index] = value
        self.set_ranges(*ranges)

    return property(get, set, doc=f"``{name}``: the {what}; checked when set.")


class MagFaceLoss(ClassWeightLoss):
    r"""MagFace (Meng et al., CVPR 2021, arXiv:2103.06627): the norm says how sure the model is.

    With :math:`a_i = \mathrm{clip}(\|x_i\|, l_a, u_a)` the (unnormalized) feature norm,

    .. math::
        L_i = -\log\frac{e^{s\cos(\theta_{y_i} + m(a_i))}}
              {e^{s\cos(\theta_{y_i} + m(a_i))} + \sum_{j\ne y_i} e^{s\cos\theta_j}}
              + \lambda_g\, g(a_i)

    with the margin :func:`magface_margin` (larger for larger norms) and the regulariser
    :func:`magface_regularizer`, which rewards large norms. Gradients flow through
    :math:`a_i` (into the margin and :math:`g`) inside :math:`[l_a, u_a]`. Where
    :math:`\theta + m(a_i) > \pi` the target logit is ArcFace's fallback
    :math:`\cos\theta - m\sin m` (per sample); with ``easy_margin=True`` the margin
    applies only where :math:`\cos\theta > 0` (:func:`magface_target`). A miner's weight
    multiplies the whole :math:`L_i`. After training, the norm is the quality score.

    The paper's equation (default) puts the margin on every target; the official code
    (``MagLinear``) defaults to ``easy_margin=True``, which early in training, where about
    half of the target cosines are negative, gives a smaller loss: pass it to reproduce
    that code's numbers.

    **Units:** ``l_m``, ``u_m`` in radians; ``l_a``, ``u_a`` are norms. Recommended
    (paper, faces, MS1MV2): ``s = 64``, ``l_a = 10``, ``u_a = 110``, ``l_m = 0.45``,
    ``u_m = 0.8``, ``lambda_g = 35`` (the official ``trainer.py``'s argument defaults to
    20). The norm range must match the backbone's: for a
    small retrieval model whose features have norms of a few units, scale ``l_a``/``u_a``
    down accordingly (the glyph benchmark uses 1 and 20).

    Fused core (``chunk_size``, ``sample_rate``) and sharded
    (:class:`~pml_margins.distributed.ShardedMarginSoftmaxLoss`: the margins and the
    regulariser come from the gathered batch's norms, the same on every rank; equal to
    the single-process loss on that batch).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        scale: ``s > 0``.
        l_a: lower norm bound ``> 0``.
        u_a: upper norm bound ``> l_a``.
        l_m: margin at ``l_a`` in radians, ``[0, pi)``.
        u_m: margin at ``u_a`` in radians, ``[l_m, pi)``.
        lambda_g: weight ``>= 0`` of the regulariser.
        easy_margin: apply the margin only for :math:`\theta_y < \pi/2` (the official
            code's default).
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``) and the core's
            ``chunk_size`` / ``sample_rate``.
    """

    hyperparameter_names = ("scale", "l_a", "u_a", "l_m", "u_m", "lambda_g", "easy_margin")
    scale = Hyperparameter(check_logit_scale)
    lambda_g = Hyperparameter(check_logit_offset)
    easy_margin = Hyperparameter(check_bool)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = False,
        **kwargs: Any,
    ) -> None:
        self.scale, self.lambda_g, self.easy_margin = scale, lambda_g, easy_margin
        self.set_ranges(l_a, u_a, l_m, u_m)
        self._norms: torch.Tensor | None = None
        self._margins: torch.Tensor | None = None
        super().__init__(num_classes, embedding_size, **kwargs)

    l_a = _range_bound(0, "l_a", "lower norm bound")
    u_a = _range_bound(1, "u_a", "upper norm bound")
    l_m = _range_bound(2, "l_m", "margin at l_a, radians")
    u_m = _range_bound(3, "u_m", "margin at u_a, radians")

    def set_ranges(self, l_a: float, u_a: float, l_m: float, u_m: float) -> None:
        """Set the norm range ``[l_a, u_a]`` and margin range ``[l_m, u_m]`` (checked together)."""
        # norms within what 1/a and u_a^2 (the regulariser) keep finite in float32
        l_a = check_in_interval(l_a, "l_a", 1 / MAX_LOGIT_TERM, MAX_LOGIT_TERM)
        u_a = check_in_interval(u_a, "u_a", 1 / MAX_LOGIT_TERM, MAX_LOGIT_TERM)
        l_m, u_m = check_angle_margin(l_m, "l_m"), check_angle_margin(u_m, "u_m")
        check_ordered(l_a, u_a, "l_a", "u_a")
        if u_m < l_m:
            raise ValueError(f"u_m must be >= l_m, got {u_m} and {l_m}")
        self._ranges = (l_a, u_a, l_m, u_m)

    @contextmanager
    def prepare_step(
        self, embeddings: torch.Tensor, labels: torch.Tensor, statistics: StepStatistics
    ) -> Iterator[None]:
        """The step's norms (with their gradient) and margins, from the batch's embeddings."""
        self._norms = self.feature_norms(embeddings)
        self._margins = magface_margin(self._norms, self.l_a, self.u_a, self.l_m, self.u_m)
        try:
            yield
        finally:
            self._norms = self._margins = None

    def extra_losses(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        r"""The regulariser :math:`\lambda_g\,g(a_i)` per row (``None`` when ``lambda_g = 0``)."""
        if not self.lambda_g or self._norms is None:
            return None
        return self.lambda_g * magface_regularizer(self._norms, self.l_a, self.u_a)

    def target_logit_fn(self) -> TargetLogitFn:
        if self._margins is None:
            raise RuntimeError(
                "MagFaceLoss's target logits depend on the embeddings' norms: call the loss "
                "(its forward), not target_logit_fn on its own"
            )
        return partial(magface_target, margins=self._margins, easy_margin=self.easy_margin)
