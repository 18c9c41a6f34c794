"""The one validating ``forward`` of every pml_margins loss."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer
from pytorch_metric_learning.utils import common_functions as c_f
from torch.nn.utils import parametrize

from pml_margins.function_transforms import in_function_transform, is_batched, is_compiling
from pml_margins.functional.saved_inputs import outside_inference
from pml_margins.losses.pml_calls import runs_as_its_class
from pml_margins.validation import check_finite_flags, finite_flag

__all__ = ["CheckedForwardMixin", "check_rows_and_reduced"]


def mean_of_positive(losses: torch.Tensor) -> torch.Tensor:
    """PML's ``AvgNonZeroReducer`` of element losses in fixed shapes: the mean of those
    above 0, or 0 (with zero gradients) when there is none. PML's selects them with a
    boolean mask, which ``torch.func.vmap`` cannot batch."""
    kept = losses > 0
    return torch.where(kept, losses, 0.0).sum() / kept.sum().clamp_min(1)


def _explain_under_vmap(loss: object, embeddings: torch.Tensor, error: RuntimeError) -> None:
    """Raise a ``RuntimeError`` naming the cause, from ``error``, where PML's reducer or
    regularizer call failed under ``torch.func.vmap`` (vmap's own message names neither:
    "vmap: We do not support batching operators that can support dynamic shape", or
    "inplace arithmetic"): a ``ThresholdReducer`` selects rows by value, a regularizer's
    reducer writes into an unbatched tensor. Other errors are left as they are."""
    if not (is_batched(embeddings) and str(error).startswith("vmap:")):
        return
    reducer = type(getattr(loss, "reducer", None)).__name__
    regularizer = getattr(loss, "embedding_regularizer", None)
    raise RuntimeError(
        f"{type(loss).__name__} under torch.func.vmap: PML's reducer ({reducer})"
        + (f" and embedding_regularizer ({type(regularizer).__name__})" if regularizer else "")
        + " cannot be batched by vmap (a reduction that selects rows by value, or a term "
        "written in place); use MeanReducer / the default reducer inside the vmapped "
        "function and add a regularizer's term outside it"
    ) from error


def in_loss_dtype(embeddings: torch.Tensor, loss_dict: dict) -> torch.Tensor:
    """``embeddings`` (their graph kept) in the dtype of the loss: theirs promoted with
    that of every floating ``losses`` tensor of ``loss_dict`` (float32 for half embeddings,
    float64 where ``W`` is). What PML's reducers and embedding regularizers take as
    ``embeddings`` for the dtype of their sums and of a zero loss: PML's
    ``MultipleReducers`` (any regularizer) gathered the sub-losses in the embeddings'
    dtype, a float32 loss of bf16 embeddings became bf16 (61.0 for 61.03), an fp16 one
    ``inf``."""
    dtype = embeddings.dtype
    for info in loss_dict.values():
        losses = info.get("losses") if isinstance(info, dict) else None
        if isinstance(losses, torch.Tensor) and losses.is_floating_point():
            dtype = torch.promote_types(dtype, losses.dtype)
    return embeddings.to(dtype)


def follow_device(loss: torch.nn.Module, device: torch.device) -> None:
    """Move ``loss``'s parameters and buffers (their storage dtypes kept) to ``device``,
    the embeddings', where one of them is elsewhere: PML's losses move ``W`` to the
    embeddings on every call (``cast_types``), and PML's trainers put the data on the GPU
    without moving the losses. The parameters stay the same objects (an optimizer built
    before keeps them; its state, created at the first step, then lives on ``device``);
    buffers are new tensors there, as after ``Module.to``. Moved outside inference mode
    (a first call under it would otherwise leave ``W`` an inference tensor that no later
    training step can save for backward).
    Only the loss's own tensors (and a parametrization's) are looked at, a microsecond;
    nothing moves on or to the meta device (its readers raise) nor under ``torch.func``
    or ``torch.compile`` (the tensors are theirs)."""
    tensors = [*loss._parameters.values(), *loss._buffers.values()]
    if "parametrizations" in loss._modules:
        tensors += loss._modules["parametrizations"].parameters()  # type: ignore[union-attr]
    if all(t is None or t.device == device for t in tensors):
        return
    if (
        device.type == "meta"
        or any(t is not None and t.is_meta for t in tensors)
        or is_compiling()
        or in_function_transform()
    ):
        return
    with torch.inference_mode(False):
        loss.to(device)


def _int64(values: torch.Tensor | None) -> torch.Tensor | None:
    """Checked integer (or bool) labels or indices as int64 (the same tensor when they
    are); floating labels, which only a pair-based loss takes (compared for equality), as
    given: truncated, 0.25 and 0.5 would become one class. An inference tensor is copied
    (PML's losses index with them, and autograd saves an index)."""
    if values is None or values.is_floating_point():
        return values
    return outside_inference(values if values.dtype == torch.int64 else values.long())


def check_rows_and_reduced(
    rows: bool | torch.Tensor | None,
    loss: torch.Tensor,
    rows_error: Callable[[], Exception],
    reduced_error: Callable[[], Exception],
) -> None:
    """Raise ``rows_error()`` where the ``rows`` flag held by
    :meth:`CheckedForwardMixin._hold_rows_for_check` (``None``: none held, the reduced
    ``loss`` stands for the rows) is false, else ``reduced_error()`` where the reduced
    ``loss`` is not finite: both read back at once. A reducer that returns the rows or
    drops NaN ones is covered by the rows, a mean or sum that overflows (or a
    regularizer's term) by the reduced loss."""
    if rows is None:
        check_finite_flags((finite_flag(loss),), (rows_error,))
    else:
        check_finite_flags((rows, finite_flag(loss)), (rows_error, reduced_error))


class CheckedForwardMixin:
    """Runs the loss's :meth:`check_inputs`, then PML's ``forward``.

    Put it before PML's ``BaseMetricLossFunction`` in the bases; the loss defines
    :meth:`check_inputs`, which raises ``TypeError``/``ValueError`` naming the bad
    argument (and reads the values back at most once, see
    :class:`pml_margins.validation.ValueChecks`).

    With PML's default reduction and nothing that PML's plumbing would add (the
    reducer exactly a ``MeanReducer`` collecting no statistics, with no hook or method
    replaced on it, no regularizers, one loss of per-element values), the mean is taken
    here: what PML's ``forward`` returns then, ``torch.mean`` of the losses, without its
    reducer's bookkeeping (about 50 us a step, a tenth of a small problem's step on
    CPU), from :meth:`_element_losses` where the loss defines it (no loss dict, no index tensor).
    Inside a ``torch.func`` transform an ``AvgNonZeroReducer`` (Circle's default; its own bounds,
    ``low=0`` and no ``high``) is applied here too, in fixed shapes
    (:func:`mean_of_positive`), so that ``vmap`` can batch it.

    A parametrized loss (``torch.nn.utils.parametrize`` on ``W``, say) is evaluated inside
    ``parametrize.cached()``: one value of each parametrized tensor per call, however many
    times the loss reads it (a random one, DropConnect's, would otherwise differ per read).
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
        """The reduced loss (PML's ``forward``) after :meth:`check_inputs`, then
        :meth:`check_result` of it."""
        self.__dict__.pop("_rows_finite", None)  # (a step that failed: see check_result)
        parametrized = "parametrizations" in self._modules  # type: ignore[attr-defined]
        if isinstance(embeddings, torch.Tensor):
            follow_device(self, embeddings.device)  # type: ignore[arg-type]
        keep = getattr(self, "statistics_kept", None)  # (FloatStatisticsMixin's)
        saved = keep() if keep is not None else {}
        try:
            with parametrize.cached() if parametrized else nullcontext():  # (class docstring)
                loss = self._checked_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            self.check_result(loss)
        except BaseException:  # a step that fails moves no running statistic
            if saved:
                self.restore_statistics(saved)  # type: ignore[attr-defined]
            raise
        return loss

    def check_result(self, loss: torch.Tensor) -> None:
        """Raise ``ValueError`` for a reduced loss that checked input cannot explain
        (default: none)."""

    def _hold_rows_for_check(self, losses: torch.Tensor) -> None:
        """Keep whether the step's element ``losses`` (before any reducer or miner weight)
        are finite, for :meth:`check_result` (:func:`check_rows_and_reduced`; a ``bool`` on
        CPU, else a 0-dim tensor: no graph, nothing read back yet)."""
        self.__dict__["_rows_finite"] = finite_flag(losses)

    def _checked_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """:meth:`forward`'s loss: :meth:`_direct_loss` where it applies, else
        :meth:`check_inputs`, then PML's ``forward`` or its plain reduction."""
        direct = self._direct_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if direct is not None:
            return direct
        self.check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        # autograd records this route's ops, and refuses to save an inference tensor (the
        # batch as its own reference set stays one tensor: a pair loss reads ``is``)
        same_emb = ref_emb is embeddings
        embeddings = outside_inference(embeddings)
        ref_emb = embeddings if same_emb else outside_inference(ref_emb)
        # int64 from here on: PML's reducers and miner-weight helpers index with them, and
        # read uint8 as a mask and refuse int8/int16 (the checks accept any integer dtype)
        same = ref_labels is labels
        labels = _int64(labels)
        ref_labels = labels if same else _int64(ref_labels)
        if indices_tuple is not None:
            indices_tuple = tuple(_int64(idx) for idx in indices_tuple)
        reduce = self._plain_reduction()
        self.reset_stats()  # type: ignore[attr-defined]
        if labels is not None:
            labels = c_f.to_device(labels, embeddings)
        ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
        losses = None if reduce is None else self._element_losses(embeddings, labels, indices_tuple)
        if losses is None:
            loss_dict = self.compute_loss(  # type: ignore[attr-defined]
                embeddings, labels, indices_tuple, ref_emb, ref_labels
            )
            info = next(iter(loss_dict.values())) if len(loss_dict) == 1 else {}
            losses = info.get("losses")
            if (
                reduce is None
                or info.get("reduction_type") != "element"
                or not torch.is_tensor(losses)
            ):  # PML's forward from here, given the embeddings in the loss's dtype
                wide = in_loss_dtype(embeddings, loss_dict)
                try:
                    self.add_embedding_regularization_to_loss_dict(loss_dict, wide)  # type: ignore[attr-defined]
                    return self.reducer(loss_dict, wide, labels)  # type: ignore[attr-defined]
                except RuntimeError as error:
                    _explain_under_vmap(self, embeddings, error)
                    raise
        return reduce(losses)

    def _direct_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The reduced loss straight from the loss's core function, where the call is the
        common one whose checks and plumbing the loss can settle in a few host steps (it
        then gives what the rest of ``forward`` would, checks included); else ``None``
        (default), and ``forward`` goes on."""
        return None

    def _element_losses(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
    ) -> torch.Tensor | None:
        """The element losses of :meth:`compute_loss`'s one entry, computed without its loss
        dict (which only PML's reducer reads), where the loss has such a method and its
        ``compute_loss`` only wraps it (no regularizer term: see :meth:`_plain_reduction`);
        else ``None`` (default), and ``forward`` calls ``compute_loss``."""
        return None

    def _plain_reduction(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What PML's ``forward`` would return from the element losses, when it is one
        function of them (see the class docstring); else ``None``."""
        reducer = self.reducer  # type: ignore[attr-defined]
        if type(reducer) is MeanReducer:
            reduce = torch.mean
        elif (
            type(reducer) is AvgNonZeroReducer
            and reducer.low == 0
            and reducer.high is None
            and in_function_transform()
        ):
            reduce = mean_of_positive
        else:  # (any other reducer, a duck-typed module too: PML's call of it)
            return None
        if (
            reducer.collect_stats
            or getattr(self, "embedding_regularizer", None) is not None
            or getattr(self, "weight_regularizer", None) is not None
            or not runs_as_its_class(reducer)  # a hook on it: PML's call fires it
        ):
            return None
        return reduce
