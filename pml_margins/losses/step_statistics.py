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
from collections.abc import Callable, Iterator

import torch

from pml_margins.functional.margin_softmax import compute_dtype, exp_in_place

__all__ = ["StepStatistics"]


class StepStatistics:
    """Statistics of one step over all classes; reductions over the classes held elsewhere.

    Args:
        cosine: returns the ``(N, C_here)`` cosines of the ``N`` rows against the
            classes held here (called at most once, lazily, without gradient).
        target: ``(N,)`` column of each row's class among those held here, ``-1``
            where another rank holds it (:attr:`targets_elsewhere`; in one process: the
            labels, each in ``[0, C)``: one outside raises the index error of an
            indexing op, as the loss's own gather of ``W`` would with the checks off).
        target_cosine: optional; given ``(N,)`` columns held here, returns each row's
            cosine with its column, without gradient: :meth:`target_cosines` then costs
            ``O(N D)`` instead of the ``(N, C_here)`` product (unless that is needed anyway).
        from_core: whether the step's fused core may hand over the cosines it forms
            (:meth:`set_class_cosines`) before it needs a scale decided from them: one
            process, default mode (``ClassWeightLoss.compute_loss`` says so).
        cosine_blocks: optional; returns the cosines as an iterator of column blocks, in
            order, each formed when needed (bounded mode): the sums over the classes
            (:meth:`non_target_logsumexp`) then hold one block at a time, never the
            ``(N, C_here)`` matrix (only :meth:`class_cosines` forms it).

    Attributes:
        from_core: as given.
    """

    #: whether a target of ``-1`` means a class held by another rank (a shard's statistics)
    targets_elsewhere = False

    def __init__(
        self,
        cosine: Callable[[], torch.Tensor],
        target: torch.Tensor,
        target_cosine: Callable[[torch.Tensor], torch.Tensor] | None = None,
        from_core: bool = False,
        cosine_blocks: Callable[[], Iterator[torch.Tensor]] | None = None,
    ) -> None:
        self._cosine_fn = cosine
        self._cosine_blocks_fn = cosine_blocks
        self._blocks: list[torch.Tensor] | None = None  # column blocks of the cosines, in order
        self._target_cosine_fn = target_cosine
        self.target = target.long()
        self.from_core = from_core
        self._target_cosines: torch.Tensor | None = None

    # --- reductions over the classes: the identity here, all-reduced when sharded -----
    def sum_over_classes(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over the holders of the classes (here: ``value`` itself)."""
        return value

    def max_over_classes(self, value: torch.Tensor) -> torch.Tensor:
        """Maximum of ``value`` over the holders of the classes (here: ``value`` itself)."""
        return value

    # --- derived statistics -------------------------------------------------------
    def set_class_cosines(self, blocks: list[torch.Tensor]) -> None:
        """Take the ``(N, C_here)`` cosines formed elsewhere (the fused core's), no product here.

        Args:
            blocks: the cosines as column blocks, in order (``torch.cat(blocks, 1)`` is the
                matrix), without graph, at least float32; read only until the step's
                core goes on (it reuses their memory), so derive what is needed at once.
        """
        self._blocks = list(blocks)

    def class_cosines(self) -> torch.Tensor:
        """``(N, C_here)`` cosines against the classes held here, detached, at least float32."""
        blocks = self._cosine_blocks()
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)

    def _streamed_blocks(self) -> Iterator[torch.Tensor]:
        """The cosines' column blocks, in order: those formed (or handed over) for the
        step, else one at a time from ``cosine_blocks`` when given, else
        :meth:`_cosine_blocks`."""
        if self._blocks is not None or self._cosine_blocks_fn is None:
            yield from self._cosine_blocks()
            return
        blocks = self._cosine_blocks_fn()
        while True:
            with torch.no_grad():  # (each block under it, not the caller between them)
                block = next(blocks, None)
            if block is None:
                return
            block = block.detach()
            yield block.to(compute_dtype(block.dtype))

    def _cosine_blocks(self) -> list[torch.Tensor]:
        if self._blocks is None:
            with torch.no_grad():
                cosine = self._cosine_fn().detach()
                self._blocks = [cosine.to(compute_dtype(cosine.dtype))]
        return self._blocks

    def target_cosines(self) -> torch.Tensor:
        """``(N,)`` cosine of every row with its target class, wherever that class is held."""
        columns = self.target.clamp(min=0) if self.targets_elsewhere else self.target
        if self._blocks is None and self._target_cosine_fn is not None:
            with torch.no_grad():
                mine = self._target_cosine_fn(columns).detach()
        else:
            mine = self._gather(columns)
        if self.targets_elsewhere:
            mine = torch.where(self.target >= 0, mine, torch.zeros_like(mine))
        self._target_cosines = self.sum_over_classes(mine)
        return self._target_cosines

    def formed_target_cosines(self) -> torch.Tensor | None:
        """What :meth:`target_cosines` last returned in this step, else ``None`` (the loss
        then need not gather ``W``'s target columns a second time)."""
        return self._target_cosines

    def _gather(self, columns: torch.Tensor) -> torch.Tensor:
        """Each row's cosine in its column (over the blocks; each column must be one of
        theirs unless :attr:`targets_elsewhere`: an index op over their width checks it)."""
        blocks = self._cosine_blocks()
        if not self.targets_elsewhere:  # (out of range: IndexError on CPU, as a gather's)
            width = sum(block.shape[1] for block in blocks)
            torch.empty(width, dtype=torch.uint8, device=columns.device).index_select(0, columns)
        mine, start = None, 0
        for block in blocks:
            local, inside = _in_block(columns, start, block.shape[1])
            value = block.gather(1, local).squeeze(1)
            mine = value if mine is None else torch.where(inside.squeeze(1), value, mine)
            start += block.shape[1]
        assert mine is not None
        return mine

    def logsumexp_over_classes(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log\sum e^{v}` of a partial log-sum-exp ``value`` over the holders."""
        top = self.max_over_classes(value)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        return top + torch.log(self.sum_over_classes(torch.exp(value - top)))

    def non_target_logsumexp(self, scale: float | torch.Tensor) -> torch.Tensor:
        r""":math:`\log\sum_i\sum_{k\ne y_i} e^{s\cos\theta_{ik}}`, all rows and classes (0-dim)."""
        parts, start = [], 0
        for block in self._streamed_blocks():
            logits = block * scale
            width = block.shape[1]
            # the targets held here to -inf, by a scatter (no nonzero: a host sync on a GPU)
            columns, inside = _in_block(self.target, start, width)
            kept = logits.gather(1, columns)
            logits.scatter_(1, columns, torch.where(inside, -math.inf, kept))
            parts.append(_logsumexp_all(logits))
            start += width
        mine = parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), 0)
        return self.logsumexp_over_classes(mine)


def _in_block(columns: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 1)`` each column's index within the block ``[start, start + width)``, clamped
    into it (a gather/scatter index for every row), and ``(N, 1)`` whether it lies there."""
    local = columns - start
    inside = (local >= 0) & (local < width)
    return local.clamp(0, width - 1).unsqueeze(1), inside.unsqueeze(1)


def _logsumexp_all(values: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(values.flatten(), 0)``, in place over ``values``.

    The same max-shifted sum, with the shift and ``exp`` in place: ``logsumexp`` forms
    ``values - max`` as a new block-sized tensor, whose allocation dominates on CPU (a
    256 x 2048 block on its own: 1.55 ms against 0.32 ms; a 10k-class dynamic AdaCos
    step: ~2 ms less in an A/B).
    """
    top = values.max()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all -inf: -inf
    return top + exp_in_place(values.sub_(top)).sum().log()
