r"""Sub-center ArcFace: ``K`` sub-centres per class, the class cosine is their maximum."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from pml_margins.functional.fused_margin_softmax import FusedLogits, class_columns
from pml_margins.losses.arcface import ArcFaceLoss
from pml_margins.losses.checked_forward import follow_device
from pml_margins.losses.hyperparameter import FixedAtConstruction
from pml_margins.validation import check_angle_margin, check_count

__all__ = ["SubCenterArcFaceLoss"]


class SubCenterArcFaceLoss(ArcFaceLoss):
    r"""Sub-center ArcFace (Deng et al., ECCV 2020): ArcFace on the nearest of K sub-centres.

    Each class :math:`j` has ``K`` weight vectors :math:`W_{j1},\dots,W_{jK}`; the
    class cosine is the largest of theirs, and ArcFace's margin applies to the target:

    .. math::
        \cos\theta_j = \max_{k} \hat x^\top \hat W_{jk}, \qquad
        L = -\log\frac{e^{s\cos(\theta_{y} + m)}}
                     {e^{s\cos(\theta_{y} + m)} + \sum_{j\ne y} e^{s\cos\theta_j}}

    With ``K = 1`` this is :class:`ArcFaceLoss` (the same ``theta + m > pi`` fallback
    and ``easy_margin``). Noisy samples gather on non-dominant sub-centres; after
    training, :meth:`get_outliers` finds them and the dominant sub-centre of each class.

    ``W`` has PML's layout, ``(D, C*K)``, sub-centre ``k`` of class ``j`` in column
    ``j*K + k``, so state dicts load both ways with PML's ``SubCenterArcFaceLoss``; where
    several sub-centres tie for the maximum the gradient goes to the first, as in PML.

    **Units: ``margin`` is in radians** (PML: degrees, default 28.6 = 0.5 rad).
    Recommended (paper, faces): ``m = 0.5`` rad, ``s = 64``, ``K = 3``; for CUB/SOP
    retrieval ``m`` 0.2-0.5 rad and ``s`` 16-32, as for ArcFace.

    It changes the base logits (a maximum over columns) and declares them to the fused
    core (:meth:`fused_logits`, ``sub_centers=K``), which runs blocks of whole classes:
    default mode saves one ``(B, C)`` buffer of class values plus the ``(B, C)`` winning
    sub-centres as bytes; ``chunk_size`` never holds ``(B, C)`` or ``(B, C*K)``;
    ``sample_rate`` (Partial FC) keeps or drops whole classes. Sharded, each rank holds
    whole classes (all ``K`` columns of each).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        margin: ``m`` in radians, ``0 <= m < pi``.
        scale: ``s > 0``.
        sub_centers: ``K >= 1`` sub-centres per class.
        easy_margin: apply the margin only for :math:`\theta_y < \pi/2`.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``).
    """

    hyperparameter_names = ("margin", "scale", "sub_centers", "easy_margin")
    sub_centers = FixedAtConstruction(check_count)  # W has C K columns

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.5,
        scale: float = 64.0,
        sub_centers: int = 3,
        easy_margin: bool = False,
        **kwargs: Any,
    ) -> None:
        num_classes = check_count(num_classes, "num_classes")
        self.sub_centers = sub_centers
        columns = num_classes * self.sub_centers
        super().__init__(columns, embedding_size, margin, scale, easy_margin, **kwargs)
        self.num_classes = num_classes

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` class cosines: the maximum over each class's ``K`` sub-centres."""
        per_column = super().cosine(embeddings)
        return per_column.unflatten(1, (-1, self.sub_centers)).max(dim=2).values

    def fused_logits(self, embeddings: torch.Tensor) -> FusedLogits | None:
        """ArcFace's declaration with ``sub_centers=K``: the same logits as :meth:`cosine`."""
        form = super().fused_logits(embeddings)
        return None if form is None else dataclasses.replace(form, sub_centers=self.sub_centers)

    def target_cosines(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` cosines to each row's own class (its nearest sub-centre), no gradient."""
        k = self.sub_centers
        columns = class_columns(labels.long(), k)
        per_column = super().target_cosines(embeddings.repeat_interleave(k, 0), columns)
        return per_column.view(-1, k).amax(1)

    def get_outliers(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        threshold: float = math.radians(75),
        return_dominant_centers: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        r"""Samples far from their class's dominant sub-centre, and those sub-centres.

        For each class, every sample votes for its nearest sub-centre; the one with
        most votes (the lowest index on a tie) is dominant. A sample is an outlier
        when its angle to its class's dominant sub-centre exceeds ``threshold``.
        PML's ``get_outliers`` with the threshold in radians (PML: degrees, 75).

        Args:
            embeddings: ``(B, D)``.
            labels: ``(B,)`` classes in ``[0, C)``.
            threshold: angle in radians, ``[0, pi]`` (``pi``: no outlier); default 75
                degrees.
            return_dominant_centers: also return the dominant sub-centres.

        Returns:
            The outliers' indices, grouped by class (ascending), ascending within a
            class (PML's order); with ``return_dominant_centers`` also the ``(D, C)``
            dominant sub-centres (columns of ``W``), NaN for classes without a sample
            in ``embeddings``, in the embeddings' dtype as in PML (so that they multiply
            them; ``W`` keeps its own). (PML always returns the pair.)
        """
        threshold = check_angle_margin(threshold, "threshold", pi_allowed=True)
        self.check_inputs(embeddings, labels, None, None, None)
        follow_device(self, embeddings.device)  # as PML's
        labels = labels.long()
        k = self.sub_centers
        with torch.no_grad():
            per_column = super().cosine(embeddings).unflatten(1, (-1, k))  # (B, C, K)
            own = per_column[torch.arange(len(labels), device=labels.device), labels]  # (B, K)
            votes = torch.zeros(self.num_classes * k, device=labels.device, dtype=torch.long)
            votes.index_add_(0, labels * k + own.argmax(dim=1), torch.ones_like(labels))
            dominant = votes.view(self.num_classes, k).argmax(dim=1)  # (C,)
            to_dominant = own.gather(1, dominant[labels].unsqueeze(1)).squeeze(1)
            outlier = to_dominant < math.cos(threshold)
            order = torch.sort(labels, stable=True).indices
            outliers = order[outlier[order]]
            if not return_dominant_centers:
                return outliers
            columns = torch.arange(self.num_classes, device=labels.device) * k + dominant
            centres = self.W.detach()[:, columns].to(embeddings.dtype, copy=True)
            centres[:, votes.view(self.num_classes, k).sum(1) == 0] = math.nan
        return outliers, centres
