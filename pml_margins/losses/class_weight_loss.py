"""The PML plumbing shared by every loss with class weights ``W`` of shape ``(D, C)``.

Subclasses say how base logits are formed and which target-logit function applies.
Whether a loss runs on the fused core
(:func:`pml_margins.functional.fused_margin_softmax_cross_entropy`, no ``(B, C)``
temporaries beyond one buffer, bounded memory and Partial FC) is declared, never
guessed: by :meth:`ClassWeightLoss.fused_logits`. See the class docstring for how to
add a margin.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.reducers import BaseReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_margins.functional.autograd_switch import autograd_only_enabled, plain_autograd_needed
from pml_margins.functional.dense_margin_softmax import dense_margin_softmax_cross_entropy
from pml_margins.functional.fused_margin_softmax import (
    FusedLogits,
    auto_chunk_size,
    dense_materializes,
    fused_margin_softmax_cross_entropy,
)
from pml_margins.functional.margin_softmax import (
    TargetLogitFn,
    autocast_off,
    check_scale,
    compute_dtype,
    margin_softmax_cross_entropy,
    row_norms,
)
from pml_margins.functional.saved_inputs import outside_inference
from pml_margins.losses.atomic_load import AtomicLoadMixin
from pml_margins.losses.checked_forward import (
    CheckedForwardMixin,
    check_rows_and_reduced,
    follow_device,
)
from pml_margins.losses.float_statistics import FloatStatisticsMixin
from pml_margins.losses.hyperparameter import Hyperparameter, HyperparameterAttributes
from pml_margins.losses.pml_calls import record_distance_stats, runs_as_its_class
from pml_margins.losses.step_statistics import StepStatistics
from pml_margins.validation import (
    CHECKED_BY_CALLER,
    FLOAT_DTYPES,
    check_chunk_size,
    check_class_loss_input,
    check_count,
    check_embeddings,
    check_not_meta,
    check_sample_rate,
    usual_cpu_batch_passes,
)

__all__ = ["ClassWeightLoss"]


def is_plain_inner_product(distance: BaseDistance) -> bool:
    """Whether ``distance`` is PML's cosine or dot-product similarity, nothing added.

    Exactly ``CosineSimilarity`` or ``DotProductSimilarity`` (not a subclass), power 1,
    and L2 normalization when it normalizes: the forms the fused core computes. (Its
    ``is_inverted``, which PML's margin losses do not read, is the concern of the losses
    that negate a distance's values: see :func:`is_plain_similarity`.)
    """
    return (
        type(distance) in (CosineSimilarity, DotProductSimilarity)
        and distance.power == 1
        and (not distance.normalize_embeddings or distance.p == 2)
    )


def is_plain_similarity(distance: BaseDistance) -> bool:
    """:func:`is_plain_inner_product` and a similarity (``is_inverted``, as PML's
    constructors set it): for ``SoftmaxLoss`` and NSL, whose logits are a distance's
    values negated where it is not inverted (PML's NSL rule; one set False in place)."""
    return is_plain_inner_product(distance) and bool(distance.is_inverted)


#: what forms a class-weight loss's logits: redefined without a ``fused_logits`` that
#: describes them, they move the loss to the plain path
_LOGIT_METHODS = ("base_logits", "cosine", "weights_for")
#: the steps of PML's ``LargeMarginSoftmaxLoss.compute_loss`` (its ArcFace, CosFace,
#: SphereFace and Sub-center losses): a subclass of ours that defines one expects it
#: called, which it would not be
_PML_HOOKS = (
    "get_cosine",
    "get_angles",
    "get_target_mask",
    "modify_cosine_of_target_classes",
    "get_cos_with_margin",
    "scale_logits",
    "cast_types",
    "init_margin",
)


def _redefined(loss: ClassWeightLoss, name: str) -> bool:
    """Whether ``loss``'s method ``name`` is not :class:`ClassWeightLoss`'s own as defined
    below (a subclass's, a mixin's, one set on the instance or patched on the class)."""
    return not runs_method(loss, name, _BASE_METHODS[name])


def _weight_shape_error(loss: ClassWeightLoss, expected: object, hint: str = "") -> ValueError:
    """The error for ``loss.W`` of another shape than ``expected``."""
    return ValueError(
        f"{type(loss).__name__}'s class weights W have shape {tuple(loss.W.shape)}, but "
        f"embedding_size={loss.embedding_size} and num_classes={loss.num_classes} need "
        f"{expected}{hint}"
    )


def _check_logit_columns(loss: ClassWeightLoss, logits: torch.Tensor) -> None:
    """``ValueError`` where :meth:`~ClassWeightLoss.base_logits` gave another number of
    classes than ``num_classes`` (a ``W`` of another layout than the logits read)."""
    if logits.shape[-1] != loss.num_classes:
        raise ValueError(
            f"{type(loss).__name__}'s class weights W have shape {tuple(loss.W.shape)}, which "
            f"gives {logits.shape[-1]} class logits, but num_classes={loss.num_classes}"
        )


def runs_method(obj: object, name: str, function: Callable[..., Any]) -> bool:
    """Whether ``obj.name`` is ``function`` bound to ``obj`` (not a subclass's method, nor
    a callable set on the instance). Spelled so that ``torch.compile`` traces it as Python
    runs it (its ``getattr(bound, "__func__", None)`` gave ``None``: every method looked
    redefined inside a compiled forward, outside it not)."""
    bound = getattr(obj, name)
    return isinstance(bound, types.MethodType) and bound.__func__ is function


class ClassWeightLoss(
    HyperparameterAttributes,
    AtomicLoadMixin,
    FloatStatisticsMixin,
    CheckedForwardMixin,
    WeightRegularizerMixin,
    BaseMetricLossFunction,
):
    r"""Base of the class-weight (proxy) losses: softmax, NSL, SphereFace, CosFace, ArcFace.

    Holds ``W`` (``embedding_size x num_classes``, PML's name and layout, so PML
    state dicts load both ways), validates input, turns a miner's
    ``indices_tuple`` into per-sample weights as PML does, and applies PML's
    reducer, ``weight_regularizer`` (on ``W.t()`` in :meth:`compute_dtype`, where PML casts
    ``W`` to the embeddings' dtype) and ``embedding_regularizer``.

    **Dtypes.** ``W`` keeps its storage dtype. Embeddings and ``W`` of any floating
    dtypes (float16, bfloat16, float32, float64, mixed) are combined in
    ``compute_dtype`` of both: float64 if either is, else float32 (products run in
    the autocast dtype under autocast). ``embeddings.grad`` has the embeddings'
    dtype and ``W.grad`` has ``W``'s.

    **Extension point.** The loss is

    .. math::
        L_i = -\log\frac{e^{s_i\psi(z_{iy_i})}}{e^{s_i\psi(z_{iy_i})}
              + \sum_{j\ne y_i} e^{s_i\,\phi(z_{ij})}}

    with base logits :math:`z` and scale :math:`s` from :meth:`base_logits`, the
    target-logit function :math:`\psi` from :meth:`target_logit_fn` and
    :math:`\phi` from :meth:`non_target_logit_fn` (identity by default).

    * *A margin that changes only the target logit* (CosFace, ArcFace, SphereFace,
      the combined margin): set ``scale`` and override :meth:`target_logit_fn` to
      return :math:`\psi`, an element-wise differentiable function of the ``B``
      target cosines (a
      :class:`~pml_margins.functional.TargetWithSlope` when its hyper-parameters are
      constants: :math:`\psi` and :math:`\psi'` then come in one pass, no autograd
      call per step). Nothing else: the default :meth:`base_logits` (cosines from
      ``self.distance``) and the default :meth:`fused_logits` agree, so the loss
      runs on the fused core, with ``chunk_size`` and ``sample_rate``.
    * *A margin that changes the base logits*: override :meth:`base_logits`,
      :meth:`cosine` or :meth:`weights_for` (and :meth:`get_logits` follows). Such a
      class runs on the plain path (the ``(B, C)`` logits through autograd) unless the
      **same class** also overrides :meth:`fused_logits` to declare that its logits are
      exactly
      :class:`~pml_margins.functional.FusedLogits`: a scale times the inner product
      of optionally normalized embeddings and class weights, plus a bias -- or, with
      ``sub_centers=K``, the maximum of that product over each class's ``K``
      consecutive columns of ``W`` (Sub-center ArcFace's ``cosine``; the fused core
      then runs blocks of whole classes and sends each class's gradient to its
      winning column; name ``K`` ``self.sub_centers``, which the check of ``W``'s shape
      reads where the loss runs on the plain path) -- or, with ``scale_by_norm=True``, a
      number scale times each row's norm (SphereFace's :math:`\|x\|\cos\theta`; the
      core takes the norms from its normalization). A subclass that overrides one of
      them (itself or through a mixin earlier in its bases) without restating
      :meth:`fused_logits` at least as low in its MRO is moved to the plain path
      automatically, whatever else it overrides; so is a loss whose method is set on
      the instance or patched on its class after the class was defined.
    * *PML's hooks are not ours*: PML's ``LargeMarginSoftmaxLoss`` steps
      (``get_cosine``, ``modify_cosine_of_target_classes``, ``scale_logits``,
      ``get_cos_with_margin``, ``get_target_mask``, ``get_angles``, ``cast_types``,
      ``init_margin``) are never called here; a subclass that defines one (itself, in a
      mixin or by also deriving from PML's loss) is refused with a ``TypeError`` when the
      class is created (its margin would be silently
      ignored). Port such a subclass to :meth:`target_logit_fn` or :meth:`base_logits`.
    * *A margin that changes the non-target logits* (CurricularFace, the class-level
      Circle loss): override :meth:`non_target_logit_fn` to return :math:`\phi`, applied
      element-wise to blocks of base logits (cosines) of every row before scaling. It
      may close over per-row ``(B,)`` constants (use them as ``v.unsqueeze(1)``; e.g.
      CurricularFace's margined target cosine of each row) and scalars; they get no
      gradient (detach them). Give the returned object a ``slope(z)`` method
      (:math:`\phi'`, :class:`~pml_margins.functional.NonTargetLogitFn`) to spare the
      fused backward an autograd pass per block. Such a loss stays on the fused core
      (``chunk_size``, ``sample_rate``) when its logits are declared as above; set the
      per-step constants in :meth:`prepare_step` (below), so that it also shards.
    * *A margin that needs per-row or batch statistics* (MagFace's and AdaFace's
      feature norms, AdaCos's dynamic scale): override :meth:`prepare_step`, a
      context manager entered once per step around the logits, with the step's
      ``N`` embeddings (gradients flow through them), labels and a
      :class:`~pml_margins.losses.StepStatistics`; set there what
      :meth:`target_logit_fn` (per-row closures over ``(N,)`` tensors) or
      :meth:`logit_scale` read, update buffers, and clear it on exit. Quantities of
      the rows alone (norms, their batch mean) come from the embeddings; those that
      run over the classes (target cosines, sums over the non-target logits) come
      from the statistics object, which reduces them over the ranks that hold the
      classes. A per-row additive term (MagFace's regulariser) is returned by
      :meth:`extra_losses`, which may use only the embeddings, not ``W``. The same
      two methods are called by
      :class:`~pml_margins.distributed.ShardedMarginSoftmaxLoss` with the gathered
      batch (identical on every rank), so such a loss shards, with equal buffers on
      every rank. Name running-statistic buffers in :attr:`statistic_buffers` so
      they stay float32 in a half-precision loss.
    * *Per-class state and learnable parameters, when sharded.* Each rank's loss is
      built with its shard's ``num_classes`` (``C_local``), while the labels handed to
      :meth:`prepare_step` are **global** class ids: index per-class state by
      ``statistics.target`` (the column of each row's class in this shard, ``-1``
      where another rank holds it), or hold the whole ``(C,)`` state on every rank
      (a constructor argument). Checkpoints split only ``W`` and ``bias`` by class:
      other per-class buffers must be whole on every rank. A learnable parameter other
      than ``W``/``bias`` (a learned scale) is refused by the sharded loss (each rank
      would train it on its own classes' share of the gradient); freeze it, or train
      in one process.

    **Input checks.** Shapes and dtypes always; values (NaN/Inf, label and miner
    index ranges) in one host synchronisation per call, which
    :class:`pml_margins.validation.value_checks` turns off for production training.
    Partial FC (``sample_rate < 1``) reads one number more, checks on or off: how many
    classes the batch holds (``torch.unique``), which sizes the step's draw.

    Keyword arguments shared by every subclass (besides PML's):

    * ``chunk_size``: ``None`` (default: one saved ``(B, C)`` buffer), an ``int``
      number of classes per block or ``"auto"``: bounded memory, no ``(B, C)``
      tensor is ever held (for very many classes). Fused losses only.
    * ``sample_rate``: partial-FC negative-class sampling in ``(0, 1]``: each step
      keeps the batch's classes and a random subset of the others,
      ``round(sample_rate * C)`` in all; only those columns of ``W`` get gradients.
      It samples in eval mode too (a validation loss then varies from call to call;
      set ``sample_rate = 1`` for the full softmax). Fused losses only.
    """

    #: whether :meth:`base_logits` returns cosines (the ``avg_angle`` statistic needs them)
    logits_are_cosines: bool = True
    #: names shown by ``extra_repr`` and recorded by PML's record-keeper
    hyperparameter_names: tuple[str, ...] = ()
    #: the distance classes this loss accepts (PML's rule for the same loss)
    distance_types: tuple[type[BaseDistance], ...] = (CosineSimilarity,)
    #: buffers of running statistics (AdaFace's norm statistics, CurricularFace's ``t``,
    #: AdaCos's scale): kept in float32 when the module is cast to float16/bfloat16
    #: (:class:`~pml_margins.losses.float_statistics.FloatStatisticsMixin`)
    statistic_buffers: tuple[str, ...] = ()
    #: the logits' methods as the class declared them (set for each subclass)
    _declared_logits: tuple[Any, ...] = ()
    #: the core's modes (class docstring), checked whenever set
    chunk_size = Hyperparameter(check_chunk_size)
    sample_rate = Hyperparameter(check_sample_rate)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hooks = [name for name in _PML_HOOKS if hasattr(cls, name)]  # (a mixin's too)
        if hooks:
            raise TypeError(
                f"{cls.__name__} defines {', '.join(hooks)}: a step of PML's "
                "LargeMarginSoftmaxLoss that pml-margins' losses do not call. A margin on "
                "the target logit is target_logit_fn, other logits base_logits (see "
                "ClassWeightLoss's docstring)"
            )
        # the class (in the MRO, mixins included) that defines each method the subclass
        # gets: logits defined below the fused_logits that would describe them are not it
        first = {
            name: next(i for i, c in enumerate(cls.__mro__) if name in c.__dict__)
            for name in (*_LOGIT_METHODS, "fused_logits")
        }
        if min(first[name] for name in _LOGIT_METHODS) < first["fused_logits"]:
            cls.fused_logits = ClassWeightLoss._not_fused  # type: ignore[method-assign]
        cls._declared_logits = tuple(getattr(cls, name) for name in _LOGIT_METHODS)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        chunk_size: int | str | None = None,
        sample_rate: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.chunk_size = chunk_size
        self.sample_rate = sample_rate
        super().__init__(**kwargs)
        if not isinstance(self.distance, self.distance_types):
            names = " or ".join(t.__name__ for t in self.distance_types)
            raise TypeError(
                f"{type(self).__name__} needs a {names} distance, "
                f"got {type(self.distance).__name__}"
            )
        self.num_classes = check_count(num_classes, "num_classes")
        self.embedding_size = check_count(embedding_size, "embedding_size")
        self.W = torch.nn.Parameter(torch.empty(embedding_size, num_classes))
        self.weight_init_func(self.W)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "embedding_size", *self.hyperparameter_names],
            is_stat=False,
        )
        self.add_to_recordable_attributes(name="avg_angle", is_stat=True)

    def reset_parameters(self) -> None:
        """The loss as constructed: its parameters drawn again (:meth:`_init_parameters`)
        and the running statistics reset (:meth:`reset_running_stats`). torch's name, which
        ``FSDP`` calls on each module: what a loss built on the meta device needs after
        ``to_empty``. A shard of :class:`~pml_margins.distributed.ShardedMarginSoftmaxLoss`
        draws from its rank's seeded stream, as at construction (``_init_seed``)."""
        seed = self.__dict__.get("_init_seed")
        with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                self._init_parameters()
        self.reset_running_stats()

    def _init_parameters(self) -> None:
        """Draw the parameters as the constructor does: ``W`` by ``weight_init_func``."""
        self.weight_init_func(self.W)

    # --- what subclasses define -------------------------------------------------
    def base_logits(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Return the ``(B, C)`` base logits and the scale (float, 0-dim or ``(B,)`` tensor).

        Default: :meth:`cosine` and :meth:`logit_scale`.
        """
        return self.cosine(embeddings), self.logit_scale(embeddings)

    def logit_scale(self, embeddings: torch.Tensor) -> float | torch.Tensor:
        """The scale ``s`` (float, 0-dim or ``(B,)`` tensor) of :meth:`base_logits`; default
        ``scale``."""
        return self.scale

    def fused_logits(self, embeddings: torch.Tensor) -> FusedLogits | None:
        """How the fused core forms :meth:`base_logits`, or ``None`` for the plain path.

        Default: the form of ``self.distance`` when it is PML's plain cosine or
        dot-product similarity (both sides normalized, or neither), with
        :meth:`logit_scale`. See the class docstring for when to override it.
        """
        if not is_plain_inner_product(self.distance):
            return None
        normalize = bool(self.distance.normalize_embeddings)
        return FusedLogits(normalize, normalize, self.logit_scale(embeddings))

    def _fused_form(self, embeddings: torch.Tensor) -> FusedLogits | None:
        """:meth:`fused_logits`, unless :meth:`_logits_redefined`, or in default mode the
        distance has a hook or a method replaced on it: then ``None``, the plain path, which
        calls the methods and the distance as they are (as PML's loss calls them; with
        ``chunk_size``/``sample_rate`` the distance is never called: no ``B x C`` matrix)."""
        if self._logits_redefined():
            return None
        if not runs_as_its_class(self.distance) and (
            self.chunk_size is None and self.sample_rate == 1.0  # (default mode)
        ):
            return None
        return self.fused_logits(embeddings)

    def _logits_redefined(self) -> bool:
        """Whether the logits' methods are redefined without a :meth:`fused_logits` that
        describes them: by a subclass (see the class docstring), or after the class
        declared them (a method set on the instance, or patched on the class)."""
        if type(self).fused_logits is ClassWeightLoss._not_fused:
            return True
        declared = type(self)._declared_logits
        return not all(
            runs_method(self, name, method)
            for name, method in zip(_LOGIT_METHODS, declared, strict=True)
        )

    def _not_fused(self, embeddings: torch.Tensor) -> FusedLogits | None:
        """The :meth:`fused_logits` of a class that redefines its logits without declaring them."""
        return None

    def target_logit_fn(self) -> TargetLogitFn | None:
        """The function applied to the ``B`` target base logits (``None``: identity)."""
        return None

    def non_target_logit_fn(self) -> TargetLogitFn | None:
        r"""The function :math:`\phi` applied to every non-target base logit before scaling.

        ``None``: identity. Element-wise; see the class docstring (extension point) for
        what it may close over. Runs on the fused core and the plain path alike.
        """
        return None

    def prepare_step(
        self, embeddings: torch.Tensor, labels: torch.Tensor, statistics: StepStatistics
    ) -> AbstractContextManager[None]:
        """Context of one step: set per-step state from the batch; clear it on exit.

        Entered once per forward around the logits, by ``compute_loss`` and by the
        sharded loss (there with the gathered batch). Default: nothing.

        Args:
            embeddings: the step's ``(N, D)`` embeddings, with their graph.
            labels: their ``(N,)`` classes: global ids (in a shard of
                :class:`~pml_margins.distributed.ShardedMarginSoftmaxLoss` too, whose
                ``num_classes`` is the shard's; ``statistics.target`` gives the local
                column, see the class docstring).
            statistics: reductions over all classes (see
                :class:`~pml_margins.losses.StepStatistics`).
        """
        return nullcontext()

    def extra_losses(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """``(N,)`` terms added to the per-sample losses (``None``: none), inside the step.

        Called within :meth:`prepare_step`; it may depend on the embeddings (e.g. their
        norms), not on ``W`` (the sharded loss counts its gradient once per row).
        """
        return None

    def sharding_unsupported(self) -> str | None:
        """Why this loss cannot be sharded, or ``None`` (read by ShardedMarginSoftmaxLoss)."""
        return None

    @classmethod
    def shard_kwargs(cls, num_classes: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of one shard's loss, given the total ``num_classes``.

        :class:`~pml_margins.distributed.ShardedMarginSoftmaxLoss` builds each rank's
        loss with its own number of classes; a default that depends on the total
        (AdaCos's scale) is resolved here, from all ``C`` classes. Default: ``kwargs``.
        """
        return kwargs

    # --- shared helpers ---------------------------------------------------------
    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_dtype(self, embeddings: torch.Tensor) -> torch.dtype:
        """The dtype the logits are formed in: float64 if either side is, else float32;
        ``ValueError`` for a ``W`` on the meta device (every reader of ``W`` asks first:
        a product with a CPU tensor would give uninitialized numbers)."""
        weight = check_not_meta(self.W, f"{type(self).__name__}'s class weights W")
        return compute_dtype(torch.promote_types(embeddings.dtype, weight.dtype))

    def feature_norms(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B,)`` embedding norms in :meth:`compute_dtype`, outside autocast."""
        return row_norms(embeddings, self.compute_dtype(embeddings))

    def weights_for(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``W`` in :meth:`compute_dtype`; a differentiable cast, storage untouched."""
        dtype = self.compute_dtype(embeddings)
        return self.W if self.W.dtype == dtype else self.W.to(dtype)

    def target_cosines(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` cosines to each row's own class weight: no gradient, :meth:`compute_dtype`."""
        with torch.no_grad(), autocast_off(embeddings.device.type):
            dtype = self.compute_dtype(embeddings)
            x = torch.nn.functional.normalize(embeddings.detach().to(dtype), dim=1)
            w = self.W.detach().index_select(1, labels.long()).to(dtype)
            return torch.linalg.vecdot(x, torch.nn.functional.normalize(w, dim=0).t())

    def distance_inputs(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`base_logits` hands ``self.distance``: the embeddings and ``W^T``
        (the fused core records the distance's statistics from them, as a call would)."""
        weights = self.weights_for(embeddings)
        return embeddings.to(weights.dtype), weights.t()

    def _record_distance_stats(self, embeddings: torch.Tensor) -> None:
        """PML's distance statistics (the query and reference norms before and after its
        normalization) when the distance collects them: the fused core never calls it."""
        if self.distance.collect_stats:  # (before W is read: a parametrization runs per read)
            with torch.no_grad():
                record_distance_stats(self.distance, *self.distance_inputs(embeddings.detach()))

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``cos(theta_ij)`` between each embedding and each class weight, via ``self.distance``."""
        weights = self.weights_for(embeddings)
        return self.distance(embeddings.to(weights.dtype), weights.t())

    def cosine_blocks(self, embeddings: torch.Tensor, width: int) -> Iterator[torch.Tensor]:
        """:meth:`cosine` as column blocks of at most ``width`` classes, in order (their
        concatenation is :meth:`cosine`), each formed when the one before is let go: what a
        step statistic over every class reads in bounded mode, where no ``(B, C)`` tensor
        may be held."""
        weights = self.weights_for(embeddings)
        x = embeddings.to(weights.dtype)
        for start in range(0, weights.shape[1], width):
            yield self.distance(x, weights[:, start : start + width].t())

    def _statistics_blocks(
        self, embeddings: torch.Tensor
    ) -> Callable[[], Iterator[torch.Tensor]] | None:
        """For bounded mode (``chunk_size`` or ``sample_rate``; the caller decides), where
        :meth:`cosine` is this class's own: the step statistics' cosines as column blocks
        of the core's width (:meth:`cosine_blocks`; the distance, hooks included, called
        once per block); else ``None`` (a redefined :meth:`cosine`'s one product)."""
        if not runs_method(self, "cosine", ClassWeightLoss.cosine):
            return None
        width = self.chunk_size
        if not isinstance(width, int):  # "auto", or None with Partial FC
            width = auto_chunk_size(*embeddings.shape, embeddings.device)
        return lambda: self.cosine_blocks(embeddings, width)

    def _checked_compute_dtype(self, embeddings: object) -> torch.dtype | None:
        """:meth:`compute_dtype` for the norm check, ``None`` for input the checks refuse;
        first, at the entry of a forward (or :meth:`get_logits`), the shape of ``W``."""
        self._check_weight_shape(embeddings)
        if isinstance(embeddings, torch.Tensor) and embeddings.dtype in FLOAT_DTYPES:
            return self.compute_dtype(embeddings)
        return None

    def _check_weight_shape(self, embeddings: object) -> None:
        """``ValueError`` for a ``W`` that is not this loss's layout, at a forward's entry,
        before any statistic moves (``W`` or ``num_classes`` replaced after construction:
        a wider ``W`` trained more classes than ``num_classes`` says, a narrower one failed
        in an index error): ``(embedding_size, num_classes * K)`` with ``K`` the loss's
        ``sub_centers``, else 1. A class with a :meth:`fused_logits` of its own and no
        ``sub_centers`` may hold ``K`` columns per class under another name: there
        ``embedding_size`` rows and a multiple of ``num_classes`` columns, and what it
        declares is checked where the core takes ``W`` (the logits' class count on the
        plain path). Logits redefined without a declaration may read any layout of ``W``
        (their class count is checked on the logits)."""
        weight, rows, classes = self.W, self.embedding_size, self.num_classes
        if not (type(classes) is int and classes > 0 and type(rows) is int and rows > 0):
            classes = check_count(classes, "num_classes")  # (set after construction:
            rows = check_count(rows, "embedding_size")  # 0 divided below)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}'s class weights W must be a tensor, got "
                f"{type(weight).__name__}"
            )
        per_class = self.__dict__.get("sub_centers")  # (no nn.Module.__getattr__ miss)
        if per_class is None and hasattr(type(self), "sub_centers"):
            per_class = getattr(self, "sub_centers", None)
        if per_class is not None and (
            not isinstance(per_class, int) or isinstance(per_class, bool)
        ):
            return  # (the core's own check names it)
        expected = (rows, classes * (per_class or 1))
        if weight.shape == expected or self._logits_redefined():
            return
        own = not (getattr(type(self).fused_logits, "__module__", None) or "").startswith(
            "pml_margins."
        )
        multiple = weight.ndim == 2 and weight.shape[0] == rows and weight.shape[1] > 0
        multiple = multiple and not weight.shape[1] % classes
        if per_class is None and own and multiple:  # K under another name: checked where
            return  # it is declared (the statistics it moved are put back: forward)
        hint = " (a class with K columns of W per class may name K sub_centers)" * multiple
        raise _weight_shape_error(self, expected, hint)

    def _check_declared_columns(self, form: FusedLogits, weight: torch.Tensor) -> None:
        """``ValueError`` unless ``weight`` has the ``num_classes * K`` columns that
        ``form`` declares (``K`` declared by a class's own :meth:`fused_logits`, which the
        entry check of :meth:`_check_weight_shape` does not ask)."""
        per_class = form.sub_centers
        if type(per_class) is int and weight.shape[1] != self.num_classes * per_class:
            raise _weight_shape_error(self, (self.embedding_size, self.num_classes * per_class))

    def _norms_taken(self) -> bool:
        """Whether the logits take the embeddings' norms (their check then refuses rows
        whose squared norm overflows): all but a raw inner product's (``SoftmaxLoss``'s
        default, ``DotProductSimilarity(normalize_embeddings=False)``)."""
        distance = self.distance
        return not (is_plain_inner_product(distance) and not distance.normalize_embeddings)

    def _logits_bounded(self) -> bool:
        """Whether the logits are bounded by the scale and the margin: cosines (PML's plain
        cosine or dot-product similarity, normalizing). Other distances (a raw inner
        product: ``SoftmaxLoss``, NSL over ``DotProductSimilarity(normalize_embeddings=
        False)``; ``SNRDistance``, ``LpDistance``, a ``power``) can make finite input give
        NaN/Inf logits, so their losses are checked (:meth:`check_result`)."""
        distance = self.distance
        return is_plain_inner_product(distance) and distance.normalize_embeddings

    def _hold_rows_for_check(self, losses: torch.Tensor) -> None:
        """Keep whether the step's rows' margin-softmax losses (before any reducer or miner
        weight) are finite, for :meth:`check_result`, where the logits are not bounded (a
        ``bool`` on CPU, else a 0-dim tensor: no graph, nothing read back yet)."""
        if not self._logits_bounded():
            super()._hold_rows_for_check(losses)

    def check_result(self, loss: torch.Tensor) -> None:
        """Where the logits are not bounded (:meth:`_logits_bounded`), refuse the step's
        rows' losses, then the reduced ``loss``, that came out NaN/Inf from checked, finite
        input: one read-back of both (those losses only; none for cosine logits). A
        reducer that returns the rows or drops NaN ones is covered by the rows, a mean or
        sum that overflows (or a regularizer's term) by the reduced loss."""
        rows = self.__dict__.pop("_rows_finite", None)
        if self._logits_bounded():
            return
        name, distance = type(self).__name__, type(self.distance).__name__
        overflowed = "overflowed" if rows is not None else "(or their mean) overflowed"

        def rows_error() -> ValueError:
            return ValueError(
                f"{name} gave non-finite losses from finite embeddings: with {distance} its "
                f"logits are not bounded (no normalized cosines) and {overflowed} or are "
                "undefined (SNRDistance of a constant row: variance 0), or W or a bias holds "
                "NaN/Inf; scale the embeddings or W down, drop constant rows, or use a "
                "normalizing CosineSimilarity"
            )

        def reduced_error() -> ValueError:
            return ValueError(
                f"{name}'s reduced loss is not finite although its rows' losses are: the "
                "reducer's sum (or a regularizer's term) overflowed; scale the embeddings or "
                "W down"
            )

        check_rows_and_reduced(rows, loss, rows_error, reduced_error)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Classification logits without margin (``s * z``), shape ``(B, C)``; ``W`` follows
        the embeddings' device as in :meth:`forward`."""
        check_embeddings(
            embeddings,
            width=self.embedding_size,
            compute_dtype=self._checked_compute_dtype(embeddings),
            norms_taken=self._norms_taken(),
        )
        follow_device(self, embeddings.device)
        logits, scale = self.base_logits(outside_inference(embeddings))
        _check_logit_columns(self, logits)
        if isinstance(scale, torch.Tensor):
            scale = scale.to(logits.dtype).unsqueeze(1)
        return logits * scale

    # --- PML contract -------------------------------------------------------------
    def check_inputs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> None:
        """Embeddings of width ``embedding_size``, labels in ``[0, C)``, no ``ref_emb``."""
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
            compute_dtype=self._checked_compute_dtype(embeddings),
            norms_taken=self._norms_taken(),
        )

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> dict[str, dict[str, Any]]:
        losses = self._step_losses(embeddings, labels, indices_tuple)
        loss_dict = {
            "loss": {
                "losses": losses,
                "indices": torch.arange(embeddings.shape[0], device=embeddings.device),
                "reduction_type": "element",
            }
        }
        if self.weight_regularizer is not None:  # PML's mixin adds nothing otherwise
            # W.t() in compute_dtype, outside autocast: under it a regularizer's products
            # ran in bf16/fp16 while it read W's dtype for its fill values (RegularFace's
            # -max of float32 into a bf16 matrix: an overflow error)
            with autocast_off(embeddings.device.type):
                weights = self.weights_for(embeddings).t()
                self.add_weight_regularization_to_loss_dict(loss_dict, weights)
        return loss_dict

    def _step_losses(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None,
    ) -> torch.Tensor:
        """The ``(B,)`` element losses of :meth:`compute_loss`: the margin softmax inside
        :meth:`prepare_step`, plus :meth:`extra_losses`, times a miner's weights.

        Half embeddings enter in :meth:`compute_dtype` (one cast): the gradients of every
        path (the margin softmax, a scale or margin of the norm, :meth:`extra_losses`) add
        up there and are rounded to bf16/fp16 once."""
        if embeddings.dtype in (torch.float16, torch.bfloat16):
            embeddings = embeddings.to(self.compute_dtype(embeddings))
        fused_only = self.chunk_size is not None or self.sample_rate != 1.0
        if fused_only and (autograd_only_enabled() or self._fused_form(embeddings) is None):
            self._check_plain_mode()  # before prepare_step updates any running statistic
        statistics = None  # only a prepare_step of a subclass reads them
        if _redefined(self, "prepare_step"):
            statistics = StepStatistics(
                lambda: self.cosine(embeddings),
                labels,
                lambda columns: self.target_cosines(embeddings, columns),
                from_core=not fused_only and not autograd_only_enabled(),
                cosine_blocks=self._statistics_blocks(embeddings) if fused_only else None,
            )
        with self.prepare_step(embeddings, labels, statistics):  # type: ignore[arg-type]
            losses = self._per_sample_losses(embeddings, labels, statistics)
            self._hold_rows_for_check(losses)
            extra = self.extra_losses(embeddings, labels)
        if extra is not None:
            losses = losses + extra.to(losses.dtype)
        if indices_tuple is not None:
            losses = losses * lmu.convert_to_weights(indices_tuple, labels, dtype=losses.dtype)
        return losses

    def _direct_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The mean loss of a CPU batch in the common call, without PML's plumbing.

        The common call: PML's default ``MeanReducer`` and nothing that collects statistics
        or regularizes, no miner or reference set, no per-step hooks (:meth:`prepare_step`,
        :meth:`extra_losses`, ``compute_loss`` or ``check_inputs`` redefined), default mode,
        outside ``torch.func`` transforms, forward AD and :func:`~pml_margins.autograd_only`,
        and a float32/float64 CPU batch of usual layout that passes the checks
        (:func:`~pml_margins.validation.usual_cpu_batch_passes`: what ``check_inputs``
        decides there). Then ``forward`` comes down to :meth:`_per_sample_losses` and
        ``torch.mean``, taken here directly: the loss's methods are called once each, in
        the full path's order, and ``W`` is read where it reads it (a parametrization runs
        per read). Where the core would run
        :func:`~pml_margins.functional.dense_margin_softmax.dense_margin_softmax_cross_entropy`
        (a problem it materializes, one column per class, no non-target function, ``W``
        and bias of the loss's shapes) that function is called straight away, its mean
        taken inside (~40 us of a ~300 us step at 64 x 128 x 100, which left a plain torch
        loss faster there; the loss's ``grad_fn`` is then the dense function's node, not
        ``MeanBackward0``). Same values, gradients, statistics and errors as the full
        path. Anything else: ``None``, decided before ``W`` or any method is read.
        """
        if (
            indices_tuple is not None
            or ref_emb is not None
            or ref_labels is not None
            or self.chunk_size is not None
            or self.sample_rate != 1.0
            or self.collect_stats
            or not isinstance(self.distance, BaseDistance)  # (swapped in after construction)
            or self.distance.collect_stats
            or not isinstance(self.reducer, BaseReducer)
            or self._plain_reduction() is not torch.mean
            or any(_redefined(self, name) for name in _BASE_METHODS)  # per-step hooks
            or plain_autograd_needed()
            or not usual_cpu_batch_passes(embeddings, labels, self.num_classes, self.embedding_size)
        ):
            return None
        # from here on, the full path's steps in its order (W read where it reads it:
        # a parametrization runs once per read); no way back
        self._checked_compute_dtype(embeddings)  # check_inputs' call (a subclass may count)
        self.reset_stats()
        non_target_fn = self.non_target_logit_fn()
        form = self._fused_form(embeddings)
        if (
            form is None
            or type(form.sub_centers) is not int  # (the core's check_count judges others)
            or form.sub_centers != 1
            or non_target_fn is not None
        ):
            return torch.mean(self._losses_of(embeddings, labels, non_target_fn, form))  # type: ignore[arg-type]
        weight = self.W
        if (
            type(weight) not in (torch.Tensor, torch.nn.Parameter)
            or weight.layout != torch.strided
            or weight.dtype not in FLOAT_DTYPES
            or weight.shape != (self.embedding_size, self.num_classes)
            or not (form.bias is None or form.bias.shape == (self.num_classes,))
            or not dense_materializes(embeddings, weight)
        ):  # the core's own checks and choice
            losses = self._fused_losses(embeddings, labels, form, None, weight=weight)  # type: ignore[arg-type]
            return torch.mean(losses)
        with CHECKED_BY_CALLER:  # checked above (hyper-parameters when set)
            return dense_margin_softmax_cross_entropy(
                embeddings,
                weight,
                labels,  # type: ignore[arg-type]
                self.target_logit_fn(),
                check_scale(form.scale, embeddings.shape[0]),
                form.normalize_embeddings,
                form.normalize_weight,
                form.bias,
                mean=True,
                scale_by_norm=form.scale_by_norm,
            )

    def _element_losses(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
    ) -> torch.Tensor | None:
        """:meth:`_step_losses`, unless a subclass redefines :meth:`compute_loss` (see
        :class:`~pml_margins.losses.checked_forward.CheckedForwardMixin`)."""
        if _redefined(self, "compute_loss"):
            return None
        return self._step_losses(embeddings, labels, indices_tuple)  # type: ignore[arg-type]

    def _per_sample_losses(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        statistics: StepStatistics | None = None,
    ) -> torch.Tensor:
        non_target_fn = self.non_target_logit_fn()
        form = None if autograd_only_enabled() else self._fused_form(embeddings)
        return self._losses_of(embeddings, labels, non_target_fn, form, statistics)

    def _losses_of(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        non_target_fn: TargetLogitFn | None,
        form: FusedLogits | None,
        statistics: StepStatistics | None = None,
    ) -> torch.Tensor:
        """:meth:`_per_sample_losses` given the step's non-target function and fused form
        (``None``: the plain path)."""
        if form is not None:
            formed = None if statistics is None else statistics.formed_target_cosines()
            return self._fused_losses(embeddings, labels, form, non_target_fn, formed)
        self._check_plain_mode()
        # autograd records this route (a PML distance, a gather): it refuses inference tensors
        embeddings, labels = outside_inference(embeddings), outside_inference(labels)
        logits, scale = self.base_logits(embeddings)
        _check_logit_columns(self, logits)
        if self.collect_stats and self.logits_are_cosines:
            self._record_avg_angle(logits, labels)
        with CHECKED_BY_CALLER:  # checked by forward (hyper-parameters when set)
            return margin_softmax_cross_entropy(
                logits, labels, self.target_logit_fn(), scale, non_target_logit_fn=non_target_fn
            )

    def _check_plain_mode(self) -> None:
        if self.chunk_size is not None or self.sample_rate != 1.0:
            if autograd_only_enabled():
                why = "under pml_margins.autograd_only() or a torch.func transform"
            elif self._logits_redefined():
                why = (
                    "(it redefines base_logits, cosine or weights_for without declaring them "
                    "in fused_logits)"
                )
            else:
                why = (
                    f"with {type(self.distance).__name__} (its logits are not declared by "
                    "fused_logits)"
                )
            raise ValueError(
                f"{type(self).__name__} runs on the plain path {why}: chunk_size and "
                "sample_rate are not supported there"
            )

    def _fused_losses(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        form: FusedLogits,
        non_target_fn: TargetLogitFn | None,
        target_cosines: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fused core's losses of ``form``; ``weight``: ``W`` as already read this step
        (``None``: read here)."""
        self._record_distance_stats(embeddings)
        if self.collect_stats and self.logits_are_cosines:
            cosine = self.target_cosines(embeddings, labels).unsqueeze(1)
            self._record_avg_angle(cosine, torch.zeros_like(labels))
        if not (form.normalize_embeddings and form.normalize_weight):
            target_cosines = None  # formed as cosines (the core takes them for K = 1 only)
        weight = self.W if weight is None else weight
        self._check_declared_columns(form, weight)
        with CHECKED_BY_CALLER:  # checked by forward (hyper-parameters when set)
            return fused_margin_softmax_cross_entropy(
                embeddings,
                weight,
                labels,
                self.target_logit_fn(),
                form.scale,
                normalize_embeddings=form.normalize_embeddings,
                normalize_weight=form.normalize_weight,
                bias=form.bias,
                chunk_size=self.chunk_size,
                sample_rate=self.sample_rate,
                non_target_logit_fn=non_target_fn,
                sub_centers=form.sub_centers,
                target_cosines=target_cosines,
                scale_by_norm=form.scale_by_norm,
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


#: the methods whose redefinition :func:`_redefined` detects, as this module defines them
#: (each one, redefined, also keeps a call off :meth:`ClassWeightLoss._direct_loss`)
_BASE_METHODS = {
    name: getattr(ClassWeightLoss, name)
    for name in ("compute_loss", "prepare_step", "extra_losses", "check_inputs")
}
ClassWeightLoss._declared_logits = tuple(getattr(ClassWeightLoss, n) for n in _LOGIT_METHODS)
