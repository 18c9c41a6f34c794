r"""Model-parallel class-weight loss: each rank owns a contiguous shard of ``W``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch.func import functional_call

from pml_margins.distributed.collectives import (
    ProcessGroup,
    all_gather_rows,
    all_reduce_,
    broadcast_from_first_,
    check_group,
    checked_on_every_rank,
    dtype_code,
    gather_rows_with_grad,
    rank_and_world_size,
    settings_code,
)
from pml_margins.distributed.loadable_state import check_loadable
from pml_margins.distributed.local_logits import cosine_logits
from pml_margins.distributed.partial_fc import sample_local_classes
from pml_margins.distributed.sharded_margin_softmax import sharded_margin_softmax_cross_entropy
from pml_margins.distributed.sharding import class_columns, shard_range
from pml_margins.evaluation.calculator import describe_distance
from pml_margins.evaluation.inputs import as_int
from pml_margins.functional.dense_margin_softmax import check_norm_scale_form
from pml_margins.functional.saved_inputs import outside_inference
from pml_margins.losses.atomic_load import load_all_or_nothing
from pml_margins.losses.checked_forward import in_loss_dtype
from pml_margins.losses.class_weight_loss import ClassWeightLoss, _check_logit_columns
from pml_margins.losses.pml_calls import runs_as_its_class
from pml_margins.losses.step_statistics import StepStatistics
from pml_margins.validation import (
    CHECKED_BY_CALLER,
    check_class_labels,
    check_count,
    check_embeddings,
    check_sample_rate,
    other_reference,
    value_checks_enabled,
)

__all__ = ["ShardedMarginSoftmaxLoss"]


class _BaseLogits(torch.nn.Module):
    """Calls ``loss.base_logits`` as ``forward``, so ``functional_call`` can swap in sampled W."""

    def __init__(self, loss: ClassWeightLoss) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, float | torch.Tensor]:
        return self.loss.base_logits(embeddings)


class _ShardStatistics(StepStatistics):
    """Step statistics of a shard: sums and maxima over the classes are all-reduced."""

    targets_elsewhere = True  # -1: the row's class is held by another rank

    def __init__(
        self,
        cosine: Callable[[], torch.Tensor],
        target: torch.Tensor,
        target_cosine: Callable[[torch.Tensor], torch.Tensor],
        group: ProcessGroup | None,
    ) -> None:
        super().__init__(cosine, target, target_cosine)
        self.group = group

    def sum_over_classes(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_(value.clone(), "sum", self.group)

    def max_over_classes(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_(value.clone(), "max", self.group)


def _cosine_scale(
    loss: ClassWeightLoss, embeddings: torch.Tensor, sampled: bool
) -> float | torch.Tensor | None:
    """The scale when ``loss`` declares scaled cosine logits (no bias), else ``None``.

    Read from the loss's explicit declaration,
    :meth:`~pml_margins.losses.ClassWeightLoss.fused_logits`: then the shard's logits
    can be formed by :func:`~pml_margins.distributed.local_logits.cosine_logits`. A
    sub-centre declaration (a maximum over columns) is not plain cosines: such a loss
    forms its shard's logits by its own ``base_logits``; so do logits redefined without
    a declaration and, unless ``sampled`` (the single-process Partial FC core does not
    call the distance either), a distance with a hook: its call, as in one process.
    """
    redefined = loss._logits_redefined()
    form = None if redefined else loss.fused_logits(embeddings)
    if form is not None:  # W's columns as declared, as where the single-process core takes W
        loss._check_declared_columns(form, loss.W)
    if not sampled and not runs_as_its_class(loss.distance):
        form = None
    if form is not None and form.scale_by_norm:  # as the single-process core judges it
        check_norm_scale_form(form.normalize_embeddings, form.bias, form.scale)
    cosine = (
        form is not None
        and form.normalize_embeddings
        and form.normalize_weight
        and form.bias is None
        and form.sub_centers == 1
    )
    if not cosine:
        return None
    return form.scale * loss.feature_norms(embeddings) if form.scale_by_norm else form.scale


def _distance_code(distance: object) -> tuple:
    """A PML distance as the ranks compare it: its class and the settings that decide its
    values (each rank forms its own classes' logits with its own)."""
    settings = ("p", "power", "normalize_embeddings", "is_inverted")
    return (
        type(distance).__module__,
        type(distance).__qualname__,
        tuple(getattr(distance, n, None) for n in settings),
    )


def _reducer_code(reducer: object) -> tuple:
    """A PML reducer as the ranks compare it: its class, its bounds (``low``/``high``;
    :func:`settings_code` compares numbers by value), the reducers it wraps
    (``PerAnchorReducer``'s, ``MultipleReducers``'), and its class weights' shape
    (``ClassWeightedReducer``: their values would need a read)."""
    inner = getattr(reducer, "reducer", None)
    inner_code = None if inner is None or inner is reducer else _reducer_code(inner)
    several = getattr(reducer, "reducers", None)
    several_code = (
        tuple(sorted((str(k), _reducer_code(v)) for k, v in several.items()))
        if isinstance(several, dict)
        else None
    )
    default = getattr(reducer, "default_reducer", None)
    weights = getattr(reducer, "weights", None)
    return (
        type(reducer).__module__,
        type(reducer).__qualname__,
        tuple(getattr(reducer, n, None) for n in ("low", "high")),
        inner_code,
        several_code,
        None if default is None else _reducer_code(default),
        tuple(weights.shape) if isinstance(weights, torch.Tensor) else None,
    )


#: added to a rank's initialisation seed for its sampler's (an odd 64-bit constant, the
#: golden ratio's fraction): the two streams share no draws
_SAMPLER_STREAM = 0x9E3779B97F4A7C15


def _sampler_from_seed_if_absent(
    module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """A state dict saved without the sampler (``_extra_state``, before it was kept there)
    loads as one whose sampler starts from the seed; one saved by a shard of other classes
    (rank 0's, loaded on every rank), tensors of another kind (a bool ``W``), running
    statistics the loss refuses or a loss on the meta device are refused before anything
    is loaded, as by
    :func:`.checkpoint.load_into`."""
    extra = state_dict.setdefault(f"{prefix}_extra_state", {"sampler_state": None})
    shard = extra.get("shard") if isinstance(extra, dict) else None
    mine = module.shard_description()
    if shard is not None and shard != mine:
        raise ValueError(
            f"this state dict is the shard {shard} (classes [start, end) of num_classes at "
            f"world_size), this rank's loss {mine}: load each rank's own state dict, or "
            "use pml_margins.distributed.checkpoint (save_shard, reshard, load_into)"
        )
    own = module.loss.state_dict()
    inner = f"{prefix}loss."
    check_loadable(own, {k[len(inner) :]: v for k, v in state_dict.items() if k.startswith(inner)})
    module.loss.check_statistics(state_dict, inner)  # (the loss's own check runs after
    # this module's extra state, the sampler, has loaded)


# it checks, and adds the sampler's default entry: a load stays all or nothing (atomic_load)
_sampler_from_seed_if_absent.keeps_load_atomic = True  # type: ignore[attr-defined]


class ShardedMarginSoftmaxLoss(torch.nn.Module):
    r"""Any class-weight loss with ``W`` sharded across ranks, optionally with Partial FC.

    Rank ``r`` of ``world_size`` owns classes ``[start, end)`` (contiguous,
    sizes differing by at most one; :func:`~pml_margins.distributed.shard_range`)
    and stores only ``W_local`` of shape ``(D, end - start)`` in PML's layout, as
    ``self.loss.W`` of an ordinary ``loss_type(end - start, D, **loss_kwargs)``
    (so its ``base_logits``, target-logit function :math:`\psi`, scale and
    weight initialisation are those of the loss itself; SoftmaxLoss's ``bias``
    is sharded with ``W``).

    Each step: the local embeddings are all-gathered (the gradient flows back to
    their owner rank), each rank forms the base logits of all ``N`` gathered
    embeddings against its (sampled) shard, :math:`\psi` is applied on the rank
    that owns the target, and the softmax normalizer is all-reduced
    (:func:`~pml_margins.distributed.sharded_margin_softmax_cross_entropy`). The
    loss's PML reducer (mean by default) turns the ``N`` per-sample losses into
    the returned scalar, **the same value on every rank**. Its gradients are those
    of that single loss: ``embeddings.grad`` equals the rows of this rank in the
    gradient of the single-process loss on the gathered batch, ``W_local.grad``
    its columns of this shard.

    With DDP on the backbone, DDP *averages* parameter gradients over ranks; the
    backbone then receives the single-process gradient divided by
    ``world_size`` (insightface multiplies the embedding gradient by
    ``world_size`` to compensate; here, scale the backbone's learning rate or
    the loss if you want the single-process step).

    Do not wrap this module in ``DistributedDataParallel`` (its parameters differ
    on every rank and must not be averaged): wrap the backbone only, and give
    ``parameters()`` of this module to the optimizer.

    ``W_local`` is initialised by the loss's ``weight_init_func`` under the seed
    ``seed * 1_000_003 + rank`` (the global RNG is left as it was), so shards
    differ from each other even when every rank seeds torch identically, and a
    run is reproducible. To start from given weights, load a checkpoint
    (:mod:`pml_margins.distributed.checkpoint`).

    Partial FC (``sample_rate < 1``): see :mod:`pml_margins.distributed.partial_fc`.
    Each rank draws its negatives from its own generator, seeded by :meth:`sampler_seed`
    (from ``seed`` and the rank, apart from the initialisation's stream);
    ``sampled_classes`` holds the global ids kept by this rank in the last step.

    Every rank must call ``forward`` at each step, with at least one embedding
    (it runs collectives), and build the same loss: its class, hyper-parameters, bias
    (or none), dtypes and reducer (its class, bounds and wrapped reducers; not class
    weights' values), and the same scalar buffers (running statistics, AdaCos's fixed
    scale; their values, NaN and infinities included, compared in one more all-reduce
    where the loss has any) are checked to agree, a ``ValueError`` on every rank naming
    what differs. It gathers
    by itself: do not also wrap it in PML's ``DistributedLossWrapper``. Memory per
    rank: ``W_local`` and its gradient (``D x C / world_size``) plus a few
    ``N x C / world_size`` logit-sized buffers (``N x K`` with Partial FC keeping ``K``
    columns). Host reads per step (a synchronisation each on a GPU): the value checks
    (one, as in one process; none with them off), the agreement check above (one, two
    with scalar buffers), the ranks' batch sizes for the embeddings' and the labels'
    gathers (two), Partial FC's count of the kept positives (one); the softmax itself
    reads nothing back.

    A loss whose margin or scale needs batch statistics (MagFace, AdaFace, dynamic
    AdaCos) gets them through its
    :meth:`~pml_margins.losses.ClassWeightLoss.prepare_step`, entered with the
    gathered batch (the same on every rank) and statistics whose sums over classes
    are all-reduced over ``group``; its buffers (AdaCos's scale, AdaFace's norm
    statistics) stay equal on every rank. Its per-row
    :meth:`~pml_margins.losses.ClassWeightLoss.extra_losses` are added to the ``N``
    losses on every rank, their gradient counted once.

    Miners (``indices_tuple``), ``weight_regularizer`` and ``embedding_regularizer``
    are not supported (they need all of ``W`` or per-rank batches); nor is a loss whose
    ``sharding_unsupported()`` returns a reason, which is raised as a ``ValueError``, nor
    learnable parameters of the loss besides ``W`` and ``bias`` (a learned scale: its
    gradient sums over every class; ``ValueError`` at ``forward``). Each rank's loss has
    its shard's ``num_classes``; labels stay global (see the extension point of
    :class:`~pml_margins.losses.ClassWeightLoss` for per-class state).

    Args:
        loss_type: a :class:`~pml_margins.losses.ClassWeightLoss` subclass, e.g.
            :class:`~pml_margins.losses.ArcFaceLoss`.
        num_classes: total number of classes ``C`` (over all ranks).
        embedding_size: ``D``.
        sample_rate: Partial FC rate in ``(0, 1]``; 1 disables sampling.
        seed: seed of the shard's initialisation and of the negative-class sampling.
        group: process group (default: the world).
        rank, world_size: override the group's (e.g. to build a shard offline, for
            checkpoints); without a process group the default is ``(0, 1)``, the
            unsharded loss. ``forward`` refuses a shard whose group disagrees (it would
            count its own classes as all of them, or each class once per rank).
        **loss_kwargs: the loss's own arguments (``margin``, ``scale``, ``reducer``...).

    Example:
        >>> from pml_margins.losses import ArcFaceLoss
        >>> loss_fn = ShardedMarginSoftmaxLoss(ArcFaceLoss, 1000, 128, sample_rate=0.1, margin=0.5)
        >>> loss = loss_fn(torch.randn(8, 128), torch.randint(0, 1000, (8,)))
    """

    def __init__(
        self,
        loss_type: type[ClassWeightLoss],
        num_classes: int,
        embedding_size: int,
        sample_rate: float = 1.0,
        seed: int = 0,
        group: ProcessGroup | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **loss_kwargs: Any,
    ) -> None:
        super().__init__()
        if not (isinstance(loss_type, type) and issubclass(loss_type, ClassWeightLoss)):
            raise TypeError(f"loss_type must be a ClassWeightLoss subclass, got {loss_type!r}")
        self.loss_type = loss_type
        self.num_classes = check_count(num_classes, "num_classes")
        self.embedding_size = check_count(embedding_size, "embedding_size")
        self.sample_rate = check_sample_rate(sample_rate)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        group = check_group(group)
        if rank is None or world_size is None:
            rank, world_size = rank_and_world_size(group)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.class_start, self.class_end = shard_range(num_classes, world_size, rank)
        integer_seed = as_int(seed)
        if integer_seed is None:  # (1.9 was taken as 1)
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        self.seed = integer_seed
        self.loss_kwargs = dict(loss_kwargs)
        with torch.random.fork_rng(devices=[]):  # own init per shard, global RNG untouched
            torch.manual_seed(self._stream_seed())
            shard_kwargs = loss_type.shard_kwargs(self.num_classes, dict(loss_kwargs))
            self.loss = loss_type(self.class_end - self.class_start, embedding_size, **shard_kwargs)
        self.loss._init_seed = self._stream_seed()  # (its reset_parameters draws from it)
        reason = self.loss.sharding_unsupported()
        if reason is not None:
            raise ValueError(reason)
        for name in ("weight_regularizer", "embedding_regularizer"):
            if getattr(self.loss, name, None) is not None:
                raise ValueError(f"{name} is not supported by {type(self).__name__}")
        if "chunk_size" in loss_kwargs and loss_kwargs["chunk_size"] is not None:
            raise ValueError(
                f"chunk_size is not used by {type(self).__name__}: each rank holds the "
                "logits of its own classes only; shard over more ranks or use sample_rate"
            )
        self._generator: torch.Generator | None = None
        self._pending_sampler_state: torch.Tensor | None = None
        self.sampled_classes: torch.Tensor | None = None
        register = getattr(self, "register_load_state_dict_pre_hook", None)
        if register is not None:
            register(_sampler_from_seed_if_absent)
        else:  # torch < 2.5: the private form, given the module with with_module
            self._register_load_state_dict_pre_hook(_sampler_from_seed_if_absent, True)

    def _loss_code(self) -> tuple[float, str]:
        """:func:`settings_code` of the loss's class, hyper-parameters, bias (or none),
        reducer (:func:`_reducer_code`) and the names of its scalar buffers, and the
        first shown."""
        loss = self.loss
        names = getattr(loss, "hyperparameter_names", ())
        values = tuple((n, getattr(loss, n, None)) for n in names)
        values += (("bias", getattr(loss, "bias", None) is not None),)
        values += (("distance", _distance_code(loss.distance)),)
        values += (("reducer", _reducer_code(loss.reducer)),)
        # which buffers are the loss's scalar state, compared after this agreement
        values += (("scalar buffers", tuple(n for n, b in loss.named_buffers() if b.ndim == 0)),)
        shown = ", ".join(f"{n}={v!r}" for n, v in values[:-3])
        shown = (
            f"{type(loss).__name__}({shown}), {describe_distance(loss.distance)}, "
            f"reducer {type(loss.reducer).__name__}"
        )
        return settings_code(type(loss).__module__, type(loss).__qualname__, values), shown

    def _check_parameters(self) -> None:
        """Refuse learnable parameters of the loss other than ``W`` and ``bias``: their
        gradient sums over all classes, and each rank would train them on its own share."""
        trained = [
            name
            for name, p in self.loss.named_parameters()
            if p.requires_grad and name not in ("W", "bias")
        ]
        if trained:
            raise ValueError(
                f"{type(self).__name__} cannot train {self.loss_type.__name__}'s parameters "
                f"that are not split by class ({', '.join(trained)}): each rank would get "
                "its own classes' share of their gradient. Freeze them "
                "(requires_grad_(False)) or train in one process"
            )

    @property
    def W_local(self) -> torch.nn.Parameter:
        """This rank's class weights ``(D, C_local)``: classes ``[class_start, class_end)``."""
        return self.loss.W

    @property
    def num_local(self) -> int:
        return self.class_end - self.class_start

    @property
    def sample_rate(self) -> float:
        """Partial FC's rate in ``(0, 1]``, checked when assigned too (0 and -2 trained
        with one column per rank, NaN failed in ``round``), as the single-process loss's."""
        return self.__dict__["_sample_rate"]

    @sample_rate.setter
    def sample_rate(self, value: object) -> None:
        self.__dict__["_sample_rate"] = check_sample_rate(value)

    def reset_parameters(self) -> None:
        """The shard as constructed: the loss's ``reset_parameters`` (from this rank's
        seeded stream, as the loss alone draws it too: ``FSDP`` calls it on the loss, the
        module holding ``W_local``) and the Partial FC sampler from the seed
        (:meth:`load_sampler_state` of ``None``)."""
        self.loss._init_seed = self._stream_seed()  # (a shard pickled before it was set)
        self.loss.reset_parameters()
        self.load_sampler_state(None)

    def _stream_seed(self) -> int:
        """The seed of this rank's weight initialisation: ``seed * 1_000_003 + rank``,
        taken modulo 2^64 where it leaves what ``torch.manual_seed`` takes (``[-2^63,
        2^64)``: a seed beyond ~1.8e13, such as ``torch.initial_seed()``, overflowed)."""
        value = self.seed * 1_000_003 + self.rank
        return value if -(2**63) <= value < 2**64 else value % 2**64

    def sampler_seed(self) -> int:
        """The seed of this rank's Partial FC sampler: another stream than the weight
        initialisation's (the same one would keep the negatives whose columns drew the
        largest initial values: ``|W[0, j]|`` of the kept columns 1.2-1.8x the mean)."""
        return (self._stream_seed() + _SAMPLER_STREAM) % 2**64

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.sampler_seed())
            if self._pending_sampler_state is not None:
                try:  # kept only once set: a state that does not fit fails every step
                    generator.set_state(self._pending_sampler_state)
                except RuntimeError as err:  # torch: "Expected a ...GeneratorImplState"
                    size = self._pending_sampler_state.numel()
                    raise ValueError(
                        f"the loaded Partial FC sampler state ({size} "
                        f"bytes) does not fit a {device.type} generator: it was saved on "
                        "another device type; move the loss to that device, or load the "
                        "checkpoint without it (the sampler then starts from its seed)"
                    ) from err
                self._pending_sampler_state = None
            self._generator = generator
        return self._generator

    def sampler_state(self) -> torch.Tensor | None:
        """The Partial FC sampler's RNG state (``None`` without Partial FC); before the
        first sampled step, that of its generator as seeded (``seed`` and the rank), so a
        loss built with another seed still resumes the same draws."""
        if self._generator is None and self._pending_sampler_state is not None:
            return self._pending_sampler_state
        if self._generator is None and (self.sample_rate == 1 or self.W_local.is_meta):
            return None  # (on the meta device no generator exists: from the seed)
        return self._generator_for(self.W_local.device).get_state()

    @staticmethod
    def check_sampler_state(state: object) -> None:
        """``ValueError`` unless ``state`` is ``None`` or a generator state (1-D uint8);
        whether it fits the device is known at the first sampled step, where the loss
        then runs (a loss loaded on CPU and moved to CUDA takes a CUDA state)."""
        if state is not None and not (
            isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.ndim == 1
        ):
            raise ValueError(f"a sampler state must be a 1-D uint8 tensor or None, got {state!r}")

    def load_sampler_state(self, state: torch.Tensor | None) -> None:
        """Resume sampling from :meth:`sampler_state` (a state of the device type the loss
        runs on at its next sampled step); ``None``: from the seed."""
        self.check_sampler_state(state)
        self._generator = None
        self._pending_sampler_state = None if state is None else state.clone()

    def shard_description(self) -> dict[str, Any]:
        """Which classes this rank holds: ``class_range``, ``num_classes``, ``world_size``."""
        return {
            "class_range": [self.class_start, self.class_end],
            "num_classes": self.num_classes,
            "world_size": self.world_size,
        }

    def get_extra_state(self) -> dict[str, Any]:
        """The Partial FC sampler's state, in ``state_dict()`` (key ``_extra_state``), so
        that ``load_state_dict`` resumes the same draws, as :func:`.checkpoint.load_into`;
        and which classes this shard holds (another rank's state dict is refused)."""
        return {"sampler_state": self.sampler_state(), "shard": self.shard_description()}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """torch's, all or nothing: a load that fails (a size mismatch, a missing key)
        puts back the shard's tensors and sampler (torch copied the entries that fit
        first: a failed load kept the checkpoint's running statistics). A state dict that
        fits (:func:`~pml_margins.losses.atomic_load.fits_state_dict`) loads with no copy."""
        return load_all_or_nothing(self, super().load_state_dict, state_dict, strict, assign)

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state` (``load_state_dict`` calls it)."""
        if not isinstance(state, dict) or not {"sampler_state"} <= set(state) <= {
            "sampler_state",
            "shard",
        }:
            raise ValueError(
                f"{type(self).__name__}'s extra state must be a dict with the key "
                f"'sampler_state' (and 'shard'), got {state!r}"
            )
        self.load_sampler_state(state["sampler_state"])

    # the sampler loads before the inner loss's tensors: a bad one raises before any copy
    set_extra_state.keeps_load_atomic = True  # type: ignore[attr-defined]

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reduced loss over the batch gathered from all ranks (same on every rank).

        Args:
            embeddings: this rank's ``(B, D)`` embeddings (``B`` may differ across ranks).
            labels: this rank's ``B`` global class labels in ``[0, C)``.
            indices_tuple, ref_emb, ref_labels: PML's call signature (``MultipleLosses``
                passes them): ``None`` (or ``ref_emb``/``ref_labels`` the batch itself);
                a miner's tuples or another reference set are a ``ValueError``.
        """
        self.loss.reset_stats()
        self.loss.__dict__.pop("_rows_finite", None)  # (a step that failed: see check_result)

        def check() -> None:  # on every rank together: one rank's refusal stops them all
            if indices_tuple is not None:
                name = type(self).__name__
                raise ValueError(f"miners (indices_tuple) are not supported by {name}")
            if other_reference(embeddings, labels, ref_emb, ref_labels):
                raise ValueError(f"ref_emb/ref_labels are not supported by {type(self).__name__}")
            self._check_group()
            self._check_parameters()
            inner = self.loss
            if inner.chunk_size is not None or inner.sample_rate != 1.0:
                raise ValueError(  # (set on the inner loss after construction: ignored)
                    f"the sharded loss's inner loss has chunk_size={inner.chunk_size}, "
                    f"sample_rate={inner.sample_rate}: {type(self).__name__} uses neither "
                    "(each rank forms its own classes' logits); set sample_rate on it"
                )
            norms_taken = self.loss._norms_taken()  # (as in one process)
            check_embeddings(embeddings, width=self.embedding_size, norms_taken=norms_taken)
            check_class_labels(labels, embeddings.shape[0], self.num_classes)
            self.loss._check_weight_shape(embeddings)  # (W_local replaced: as in one process)
            if self.sample_rate != 1:  # a loaded sampler state that fits no generator here
                self._generator_for(embeddings.device)  # is refused by every rank together

        dtype = embeddings.dtype if isinstance(embeddings, torch.Tensor) else None
        grad = isinstance(embeddings, torch.Tensor) and embeddings.requires_grad
        grad = grad and torch.is_grad_enabled()
        codes = {  # what the ranks must share: else a wrong loss, or a backward that hangs
            "embeddings dtypes": (dtype_code(dtype), str(dtype)),
            "num_classes": (float(self.num_classes), str(self.num_classes)),
            "embedding_size": (float(self.embedding_size), str(self.embedding_size)),
            "sample_rate": (float(self.sample_rate), str(self.sample_rate)),
            "embeddings requiring grad": (float(grad), str(grad)),
            # one rank refusing a non-finite loss (check_result) where another returns it
            "value checks": (float(value_checks_enabled()), str(value_checks_enabled())),
            # eval mode skips the collectives of running-statistic updates (AdaCos)
            "training modes": (float(self.loss.training), str(self.loss.training)),
            # collect_stats adds an all-reduce (avg_angle over all classes)
            "collect_stats": (float(bool(self.loss.collect_stats)), str(self.loss.collect_stats)),
            "W dtypes": (dtype_code(self.W_local.dtype), str(self.W_local.dtype)),
            # another loss or hyper-parameter: other collectives (a hang, an abort), or
            # each row's loss by its class's rank
            "losses (their class and hyper-parameters)": self._loss_code(),
        }
        checked_on_every_rank(check, self.group, self.W_local.device, codes)
        # the scalar buffers (running statistics, AdaCos's fixed scale) are the loss's
        # global state, equal on every rank after every step; a rank that loaded others
        # would train another loss (per-class buffers are each shard's own). Compared once
        # the losses agree (their class, so which scalars): one more all-reduce, if any
        scalars = [(n, b) for n, b in self.loss.named_buffers() if b.ndim == 0]
        if scalars:
            names = ", ".join(n for n, _ in scalars)
            values = torch.stack([b.detach().double() for _, b in scalars])
            equal = {f"loss buffers ({names})": values}
            checked_on_every_rank(
                lambda: None,
                self.group,
                self.W_local.device,
                equal=equal,
                equal_hint=(
                    "load the same state dict on every rank; a step that failed on some "
                    "ranks only leaves them apart too (those ranks put their statistics back)"
                ),
            )
        # gathered in the loss's compute dtype (float32 for half embeddings): each rank's
        # share of a row's gradient is summed over the ranks unrounded, then cast back once
        saved = self.loss.statistics_kept()  # (put back if the step fails: as in one process)
        try:
            return self._gathered_loss(embeddings, labels)
        except BaseException:
            self.loss.restore_statistics(saved)
            raise

    def _gathered_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:meth:`forward`'s loss after its checks: the batch gathered, reduced, checked."""
        # (one rank's gather returns its input: autograd refuses to save an inference tensor)
        work = outside_inference(embeddings.to(self.loss.compute_dtype(embeddings)))
        all_emb, _ = gather_rows_with_grad(work, self.group)
        all_labels, _ = all_gather_rows(labels.to(embeddings.device, torch.int64), self.group)
        local = all_labels.long() - self.class_start
        owned = torch.where((local >= 0) & (local < self.num_local), local, -1)
        statistics = _ShardStatistics(
            lambda: self.loss.cosine(all_emb),
            owned,
            lambda columns: self.loss.target_cosines(all_emb, columns),
            self.group,
        )
        with self.loss.prepare_step(all_emb, all_labels, statistics):
            losses = self._losses(all_emb, all_labels, owned)
            self.loss._hold_rows_for_check(losses)
        if self.loss.collect_stats and self.loss.logits_are_cosines:  # PML's avg_angle,
            target = statistics.target_cosines().unsqueeze(1)  # over all classes: one all-
            self.loss._record_avg_angle(target, torch.zeros_like(all_labels))  # reduce more
        loss_dict = {
            "loss": {
                "losses": losses,
                "indices": torch.arange(losses.shape[0], device=losses.device),
                "reduction_type": "element",
            }
        }
        loss = self.loss.reducer(loss_dict, in_loss_dtype(all_emb, loss_dict), all_labels)
        self.loss.check_result(loss)  # (every row's, on every rank: all refuse together)
        return loss

    def _check_group(self) -> None:
        """``ValueError`` when the process group is not the one the shards were made for
        (``rank``/``world_size`` given to the constructor, or a shard built offline)."""
        actual = rank_and_world_size(self.group)
        if actual != (self.rank, self.world_size):
            raise ValueError(
                f"this loss holds shard {self.rank} of {self.world_size}, but its process "
                f"group makes this process rank {actual[0]} of {actual[1]}: a forward runs "
                "in the group the shards were made for (a shard built offline is for "
                "checkpoints: merge the shards with to_single_process_loss)"
            )

    def _losses(
        self, all_emb: torch.Tensor, all_labels: torch.Tensor, owned: torch.Tensor
    ) -> torch.Tensor:
        """The ``N`` per-sample losses, inside the loss's step context."""
        index: torch.Tensor | None = None
        if self.sample_rate == 1:
            target = owned
            self.sampled_classes = None
        else:
            index, target = sample_local_classes(
                all_labels,
                self.class_start,
                self.num_local,
                self.sample_rate,
                self._generator_for(all_labels.device),
            )
            self.sampled_classes = index + self.class_start
        logits, scale = self._local_logits(all_emb, index)
        # a loss that draws per row (ElasticFace) uses the group's first rank's draws, set
        # for this call only (the loss itself keeps no process group: it pickles)
        shares = hasattr(self.loss, "share_draws")
        if shares:
            self.loss.share_draws = partial(broadcast_from_first_, group=self.group)
        try:
            with CHECKED_BY_CALLER:  # the forward checked the batch; each row has one owner
                losses = sharded_margin_softmax_cross_entropy(
                    logits,
                    target,
                    self.loss.target_logit_fn(),
                    scale,
                    self.group,
                    non_target_logit_fn=self.loss.non_target_logit_fn(),
                )
        finally:
            if shares:
                self.loss.share_draws = None
        extra = self.loss.extra_losses(all_emb, all_labels)
        if extra is None:
            return losses
        # the same value on every rank; its gradient from the row's owner rank only, so
        # that the gather's backward (a sum over ranks) counts it once
        extra = torch.where(owned >= 0, extra, extra.detach())
        return losses + extra.to(losses.dtype)

    def _local_logits(
        self, embeddings: torch.Tensor, index: torch.Tensor | None
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Base logits and scale of the gathered batch against the (sampled) shard."""
        scale = _cosine_scale(self.loss, embeddings, sampled=self.sample_rate != 1.0)
        if scale is not None:
            weight = self.loss.weights_for(embeddings)
            if index is not None:
                weight = weight.index_select(1, index)
            return cosine_logits(embeddings.to(weight.dtype), weight), scale
        if index is None:
            logits, scale = self.loss.base_logits(embeddings)
            _check_logit_columns(self.loss, logits)  # (as the single-process plain path)
            return logits, scale
        # W may hold several columns per class (sub-centres): keep all of each kept class
        columns = class_columns(index, self.loss.W.shape[1] // self.num_local)
        params = {"loss.W": self.loss.W.index_select(1, columns)}
        if getattr(self.loss, "bias", None) is not None:
            params["loss.bias"] = self.loss.bias.index_select(0, index)
        return functional_call(_BaseLogits(self.loss), params, (embeddings,))

    def extra_repr(self) -> str:
        return (
            f"loss_type={self.loss_type.__name__}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_end}), rank={self.rank}, "
            f"world_size={self.world_size}, sample_rate={self.sample_rate}"
        )
