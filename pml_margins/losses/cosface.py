r"""CosFace / large margin cosine loss (LMCL)."""

from __future__ import annotations

from typing import Any

from pml_margins.functional.margin_softmax import TargetLogitFn
from pml_margins.functional.target_logits import (
    TargetWithSlope,
    cosface_target,
    cosface_value_and_slope,
)
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.validation import (
    check_logit_offset,
    check_logit_scale,
)

__all__ = ["CosFaceLoss"]


class CosFaceLoss(ClassWeightLoss):
    r"""CosFace (Wang et al., CVPR 2018, arXiv:1801.09414): an additive cosine margin.

    .. math::
        L = -\log\frac{e^{s(\cos\theta_{y} - m)}}
                     {e^{s(\cos\theta_{y} - m)} + \sum_{j\ne y} e^{s\cos\theta_j}}

    Recommended: ``m = 0.35`` (a cosine, unitless; the paper's accuracy saturates
    at 0.35 and training diverges above ~0.45), ``s = 64`` for face recognition
    (unitless; lower bound from :func:`pml_margins.functional.cosface_scale_lower_bound`,
    upper bound on ``m`` from :func:`pml_margins.functional.cosface_margin_upper_bound`).
    For CUB/SOP retrieval smaller values (``s`` 16-32, ``m`` 0.1-0.35) are common.
    Same definition and units as PML's ``CosFaceLoss``.

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        margin: ``m >= 0``, subtracted from the target cosine (a negative margin is
            refused, as an invalid margin).
        scale: ``s > 0``.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``).
    """

    hyperparameter_names = ("margin", "scale")
    margin = Hyperparameter(check_logit_offset)
    scale = Hyperparameter(check_logit_scale)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.35,
        scale: float = 64.0,
        **kwargs: Any,
    ) -> None:
        self.margin, self.scale = margin, scale
        super().__init__(num_classes, embedding_size, **kwargs)

    def target_logit_fn(self) -> TargetLogitFn:
        return TargetWithSlope(cosface_target, cosface_value_and_slope, margin=self.margin)
