"""The one validating ``forward`` of every pml_margins loss."""

from __future__ import annotations

import torch
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import common_functions as c_f

__all__ = ["CheckedForwardMixin"]


def _int64(values: torch.Tensor | None) -> torch.Tensor | None:
    """Checked integer labels or indices as int64 (the same tensor when they are)."""
    return values if values is None or values.dtype == torch.int64 else values.long()


class CheckedForwardMixin:
    """Runs the loss's :meth:`check_inputs`, then PML's ``forward``.

    Put it before PML's ``BaseMetricLossFunction`` in the bases; the loss defines
    :meth:`check_inputs`, which raises ``TypeError``/``ValueError`` naming the bad
    argument (and reads the values back at most once, see
    :class:`pml_margins.validation.ValueChecks`).

    With PML's default reduction and nothing that PML's plumbing would add (the
    reducer exactly a ``MeanReducer`` collecting no statistics, no regularizers, one
    loss of per-element values), the mean is taken here: what PML's ``forward``
    returns then, ``torch.mean`` of the losses, without its reducer's bookkeeping
    (about 50 us a step, a tenth of a small problem's step on CPU).
    """

    def check_inputs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> None:
        """Raise ``TypeError``/``ValueError`` for input this loss cannot take."""
        raise NotImplementedError

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reduced loss (PML's ``forward``) after :meth:`check_inputs`."""
        self.check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        # int64 from here on: PML's reducers and miner-weight helpers index with them, and
        # read uint8 as a mask and refuse int8/int16 (the checks accept any integer dtype)
        same = ref_labels is labels
        labels = _int64(labels)
        ref_labels = labels if same else _int64(ref_labels)
        if indices_tuple is not None:
            indices_tuple = tuple(_int64(idx) for idx in indices_tuple)
        if not self._reduces_to_plain_mean():
            return super().forward(  # type: ignore[misc]
                embeddings, labels, indices_tuple, ref_emb, ref_labels
            )
        self.reset_stats()  # type: ignore[attr-defined]
        if labels is not None:
            labels = c_f.to_device(labels, embeddings)
        ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
        loss_dict = self.compute_loss(  # type: ignore[attr-defined]
            embeddings, labels, indices_tuple, ref_emb, ref_labels
        )
        info = next(iter(loss_dict.values())) if len(loss_dict) == 1 else {}
        losses = info.get("losses")
        if info.get("reduction_type") != "element" or not torch.is_tensor(losses):
            return self.reducer(loss_dict, embeddings, labels)  # type: ignore[attr-defined]
        return torch.mean(losses)

    def _reduces_to_plain_mean(self) -> bool:
        """Whether PML's ``forward`` would return ``torch.mean`` of the element losses."""
        reducer = self.reducer  # type: ignore[attr-defined]
        return (
            type(reducer) is MeanReducer
            and not reducer.collect_stats
            and getattr(self, "embedding_regularizer", None) is None
            and getattr(self, "weight_regularizer", None) is None
        )
