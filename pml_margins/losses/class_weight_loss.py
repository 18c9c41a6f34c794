"""The PML plumbing shared by every loss with class weights ``W`` of shape ``(D, C)``.

Subclasses only say how base logits are formed and which target-logit function
applies. The loss is computed by
:func:`pml_margins.functional.fused_margin_softmax_cross_entropy` straight from the
embeddings and ``W`` (no ``(B, C)`` temporaries beyond one saved buffer, or none
with ``chunk_size``); subclasses that change :meth:`ClassWeightLoss.base_logits`
without a matching :meth:`ClassWeightLoss.logit_scale`, or a distance other than
PML's cosine/dot-product similarity, use the plain
:func:`pml_margins.functional.margin_softmax_cross_entropy` on the logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_margins.functional.fused_margin_softmax import (
    check_chunk_size,
    check_sample_rate,
    fused_margin_softmax_cross_entropy,
)
from pml_margins.functional.margin_softmax import (
    TargetLogitFn,
    compute_dtype,
    margin_softmax_cross_entropy,
)
from pml_margins.validation import (
    check_class_loss_input,
    check_count,
    check_embeddings,
)

__all__ = ["ClassWeightLoss"]


class ClassWeightLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """Base of the class-weight (proxy) losses: softmax, NSL, SphereFace, CosFace, ArcFace.

    Holds ``W`` (``embedding_size x num_classes``, PML's name and layout, so PML
    state dicts load both ways), validates input, turns a miner's
    ``indices_tuple`` into per-sample weights as PML does, and applies PML's
    reducer, ``weight_regularizer`` (on ``W.t()``) and ``embedding_regularizer``.

    ``W`` keeps its own dtype: embeddings of another dtype are promoted for the
    product (or cast by autocast), never the parameter's storage.

    Subclasses set ``scale`` and override :meth:`target_logit_fn` (and
    :meth:`base_logits` with :meth:`logit_scale` where the logits are not ``scale * cos``).

    Keyword arguments shared by every subclass (besides PML's):

    * ``chunk_size``: ``None`` (default: one saved ``(B, C)`` buffer), an ``int``
      number of classes per block or ``"auto"``: bounded memory, no ``(B, C)``
      tensor is ever held (for very many classes).
    * ``sample_rate``: partial-FC negative-class sampling in ``(0, 1]``: each step
      keeps the batch's classes and a random subset of the others,
      ``round(sample_rate * C)`` in all; only those columns of ``W`` get gradients.
    """

    #: whether :meth:`base_logits` returns cosines (the ``avg_angle`` statistic needs them)
    logits_are_cosines: bool = True
    #: names shown by ``extra_repr`` and recorded by PML's record-keeper
    hyperparameter_names: tuple[str, ...] = ()

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        chunk_size: int | str | None = None,
        sample_rate: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        self.sample_rate = check_sample_rate(sample_rate)
        super().__init__(**kwargs)
        self.num_classes = check_count(num_classes, "num_classes")
        self.embedding_size = check_count(embedding_size, "embedding_size")
        self.W = torch.nn.Parameter(torch.empty(embedding_size, num_classes))
        self.weight_init_func(self.W)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "embedding_size", *self.hyperparameter_names],
            is_stat=False,
        )
        self.add_to_recordable_attributes(name="avg_angle", is_stat=True)

    # --- what subclasses define -------------------------------------------------
    def base_logits(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Return the ``(B, C)`` base logits and the scale (float or ``(B,)`` tensor).

        Default: cosines and :meth:`logit_scale`.
        """
        return self.cosine(embeddings), self.logit_scale(embeddings)

    def logit_scale(self, embeddings: torch.Tensor) -> float | torch.Tensor:
        """The scale ``s`` (float or ``(B,)`` tensor) of :meth:`base_logits`; default ``scale``."""
        return self.scale

    def target_logit_fn(self) -> TargetLogitFn | None:
        """The function applied to the ``B`` target base logits (``None``: identity)."""
        return None

    def non_target_logit_fn(self) -> TargetLogitFn | None:
        """The function applied to every base logit before scaling (``None``: identity).

        Only the class-level Circle loss needs one; losses that set it take the
        plain (unfused) core.
        """
        return None

    # --- shared helpers ---------------------------------------------------------
    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def weights_for(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``W`` in the dtype the product runs in; a differentiable cast, storage untouched."""
        dtype = torch.promote_types(embeddings.dtype, self.W.dtype)
        return self.W if self.W.dtype == dtype else self.W.to(dtype)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``cos(theta_ij)`` between each embedding and each class weight, via ``self.distance``."""
        weights = self.weights_for(embeddings)
        return self.distance(embeddings.to(weights.dtype), weights.t())

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Classification logits without margin (``s * z``), shape ``(B, C)``."""
        check_embeddings(embeddings, width=self.embedding_size)
        logits, scale = self.base_logits(embeddings)
        if isinstance(scale, torch.Tensor):
            scale = scale.to(logits.dtype).unsqueeze(1)
        return logits * scale

    # --- PML contract -------------------------------------------------------------
    def forward(  # type: ignore[override]
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_class_loss_input(
            type(self).__name__,
            "its class weights W",
            self.num_classes,
            self.embedding_size,
            embeddings,
            labels,
            indices_tuple,
            ref_emb,
            ref_labels,
            hint=" (use a pair-based loss such as CircleLoss for that)",
        )
        return super().forward(embeddings, labels, indices_tuple)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> dict[str, dict[str, Any]]:
        non_target_fn = self.non_target_logit_fn()
        if non_target_fn is None and self._fused_supported():
            losses = self._fused_losses(embeddings, labels)
        else:
            logits, scale = self.base_logits(embeddings)
            if self.collect_stats and self.logits_are_cosines:
                self._record_avg_angle(logits, labels)
            losses = margin_softmax_cross_entropy(
                logits, labels, self.target_logit_fn(), scale, non_target_logit_fn=non_target_fn
            )
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=losses.dtype)
        loss_dict = {
            "loss": {
                "losses": losses * miner_weights,
                "indices": torch.arange(embeddings.shape[0], device=embeddings.device),
                "reduction_type": "element",
            }
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def _fused_supported(self) -> bool:
        """Whether :meth:`base_logits` is ``logit_scale * distance(x, W)`` with a PML dot/cosine."""

        def owner(name: str) -> type:
            return next(c for c in type(self).__mro__ if name in c.__dict__)

        distance = self.distance
        plain_distance = (
            type(distance) in (CosineSimilarity, DotProductSimilarity)
            and distance.power == 1
            and (not distance.normalize_embeddings or distance.p == 2)
        )
        logits_owner = owner("base_logits")
        scale_matches = logits_owner is ClassWeightLoss or issubclass(
            owner("logit_scale"), logits_owner
        )
        return plain_distance and scale_matches

    def _fused_losses(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        normalize = bool(self.distance.normalize_embeddings)
        if self.collect_stats and self.logits_are_cosines:
            with torch.no_grad():
                x = torch.nn.functional.normalize(embeddings.detach(), dim=1)
                w = torch.nn.functional.normalize(self.W.detach()[:, labels.long()], dim=0)
                cosine = (x * w.t().to(x.dtype)).sum(1, keepdim=True)
            self._record_avg_angle(cosine, torch.zeros_like(labels))
        return fused_margin_softmax_cross_entropy(
            embeddings,
            self.W,
            labels,
            self.target_logit_fn(),
            self.logit_scale(embeddings),
            normalize_embeddings=normalize,
            normalize_weight=normalize,
            bias=getattr(self, "bias", None),
            chunk_size=self.chunk_size,
            sample_rate=self.sample_rate,
        )

    def _record_avg_angle(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.no_grad():
            target = logits.gather(1, labels.long().unsqueeze(1)).to(compute_dtype(logits.dtype))
            self.avg_angle = math.degrees(torch.acos(target.clamp(-1, 1)).mean().item())

    def extra_repr(self) -> str:
        names = ["num_classes", "embedding_size", *self.hyperparameter_names]
        names += [
            n
            for n, default in (("chunk_size", None), ("sample_rate", 1.0))
            if getattr(self, n) != default
        ]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
