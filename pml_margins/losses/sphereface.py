r"""SphereFace / A-Softmax: a multiplicative angular margin."""

from __future__ import annotations

from typing import Any

import torch

from pml_margins.functional.fused_margin_softmax import FusedLogits
from pml_margins.functional.margin_softmax import TargetLogitFn
from pml_margins.functional.target_logits import (
    TargetWithSlope,
    sphereface_psi,
    sphereface_value_and_slope,
)
from pml_margins.losses.class_weight_loss import (
    ClassWeightLoss,
    is_plain_inner_product,
    runs_method,
)
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.validation import (
    check_bool,
    check_integer_margin,
    check_non_negative,
    check_optional_logit_scale,
)

__all__ = ["SphereFaceLoss"]


class SphereFaceLoss(ClassWeightLoss):
    r"""SphereFace / A-Softmax (Liu et al., CVPR 2017, arXiv:1704.08063).

    Class weights are normalized, embeddings are not: the logits are
    :math:`\|x\|\cos\theta_j`, and the target logit uses the monotone
    multiple-angle function

    .. math::
        \psi(\theta) = (-1)^k\cos(m\theta) - 2k,\quad
        \theta\in\left[\tfrac{k\pi}{m}, \tfrac{(k+1)\pi}{m}\right]

    .. math::
        L = -\log\frac{e^{\|x\| f_y}}{e^{\|x\| f_y} + \sum_{j\ne y} e^{\|x\|\cos\theta_j}},
        \qquad f_y = \frac{\lambda\cos\theta_y + \psi(\theta_y)}{1 + \lambda}

    ``lambda_`` is the paper's annealing weight (start large, e.g. 1000, decay to
    ~5: see :class:`pml_margins.schedules.SphereFaceLambdaScheduler`); with
    ``lambda_ = 0`` this is pure A-Softmax and equals PML's ``SphereFaceLoss``.
    :math:`\cos(m\theta)` is a Chebyshev polynomial of :math:`\cos\theta`, so no
    ``acos`` enters the gradient.

    Recommended: ``m = 4`` (an integer multiplier, no unit), the paper's choice.
    The logits are :math:`s\|x\|\cos\theta_j` (target :math:`s\|x\|f_y`), as PML's
    ``SphereFaceLoss(scale=s)``: ``s = 1`` (default) is the paper's. With
    ``feature_norm=False`` the embeddings are normalized too and ``s`` is a fixed scale,
    :math:`s\cos\theta_j` (the "normalized SphereFace" of the ArcFace paper's
    combined-margin comparison; large ``s``, e.g. 30-64, as for CosFace).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        margin: integer ``m`` in ``[1, 100]`` (the paper: 4).
        scale: ``s > 0``, times each feature norm (PML's ``scale``), or the fixed scale
            with ``feature_norm=False``; ``None`` is 1.
        lambda_: annealing weight ``lambda >= 0``.
        feature_norm: scale each row's logits by its norm :math:`\|x\|` (the paper, PML);
            ``False``: normalized SphereFace.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``).
    """

    hyperparameter_names = ("margin", "scale", "lambda_", "feature_norm")
    margin = Hyperparameter(check_integer_margin)
    scale = Hyperparameter(check_optional_logit_scale)
    lambda_ = Hyperparameter(check_non_negative)
    feature_norm = Hyperparameter(check_bool)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: int = 4,
        scale: float | None = 1.0,
        lambda_: float = 0.0,
        feature_norm: bool = True,
        **kwargs: Any,
    ) -> None:
        self.margin, self.scale, self.lambda_ = margin, scale, lambda_
        self.feature_norm = feature_norm
        super().__init__(num_classes, embedding_size, **kwargs)

    def _fixed_scale(self) -> float:
        """``scale``, 1 for ``None``."""
        return 1.0 if self.scale is None else self.scale

    def logit_scale(self, embeddings: torch.Tensor) -> float | torch.Tensor:
        """``scale`` times the feature norms ``||x_i||``, or ``scale`` alone with
        ``feature_norm=False``."""
        scale = self._fixed_scale()
        if not self.feature_norm:
            return scale
        norms = self.feature_norms(embeddings)
        return norms if scale == 1.0 else norms * scale

    def fused_logits(self, embeddings: torch.Tensor) -> FusedLogits | None:
        """The default form; with the feature-norm scale (``feature_norm=True``) declared
        as ``scale_by_norm``: the core takes the norms from its own normalization (no norm
        through autograd). Only where nothing in the norm's making is redefined
        (:meth:`logit_scale`, ``feature_norms``, ``compute_dtype``) and the caller is this
        method itself, not a subclass's ``fused_logits`` building on it (which then gets
        the norms as a tensor ``scale``, as before)."""
        cosines = is_plain_inner_product(self.distance) and self.distance.normalize_embeddings
        if (
            not self.feature_norm
            or not cosines
            or not all(
                runs_method(self, name, method) for name, method in _NORM_SCALE_METHODS.items()
            )
        ):
            return super().fused_logits(embeddings)
        return FusedLogits(True, True, self._fixed_scale(), scale_by_norm=True)

    def target_logit_fn(self) -> TargetLogitFn:
        return TargetWithSlope(
            annealed_psi, annealed_psi_value_and_slope, margin=self.margin, lambda_=self.lambda_
        )


def annealed_psi(cosine: torch.Tensor, margin: int, lambda_: float) -> torch.Tensor:
    r"""SphereFace's target with the paper's annealing:
    :math:`(\lambda\cos\theta + \psi)/(1 + \lambda)`, formed as
    :math:`\cos\theta + (\psi - \cos\theta)/(1 + \lambda)` (``torch.lerp``): the same
    value, without :math:`\lambda\cos\theta`, which overflows float32 for
    :math:`\lambda > 3.4 \cdot 10^{38}` (any finite :math:`\lambda` is valid: its
    limit is the plain :math:`\cos\theta`)."""
    psi = sphereface_psi(cosine, margin)
    return psi if lambda_ == 0 else torch.lerp(cosine, psi, 1 / (1 + lambda_))


def annealed_psi_value_and_slope(
    cosine: torch.Tensor, margin: int, lambda_: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`annealed_psi` and its derivative, no graph:
    :math:`(\lambda + \psi')/(1 + \lambda)`, formed as :math:`1 + (\psi' - 1)/(1 + \lambda)`."""
    psi, slope = sphereface_value_and_slope(cosine, margin)
    if lambda_ == 0:
        return psi, slope
    weight = 1 / (1 + lambda_)
    return torch.lerp(cosine, psi, weight), torch.lerp(torch.ones_like(slope), slope, weight)


#: the methods that make SphereFace's norm scale, as defined here and in the base: redefined
#: (by a subclass, or on the instance), the norms come through them instead
_NORM_SCALE_METHODS = {
    "fused_logits": SphereFaceLoss.fused_logits,
    "logit_scale": SphereFaceLoss.logit_scale,
    "feature_norms": ClassWeightLoss.feature_norms,
    "compute_dtype": ClassWeightLoss.compute_dtype,
}
