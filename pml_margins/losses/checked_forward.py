"""The one validating ``forward`` of every pml_margins loss."""

from __future__ import annotations

import torch

__all__ = ["CheckedForwardMixin"]


class CheckedForwardMixin:
    """Runs the loss's :meth:`check_inputs`, then PML's ``forward``.

    Put it before PML's ``BaseMetricLossFunction`` in the bases; the loss defines
    :meth:`check_inputs`, which raises ``TypeError``/``ValueError`` naming the bad
    argument (and reads the values back at most once, see
    :class:`pml_margins.validation.ValueChecks`).
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
        return super().forward(  # type: ignore[misc]
            embeddings, labels, indices_tuple, ref_emb, ref_labels
        )
