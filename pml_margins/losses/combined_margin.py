r"""The combined margin of the ArcFace paper, unifying SphereFace, ArcFace and CosFace."""

from __future__ import annotations

from functools import partial
from typing import Any

from pml_margins.functional.margin_softmax import TargetLogitFn
from pml_margins.functional.target_logits import (
    TargetWithSlope,
    combined_margin_target,
    combined_margin_value_and_slope,
)
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.validation import (
    check_angle_margin,
    check_logit_offset,
    check_logit_scale,
    check_multiplier,
)

__all__ = ["CombinedMarginLoss"]


class CombinedMarginLoss(ClassWeightLoss):
    r"""Combined margin (Deng et al., ArcFace paper, Sec. 3.3 / insightface).

    .. math::
        L = -\log\frac{e^{s(\cos(m_1\theta_y + m_2) - m_3)}}
                     {e^{s(\cos(m_1\theta_y + m_2) - m_3)} + \sum_{j\ne y} e^{s\cos\theta_j}}

    Special cases, reproduced exactly (same values and gradients):
    ``(m1, m2, m3) = (1, 0, m)`` is :class:`CosFaceLoss`, ``(1, m, 0)`` is
    :class:`ArcFaceLoss`, ``(m, 0, 0)`` with integer ``m`` is :class:`SphereFaceLoss`
    with a fixed ``scale``. See :func:`pml_margins.functional.combined_margin_target`
    for how the target logit is continued beyond :math:`\pi` (monotone for ``m1 = 1``
    while ``m2`` is below about 2.33 rad, as ArcFace's).

    Recommended (insightface, faces): ``(1.0, 0.3, 0.2)`` or ``(1.0, 0.5, 0.0)``
    with ``s = 64``. Units: ``m1`` a multiplier, ``m2`` radians, ``m3`` a cosine.
    Here every margin applies, as the paper's formula (and insightface's MXNet code);
    insightface's PyTorch ``CombinedMarginLoss`` (``arcface_torch``) ignores ``m2``
    whenever ``m3 > 0``, so at ``(1.0, 0.3, 0.2)`` it computes CosFace's ``cos - 0.2``.

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        m1: angle multiplier in ``[1, 100]``.
        m2: additive angular margin in radians, ``[0, pi)``.
        m3: additive cosine margin ``>= 0``.
        scale: ``s > 0``.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``).
    """

    hyperparameter_names = ("m1", "m2", "m3", "scale")
    m1 = Hyperparameter(check_multiplier)
    m2 = Hyperparameter(check_angle_margin)
    m3 = Hyperparameter(check_logit_offset)
    scale = Hyperparameter(check_logit_scale)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        scale: float = 64.0,
        **kwargs: Any,
    ) -> None:
        self.m1, self.m2, self.m3, self.scale = m1, m2, m3, scale
        super().__init__(num_classes, embedding_size, **kwargs)

    def target_logit_fn(self) -> TargetLogitFn:
        if self.m1 == 1 or (self.m2 == 0 and float(self.m1).is_integer()):
            return TargetWithSlope(
                combined_margin_target,
                combined_margin_value_and_slope,
                m1=self.m1,
                m2=self.m2,
                m3=self.m3,
            )
        return partial(combined_margin_target, m1=self.m1, m2=self.m2, m3=self.m3)
