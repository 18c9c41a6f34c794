r"""ArcFace / additive angular margin loss."""

from __future__ import annotations

from typing import Any

from pml_margins.functional.margin_softmax import TargetLogitFn
from pml_margins.functional.target_logits import (
    TargetWithSlope,
    arcface_target,
    arcface_value_and_slope,
)
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.validation import check_angle_margin, check_bool, check_logit_scale

__all__ = ["ArcFaceLoss"]


class ArcFaceLoss(ClassWeightLoss):
    r"""ArcFace (Deng et al., CVPR 2019, arXiv:1801.07698): an additive angular margin.

    .. math::
        L = -\log\frac{e^{s\cos(\theta_{y} + m)}}
                     {e^{s\cos(\theta_{y} + m)} + \sum_{j\ne y} e^{s\cos\theta_j}}

    Where :math:`\theta_y + m > \pi` the target logit is
    :math:`\cos\theta_y - m\sin m` instead (insightface's and PML's rule), which keeps
    it decreasing in the angle for margins up to about 2.33 rad (where
    :math:`\cos m + m\sin m = 1`); above, it jumps up at the switch, as theirs does.
    (The seed ArcFace article's snippet falls back to :math:`\cos\theta_y - \sin m`,
    which jumps at the switch for every margin: 0.36 at ``m = 0.5``; not used here.)
    With ``easy_margin=True`` the margin applies only where
    :math:`\cos\theta_y > 0`. No ``acos`` is taken, so gradients stay finite
    when an embedding coincides with (or opposes) its class weight.

    **Units: ``margin`` is in radians** (0.5 rad = 28.6 degrees). PML's
    ``ArcFaceLoss`` takes degrees (default 28.6): ``ArcFaceLoss(margin=math.radians(d))``
    here equals PML's ``ArcFaceLoss(margin=d)``.

    Recommended: ``m = 0.5`` rad and ``s = 64`` (unitless) for face recognition
    (the paper's setting); ``m`` 0.2-0.5 rad and ``s`` 16-32 for CUB/SOP retrieval.

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        margin: ``m`` in radians, ``0 <= m < pi`` (a negative margin is refused, as an
            invalid margin; the functional ``arcface_target`` takes one).
        scale: ``s > 0``.
        easy_margin: apply the margin only for :math:`\theta_y < \pi/2`.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``).
    """

    hyperparameter_names = ("margin", "scale", "easy_margin")
    margin = Hyperparameter(check_angle_margin)
    scale = Hyperparameter(check_logit_scale)
    easy_margin = Hyperparameter(check_bool)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.5,
        scale: float = 64.0,
        easy_margin: bool = False,
        **kwargs: Any,
    ) -> None:
        self.margin, self.scale, self.easy_margin = margin, scale, easy_margin
        super().__init__(num_classes, embedding_size, **kwargs)

    def target_logit_fn(self) -> TargetLogitFn:
        return TargetWithSlope(
            arcface_target,
            arcface_value_and_slope,
            margin=self.margin,
            easy_margin=self.easy_margin,
        )
