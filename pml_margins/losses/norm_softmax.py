r"""Normalized softmax loss (NSL)."""

from __future__ import annotations

from typing import Any

from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.validation import check_positive

__all__ = ["NormSoftmaxLoss"]


class NormSoftmaxLoss(ClassWeightLoss):
    r"""Normalized softmax: softmax on scaled cosines, no margin.

    .. math::
        L = -\log\frac{e^{s\cos\theta_{y}}}{\sum_{j} e^{s\cos\theta_j}}

    Embeddings and class weights are L2-normalized, so only angles matter. This is
    NSL in the CosFace paper (Wang et al., 2018, Eq. 3), NormFace (Wang et al.,
    2017), and PML's ``NormalizedSoftmaxLoss`` with ``temperature = 1 / s``.

    Recommended ``s`` (unitless): 30 (default) for retrieval; 64 for face
    recognition with ~10k+ identities (see
    :func:`pml_margins.functional.cosface_scale_lower_bound`). PML's default
    temperature 0.05 is ``s = 20``.

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        scale: ``s > 0``.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``).
    """

    hyperparameter_names = ("scale",)
    scale = Hyperparameter(check_positive)

    def __init__(
        self, num_classes: int, embedding_size: int, scale: float = 30.0, **kwargs: Any
    ) -> None:
        self.scale = scale
        super().__init__(num_classes, embedding_size, **kwargs)
