r"""Center loss: pull each embedding towards a learned center of its class."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_margins.function_transforms import is_compiling
from pml_margins.functional.autograd_switch import refuse_update_in_function_transform
from pml_margins.functional.center import center_distances, center_ema_update
from pml_margins.losses.atomic_load import AtomicLoadMixin
from pml_margins.losses.checked_forward import CheckedForwardMixin, check_rows_and_reduced
from pml_margins.losses.float_statistics import FloatStatisticsMixin
from pml_margins.losses.hyperparameter import (
    FixedAtConstruction,
    Hyperparameter,
    HyperparameterAttributes,
)
from pml_margins.losses.pml_calls import record_distance_stats
from pml_margins.validation import (
    CHECKED_BY_CALLER,
    check_choice,
    check_class_loss_input,
    check_count,
    check_finite_flags,
    check_not_meta,
    check_unit_interval,
    finite_flag,
)

__all__ = ["CenterLoss"]


class CenterLoss(
    HyperparameterAttributes,
    AtomicLoadMixin,
    FloatStatisticsMixin,
    CheckedForwardMixin,
    BaseMetricLossFunction,
):
    r"""Center loss (Wen, Zhang, Li, Qiao, ECCV 2016, "A Discriminative Feature Learning
    Approach for Deep Face Recognition").

    .. math::
        L_C = \frac12 \sum_{i=1}^{B} \lVert x_i - c_{y_i} \rVert_2^2

    The per-sample terms :math:`\tfrac12\lVert x_i - c_{y_i}\rVert^2` go to PML's
    reducer (``reduction_type="element"``); the default ``MeanReducer`` therefore
    gives :math:`L_C / B`. The paper's :math:`L_C` is a **sum**: pass
    ``reducer=pytorch_metric_learning.reducers.SumReducer()`` to get it exactly.
    Units: squared embedding norm (the embeddings are not normalized). A step whose
    squared distances (or their reduction) overflow the compute dtype from finite input
    is refused with a ``ValueError`` (:meth:`check_result`) before any centre moves.

    Center update (``centers`` has shape ``(num_classes, embedding_size)``):

    * ``update="ema"`` (the paper's rule, default): ``centers`` is a buffer. After
      each forward in training mode, with the batch's statistics,
      :math:`\Delta c_j = \sum_{i: y_i = j}(c_j - x_i) / (1 + n_j)`,
      :math:`c_j \leftarrow c_j - \alpha\Delta c_j` -- only classes present move,
      no optimizer and no autograd is involved, and the loss value uses the
      centers as they were before the update. All the batch's samples enter the
      update, whatever a miner selected for the loss. ``alpha`` is the paper's
      :math:`\alpha` (centers' learning rate, in (0, 1]; the paper finds 0.1-1.0
      work and uses 0.5). The buffer stays float32 when the loss is cast to
      float16/bfloat16 (``.half()``, ``.to(torch.bfloat16)``), where the update would
      round away.
    * ``update="sgd"``: ``centers`` is an ``nn.Parameter`` learned by the
      optimizer that holds ``loss.parameters()`` (``alpha`` is then unused). Its
      gradient is :math:`\lambda/B\sum_{i:y_i=j}(c_j - x_i)` with the default
      ``MeanReducer`` and weight :math:`\lambda`, so to approximate the paper's
      step give the centers their own parameter group with
      ``lr`` :math:`\approx \alpha B / (\lambda (1 + n_j))`.

    Nothing changes in eval mode (``loss.eval()``; ``MultipleLosses`` passes its
    mode on). Joint supervision, the paper's :math:`L = L_S + \lambda L_C`
    (:math:`\lambda = 0.003`-:math:`0.1`, 0.003 for faces), is PML's own
    combiner::

        from pytorch_metric_learning.losses import MultipleLosses
        from pml_margins.losses import CenterLoss, SoftmaxLoss

        loss_fn = MultipleLosses(
            [SoftmaxLoss(num_classes, dim), CenterLoss(num_classes, dim)],
            weights=[1.0, lam],
        )

    Miner ``indices_tuple`` become per-sample weights (PML's
    ``convert_to_weights``), and ``reducer`` / ``embedding_regularizer`` apply as
    for any PML loss. ``ref_emb`` is not supported: the reference is the centers. The
    distance is the definition's, the squared Euclidean distance between the raw
    embeddings and centers (``distance`` may be given only as
    ``LpDistance(p=2, power=2, normalize_embeddings=False)``, the default).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        alpha: centers' learning rate for ``update="ema"``, in (0, 1].
        update: ``"ema"`` (paper) or ``"sgd"``.
        **kwargs: PML options (``reducer``, ``embedding_regularizer``).

    Raises:
        TypeError: a ``distance`` other than the definition's (see above).
    """

    alpha = Hyperparameter(check_unit_interval)
    # the centres are a buffer (ema) or a parameter (sgd): fixed once they exist
    update = FixedAtConstruction(partial(check_choice, choices=("ema", "sgd")))
    statistic_buffers = ("centers",)  # update="ema": a moving average (float32)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        alpha: float = 0.5,
        update: str = "ema",
        **kwargs: Any,
    ) -> None:
        self.alpha = alpha
        self.update = update
        super().__init__(**kwargs)
        _check_center_distance(self.distance)
        self.num_classes = check_count(num_classes, "num_classes")
        self.embedding_size = check_count(embedding_size, "embedding_size")
        centers = torch.zeros(num_classes, embedding_size)
        if self.update == "sgd":
            self.centers = torch.nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "embedding_size", "alpha"], is_stat=False
        )

    def initial_statistics(self) -> dict[str, float]:
        """The centres start at 0 (``update="ema"``: a running statistic)."""
        return {"centers": 0.0}

    def statistics_kept(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        """None: the centres move after the checked loss (:meth:`forward`), so a step that
        fails has not moved them, and no ``(C, D)`` copy is taken per step."""
        return {}

    def reset_parameters(self) -> None:
        """The centres back to 0, as constructed (a parameter or a running statistic)."""
        with torch.no_grad():
            self.centers.zero_()

    def get_default_distance(self) -> LpDistance:
        """The definition's distance: squared Euclidean, raw embeddings and centers."""
        return LpDistance(p=2, power=2, normalize_embeddings=False)

    def check_inputs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> None:
        """Embeddings of width ``embedding_size``, labels in ``[0, C)``, no ``ref_emb``; the
        definition's distance (checked again: one changed in place or replaced after
        construction would be ignored, as the loss computes the distance itself)."""
        _check_center_distance(self.distance)
        centers, expected = self.centers, (self.num_classes, self.embedding_size)
        if not isinstance(centers, torch.Tensor) or tuple(centers.shape) != expected:
            shown = tuple(centers.shape) if isinstance(centers, torch.Tensor) else centers
            raise ValueError(  # (update="sgd" centres replaced: an index or size error)
                f"CenterLoss's centers have shape {shown}, but num_classes={expected[0]} "
                f"and embedding_size={expected[1]} need {expected} (one row per class)"
            )
        check_not_meta(centers, "CenterLoss's centers")
        check_class_loss_input(
            "CenterLoss",
            "its centers",
            self.num_classes,
            self.embedding_size,
            embeddings,
            labels,
            indices_tuple,
            ref_emb,
            ref_labels,
            norms_taken=False,  # (no norm is taken: the distances' own check, check_result)
        )

    def check_result(self, loss: torch.Tensor) -> None:
        """Refuse the step's rows' losses, then the reduced ``loss``, that came out NaN/Inf
        from checked, finite embeddings: a squared distance (or their mean or sum) beyond
        the compute dtype, or centres that hold NaN/Inf (the message says which). One
        read-back of both."""
        rows = self.__dict__.pop("_rows_finite", None)
        overflowed = "overflowed" if rows is not None else "(or their mean) overflowed"

        def rows_error() -> ValueError:
            if not self._centers_finite():  # (read on error only)
                return _non_finite_centers("so its losses are not finite")
            return ValueError(
                "CenterLoss gave non-finite losses from finite embeddings and centers: a "
                f"squared distance 0.5 |x - c|^2 {overflowed}; scale the embeddings down"
            )

        def reduced_error() -> ValueError:
            return ValueError(
                "CenterLoss's reduced loss is not finite although its rows' losses are: the "
                "reducer's sum (or a regularizer's term) overflowed; scale the embeddings down"
            )

        check_rows_and_reduced(rows, loss, rows_error, reduced_error)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The checked loss; then, in training mode with ``update="ema"``, the centre update."""
        updates = self.training and self.update == "ema"
        if updates:
            refuse_update_in_function_transform(self, "its centres (update='ema')")
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if updates:
            with CHECKED_BY_CALLER:  # checked by the forward above
                self.update_centers(embeddings, labels)
        return loss

    @torch.no_grad()
    def update_centers(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Apply the paper's update in place (``update="ema"``; called by ``forward``);
        ``ValueError``, the centres unchanged, where it leaves the buffer's range (float64
        embeddings beyond float32's with the float32 buffer, say)."""
        labels = labels.to(self.centers.device)
        new = center_ema_update(
            self.centers, embeddings.to(self.centers.device), labels, self.alpha
        )

        def error() -> ValueError:
            if not self._centers_finite():  # a row the batch does not touch (read on error)
                return _non_finite_centers("so the update is refused (they are unchanged)")
            return ValueError(
                f"CenterLoss's center update left {self.centers.dtype}'s range (the "
                "embeddings' values are beyond what the centers can hold); the centers are "
                "unchanged: scale the embeddings down"
            )

        check_finite_flags((finite_flag(new),), (error,))
        self.centers.copy_(new)

    def _centers_finite(self) -> bool:
        return bool(torch.isfinite(self.centers.detach()).all())

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> dict[str, dict[str, Any]]:
        centers = self.centers.to(embeddings.device)
        record_distance_stats(self.distance, embeddings, centers)  # (no call of it: as PML's)
        labels = labels.to(embeddings.device)
        rows, row_labels = centers, labels
        if self.update == "ema" and is_compiling():  # (see _rows_outside_the_graph)
            rows, row_labels = _rows_outside_the_graph(centers, labels)
        with CHECKED_BY_CALLER:  # checked by forward
            losses = center_distances(embeddings, rows, row_labels)
        self._hold_rows_for_check(losses)
        weights = lmu.convert_to_weights(indices_tuple, labels, dtype=losses.dtype)
        return {
            "loss": {
                "losses": losses * weights,
                "indices": torch.arange(embeddings.shape[0], device=embeddings.device),
                "reduction_type": "element",
            }
        }

    def extra_repr(self) -> str:
        alpha = f", alpha={self.alpha!r}" if self.update == "ema" else ""
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"update={self.update!r}{alpha}"
        )


def _non_finite_centers(consequence: str) -> ValueError:
    """The error for centres that already hold NaN/Inf, and what it stops."""
    return ValueError(
        "CenterLoss's centers hold NaN/Inf (a diverged optimizer step on update='sgd' "
        f"centers, or an edit in place), {consequence}; reset or reload the centers and "
        "lower the learning rate"
    )


@torch.compiler.disable
def _rows_outside_the_graph(
    centers: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's centre rows, gathered eagerly (a new tensor that the centre update does
    not write), and their indices ``0..B-1``. Under ``torch.compile`` (inductor) the
    backward otherwise recomputed ``x - c_y`` from the centre buffer itself, which the
    update then writes in place before ``backward()``: every compiled step failed with
    autograd's "modified by an inplace operation" (found by review)."""
    rows = centers.index_select(0, labels.long())
    return rows, torch.arange(len(labels), device=labels.device)


def _check_center_distance(distance: object) -> None:
    """``TypeError`` unless ``distance`` is the squared Euclidean distance on raw vectors."""
    if (
        type(distance) is LpDistance
        and distance.p == 2
        and distance.power == 2
        and not distance.normalize_embeddings
    ):
        return
    shown = type(distance).__name__
    if isinstance(distance, LpDistance):
        shown += (
            f"(p={distance.p}, power={distance.power}, "
            f"normalize_embeddings={distance.normalize_embeddings})"
        )
    raise TypeError(
        "CenterLoss is the squared Euclidean distance between the raw embeddings and the "
        "centers: distance may only be LpDistance(p=2, power=2, normalize_embeddings=False) "
        f"(the default), got {shown}"
    )
