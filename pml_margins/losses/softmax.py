r"""Plain softmax loss: the baseline every margin paper compares with."""

from __future__ import annotations

import math
from typing import Any

import torch
from pytorch_metric_learning.distances import BaseDistance, DotProductSimilarity

from pml_margins.functional.fused_margin_softmax import FusedLogits
from pml_margins.losses.class_weight_loss import (
    ClassWeightLoss,
    is_plain_similarity,
)
from pml_margins.validation import check_bool, check_not_meta

__all__ = ["SoftmaxLoss"]


def _linear_uniform_init(weight: torch.Tensor) -> None:
    """``nn.Linear``'s default: uniform in +-1/sqrt(D) for ``W`` of shape ``(D, C)``."""
    bound = 1 / math.sqrt(weight.shape[0])
    torch.nn.init.uniform_(weight, -bound, bound)


class SoftmaxLoss(ClassWeightLoss):
    r"""Softmax cross-entropy on a linear classifier.

    .. math::
        L = -\log\frac{e^{W_{y}^\top x + b_{y}}}{\sum_{j} e^{W_j^\top x + b_j}}

    Neither ``x`` nor ``W`` is normalized, so the learned features separate
    classes but are not compact (Wen et al., 2016, Fig. 2). Add ``CenterLoss`` or
    use a margin loss for retrieval.

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        bias: learn a per-class bias ``b`` (parameter ``bias``, shape ``(C,)``).
        **kwargs: PML options (``reducer``, ``weight_regularizer``,
            ``embedding_regularizer``, ``weight_init_func``, ``distance``, ...). ``W``
            defaults to ``nn.Linear``'s uniform initialisation in :math:`\pm 1/\sqrt{D}`.
            The logits are ``distance(x, W^T)`` (default: the raw dot product), negated
            for a distance that is not a similarity (``LpDistance``, ``SNRDistance``:
            nearer classes get larger logits), PML's rule in ``NormalizedSoftmaxLoss``.
    """

    logits_are_cosines = False
    distance_types = (BaseDistance,)

    def __init__(
        self, num_classes: int, embedding_size: int, bias: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(num_classes, embedding_size, **kwargs)
        self.use_bias = check_bool(bias, "bias")
        if self.use_bias:
            self.bias = torch.nn.Parameter(torch.empty(num_classes))
            self._init_bias()
        else:
            self.register_parameter("bias", None)

    def _init_bias(self) -> None:
        """``nn.Linear``'s: uniform in +-1/sqrt(D)."""
        bound = 1 / math.sqrt(self.embedding_size)
        with torch.no_grad():
            self.bias.uniform_(-bound, bound)

    def _init_parameters(self) -> None:
        """``W``, then the bias, as the constructor draws them."""
        super()._init_parameters()
        if self.bias is not None:
            self._init_bias()

    def get_default_weight_init_func(self) -> Any:
        return _linear_uniform_init

    def get_default_distance(self) -> DotProductSimilarity:
        return DotProductSimilarity(normalize_embeddings=False)

    def compute_dtype(self, embeddings: torch.Tensor) -> torch.dtype:
        """As the class-weight losses' (``W`` checked), and the bias not on the meta device."""
        dtype = super().compute_dtype(embeddings)
        if self.bias is not None:
            check_not_meta(self.bias, f"{type(self).__name__}'s bias")
        return dtype

    def base_logits(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, float]:
        weights = self.weights_for(embeddings)
        logits = self.distance(embeddings.to(weights.dtype), weights.t())
        if not self.distance.is_inverted:  # a distance: the nearer class, the larger logit
            logits = -logits
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)
        return logits, 1.0

    def logit_scale(self, embeddings: torch.Tensor) -> float:
        return 1.0

    def fused_logits(self, embeddings: torch.Tensor) -> FusedLogits | None:
        """``W^T x + b`` (fused) with the default distance, or cosines + ``b`` with a cosine one."""
        if not is_plain_similarity(self.distance):  # (not inverted: the plain path negates)
            return None
        normalize = bool(self.distance.normalize_embeddings)
        return FusedLogits(normalize, normalize, 1.0, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.use_bias}"
