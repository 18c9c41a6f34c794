r"""Batch statistics over every class, for :meth:`ClassWeightLoss.prepare_step`.

A margin or scale that depends on the batch may need quantities that run over the
classes: each row's target cosine, or a sum over the non-target logits. In one
process every class is here and the reductions are the identity; in
:class:`~pml_margins.distributed.ShardedMarginSoftmaxLoss` each rank holds some of
the classes and the reductions are all-reduced over its group, so that every rank
sees the statistic of the whole batch against all classes. Quantities of the rows
alone (feature norms) need none of this: the rows given to ``prepare_step`` are the
whole batch on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pml_margins.functional.margin_softmax import compute_dtype

__all__ = ["StepStatistics"]


class StepStatistics:
    """Statistics of one step over all classes; reductions over the classes held elsewhere.

    Args:
        cosine: returns the ``(N, C_here)`` cosines of the ``N`` rows against the
            classes held here (called at most once, lazily, without gradient).
        target: ``(N,)`` column of each row's class among those held here, ``-1``
            where another rank holds it (in one process: the labels).
        target_cosine: optional; given ``(N,)`` columns held here, returns each row's
            cosine with its column, without gradient: :meth:`target_cosines` then costs
            ``O(N D)`` instead of the ``(N, C_here)`` product (unless that is needed anyway).
    """

    def __init__(
        self,
        cosine: Callable[[], torch.Tensor],
        target: torch.Tensor,
        target_cosine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self._cosine_fn = cosine
        self._cosine: torch.Tensor | None = None
        self._target_cosine_fn = target_cosine
        self.target = target.long()

    # --- reductions over the classes: the identity here, all-reduced when sharded -----
    def sum_over_classes(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over the holders of the classes (here: ``value`` itself)."""
        return value

    def max_over_classes(self, value: torch.Tensor) -> torch.Tensor:
        """Maximum of ``value`` over the holders of the classes (here: ``value`` itself)."""
        return value

    # --- derived statistics -------------------------------------------------------
    def class_cosines(self) -> torch.Tensor:
        """``(N, C_here)`` cosines against the classes held here, detached, at least float32."""
        if self._cosine is None:
            with torch.no_grad():
                cosine = self._cosine_fn().detach()
                self._cosine = cosine.to(compute_dtype(cosine.dtype))
        return self._cosine

    def target_cosines(self) -> torch.Tensor:
        """``(N,)`` cosine of every row with its target class, wherever that class is held."""
        owned, columns = self.target >= 0, self.target.clamp(min=0)
        if self._cosine is None and self._target_cosine_fn is not None:
            with torch.no_grad():
                mine = self._target_cosine_fn(columns).detach()
        else:
            mine = self.class_cosines().gather(1, columns.unsqueeze(1)).squeeze(1)
        return self.sum_over_classes(torch.where(owned, mine, torch.zeros_like(mine)))

    def logsumexp_over_classes(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log\sum e^{v}` of a partial log-sum-exp ``value`` over the holders."""
        top = self.max_over_classes(value)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        return top + torch.log(self.sum_over_classes(torch.exp(value - top)))

    def non_target_logsumexp(self, scale: float | torch.Tensor) -> torch.Tensor:
        r""":math:`\log\sum_i\sum_{k\ne y_i} e^{s\cos\theta_{ik}}`, all rows and classes (0-dim)."""
        cosine = self.class_cosines()
        logits = cosine * scale
        owned = torch.nonzero(self.target >= 0).squeeze(1)
        logits[owned, self.target[owned]] = -math.inf  # the targets held here
        return self.logsumexp_over_classes(torch.logsumexp(logits.flatten(), 0))
