r"""Normalized softmax loss (NSL)."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.distances import BaseDistance

from pml_margins.functional.fused_margin_softmax import FusedLogits
from pml_margins.losses.class_weight_loss import (
    ClassWeightLoss,
    is_plain_similarity,
)
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.losses.pml_calls import runs_as_its_class
from pml_margins.validation import check_logit_scale

__all__ = ["NormSoftmaxLoss"]


class NormSoftmaxLoss(ClassWeightLoss):
    r"""Normalized softmax: softmax on scaled cosines, no margin.

    .. math::
        L = -\log\frac{e^{s\cos\theta_{y}}}{\sum_{j} e^{s\cos\theta_j}}

    Embeddings and class weights are L2-normalized, so only angles matter. This is
    NSL in the CosFace paper (Wang et al., 2018, Eq. 3), NormFace (Wang et al.,
    2017), and PML's ``NormalizedSoftmaxLoss`` with ``temperature = 1 / s``.

    As in PML, the class weights are always normalized (by ``distance.normalize``)
    and the distance decides the rest: with the default ``CosineSimilarity`` (or
    PML's default ``DotProductSimilarity()``) the embeddings are normalized too;
    ``DotProductSimilarity(normalize_embeddings=False)`` gives
    :math:`s\,x^\top \hat W_j`; a distance that is not a similarity (e.g.
    ``LpDistance``) enters negated. Every distance gives PML's value, with one exception
    in a degenerate corner: PML normalizes ``W`` twice with a normalizing distance (its
    own ``normalize``, then the distance's), which turns a column of norm in
    ``[1e-24, 1e-12)`` (below ``F.normalize``'s eps: a zero-initialized or decayed
    column) into a unit vector, where one normalization divides it by ``1e-12``. The fused
    core (default mode, ``chunk_size``, ``sample_rate``, sharded) normalizes once, as for
    ArcFace and CosFace (and PML's), so such a column's logits and gradient differ from
    PML's; the plain path (``autograd_only``, other distances) follows PML. Columns of
    norm at least ``1e-12`` give the same values on every path.

    Recommended ``s`` (unitless): 30 (default) for retrieval; 64 for face
    recognition with ~10k+ identities (see
    :func:`pml_margins.functional.cosface_scale_lower_bound`). PML's default
    temperature 0.05 is ``s = 20``.

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        scale: ``s > 0``.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- any PML distance, see above).
    """

    hyperparameter_names = ("scale",)
    distance_types = (BaseDistance,)
    scale = Hyperparameter(check_logit_scale)

    def __init__(
        self, num_classes: int, embedding_size: int, *, scale: float = 30.0, **kwargs: Any
    ) -> None:
        if "temperature" in kwargs:
            raise TypeError(
                "NormSoftmaxLoss takes scale = 1 / temperature, not PML's temperature "
                f"(temperature={kwargs['temperature']!r}: scale=1/{kwargs['temperature']!r})"
            )
        self.scale = scale
        super().__init__(num_classes, embedding_size, **kwargs)

    @property
    def logits_are_cosines(self) -> bool:  # type: ignore[override]
        """Cosines only with a normalizing cosine or dot-product similarity (PML's default
        ``DotProductSimilarity()`` included; for the ``avg_angle`` statistic)."""
        distance = self.distance  # (a hook may change the values: no angle then)
        plain = is_plain_similarity(distance) and runs_as_its_class(distance)
        return plain and bool(distance.normalize_embeddings)

    def base_logits(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, float]:
        """PML's logits: ``distance(x, normalize(W))``, negated for a non-similarity."""
        weights = self.distance.normalize(self.weights_for(embeddings), dim=0)
        logits = self.distance(embeddings.to(weights.dtype), weights.t())
        return (logits if self.distance.is_inverted else -logits), self.scale

    def distance_inputs(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings and ``normalize(W)^T``, as :meth:`base_logits` hands the distance."""
        weights = self.distance.normalize(self.weights_for(embeddings), dim=0)
        return embeddings.to(weights.dtype), weights.t()

    def fused_logits(self, embeddings: torch.Tensor) -> FusedLogits | None:
        """Fused with a plain cosine/dot similarity: ``W`` normalized, ``x`` as it says."""
        if not is_plain_similarity(self.distance) or self.distance.p != 2:  # (see base_logits)
            return None
        return FusedLogits(bool(self.distance.normalize_embeddings), True, self.scale)
