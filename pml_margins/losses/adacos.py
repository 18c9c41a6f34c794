r"""AdaCos: normalized softmax with the scale set automatically, no margin."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from pml_margins.functional.autograd_switch import refuse_update_in_function_transform
from pml_margins.functional.fused_margin_softmax import FusedLogits
from pml_margins.functional.margin_softmax import check_scale
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.losses.step_statistics import StepStatistics
from pml_margins.validation import (
    MAX_LOGIT_TERM,
    check_bool,
    check_class_labels,
    check_count,
    check_logit_scale,
    check_optional_logit_scale,
    check_similarities,
)

__all__ = [
    "AdaCosLoss",
    "adacos_dynamic_scale",
    "adacos_fixed_scale",
    "adacos_scale_from_statistics",
]


def adacos_fixed_scale(num_classes: int) -> float:
    r"""AdaCos's fixed scale (Zhang et al., 2019, Eq. 13): :math:`\tilde s_f = \sqrt2\,\log(C-1)`.

    ``num_classes``: an integer (numpy and one-element tensor integers too).

    Raises:
        TypeError: ``num_classes`` is not an integer.
        ValueError: ``num_classes < 3`` (the scale would be 0 or undefined).
    """
    num_classes = check_count(num_classes, "num_classes")
    if num_classes < 3:
        raise ValueError(
            f"AdaCos needs num_classes >= 3 (its scale sqrt(2) log(C - 1) is 0 for two "
            f"classes), got {num_classes!r}"
        )
    return math.sqrt(2) * math.log(num_classes - 1)


def adacos_dynamic_scale(
    cosine: torch.Tensor, labels: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    r"""AdaCos's dynamic scale for the next step (Zhang et al., 2019, Eqs. 15-16).

    .. math::
        B_{avg} = \frac1N \sum_i \sum_{k\ne y_i} e^{s\cos\theta_{ik}}, \qquad
        s' = \frac{\log B_{avg}}{\cos\big(\min(\pi/4,\ \theta_{med})\big)}

    with :math:`s` the current scale and :math:`\theta_{med}` the median target angle
    of the batch (the lower median for an even batch, ``torch.median``'s).
    :math:`\log B_{avg}` is formed as a log-sum-exp, so it cannot overflow. Where
    :math:`B_{avg} \le 1` (every non-target logit well below 0: few classes, or a
    batch far from every other class) the formula gives :math:`s' \le 0`, which would
    invert the softmax and penalize correct classification; the current scale is then
    kept for the next step (no host synchronisation: a ``torch.where``). Beyond
    ``MAX_LOGIT_TERM`` (1e15, the largest scale the loss takes) the new scale is that
    bound: with collapsed features (median target angle at or past :math:`\pi/4`,
    non-target cosines near 1) the formula grows the scale about 1.4-fold a step, and
    float32 logits overflowed after a few hundred steps.

    Args:
        cosine: ``(N, C)`` cosines, ``C >= 2``.
        labels: ``(N,)`` target classes.
        scale: the current scale :math:`s`: a number or a one-element tensor without
            gradient, in ``(0, MAX_LOGIT_TERM]``.

    Raises:
        TypeError / ValueError: ``scale`` not as above (NaN gave a NaN scale, a negative
            one a scale from inverted logits), ``cosine`` not a 2-D floating tensor of
            finite values with ``N >= 1`` and ``C >= 2``, ``labels`` not ``N`` integers in
            ``[0, C)`` (values unread under ``value_checks(False)``: an index error then,
            as in the losses).

    Returns:
        The new scale, a 0-dim tensor without gradient, in the cosines' dtype (at least
        float32) promoted with a tensor ``scale``'s (a float64 buffer: float64).
    """
    cosine = check_similarities(cosine, "cosine", ndim=2)
    if cosine.shape[0] == 0 or cosine.shape[1] < 2:
        raise ValueError(
            f"cosine needs a row and at least 2 classes (columns), got shape {tuple(cosine.shape)}"
        )
    labels = check_class_labels(labels, cosine.shape[0], cosine.shape[1])
    if isinstance(scale, torch.Tensor):  # one value in (0, MAX_LOGIT_TERM], as the loss's
        _check_scale_tensor(scale)
        check_scale(scale, 1)
    else:
        check_logit_scale(scale, "scale")
    return adacos_scale_from_statistics(StepStatistics(lambda: cosine, labels), scale)


def adacos_scale_from_statistics(
    statistics: StepStatistics, scale: float | torch.Tensor
) -> torch.Tensor:
    r""":func:`adacos_dynamic_scale` from a step's statistics over all classes (sharded too).

    :math:`\log B_{avg}` and the target angles are reduced over the holders of the
    classes by ``statistics``, so every rank of a sharded loss gets the same scale.
    """
    with torch.no_grad():
        rows = statistics.target.shape[0]
        log_b_avg = statistics.non_target_logsumexp(scale) - math.log(rows)
        theta_med = torch.acos(statistics.target_cosines().clamp(-1, 1)).median()
        new = log_b_avg / torch.cos(theta_med.clamp(max=math.pi / 4))
        if isinstance(scale, torch.Tensor):  # the buffer's precision, kept exactly
            new = new.to(torch.promote_types(new.dtype, scale.dtype))
        current = torch.as_tensor(scale, dtype=new.dtype, device=new.device)
        # s' <= 0 (B_avg <= 1): keep s; at most the largest scale a loss takes (collapsed
        # features compound s' ~ 1.4 s a step: float32 logits overflowed after ~250 steps)
        current = current.reshape(())  # (a one-element scale of any shape: 0-dim out)
        return torch.where(new > 0, new, current).clamp_(max=MAX_LOGIT_TERM)


def _check_scale_tensor(value: torch.Tensor) -> None:
    """``ValueError`` unless ``value`` can be AdaCos's running scale: one real, non-bool
    value without a graph (a statistic, not a parameter: a learned scale is
    ``logit_scale()``, see the README)."""
    if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool or value.requires_grad:
        raise ValueError(
            "scale must be one real value without grad (the running scale is a statistic, "
            f"not a parameter), got {value!r}"
        )


class AdaCosLoss(ClassWeightLoss):
    r"""AdaCos (Zhang et al., CVPR 2019, arXiv:1905.00292): cosine softmax, scale set for you.

    .. math::
        L = -\log\frac{e^{\tilde s\cos\theta_{y}}}{\sum_{j} e^{\tilde s\cos\theta_j}}

    No margin. ``dynamic=False`` (AdaCos-fixed): :math:`\tilde s_f = \sqrt2\log(C-1)`.
    ``dynamic=True``: the scale starts there and, at each **training** step, is first
    set from the batch (:func:`adacos_dynamic_scale`: the non-target logits' average
    :math:`B_{avg}` at the current scale and the median target angle), then used for
    that step's loss, as in the paper's Algorithm 1 (all samples count, whatever a
    miner selects). In eval mode the scale stays as it is.

    The scale is the buffer ``scale`` (a 0-dim tensor, in the state dict, so a
    checkpoint resumes with it); the scale gets no gradient.

    Recommended: the paper's defaults, nothing to tune (units: none). The fixed scale
    for 10,575 classes (CASIA-WebFace) is 13.1; for 100 classes (CUB) 6.5.

    It runs on the fused core (``chunk_size``, ``sample_rate``; the statistics always
    cover every class). In default mode the core forms the cosines once and hands them
    to the scale update before it forms the logits (three products per step, as for a
    fixed scale); with ``chunk_size`` or ``sample_rate < 1``, and sharded, the dynamic
    scale costs one more ``B x D x C`` product (without gradient) per training step. Sharded
    (:class:`~pml_margins.distributed.ShardedMarginSoftmaxLoss`), :math:`B_{avg}` and
    the target angles are reduced over the ranks that hold the classes, so the scale
    is the same on every rank and equal to the single-process one on the gathered
    batch; ``scale=None`` takes :math:`\sqrt2\log(C-1)` of all ``C`` classes on every
    rank (:meth:`shard_kwargs`), not of the rank's own.

    Args:
        num_classes: number of classes ``C >= 3``.
        embedding_size: embedding width ``D``.
        scale: the initial (``dynamic``) or fixed scale, ``> 0``; ``None``: the paper's
            :math:`\sqrt2\log(C-1)`.
        dynamic: update the scale from each training batch.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``) and the core's
            ``chunk_size`` / ``sample_rate``.
    """

    hyperparameter_names = ("dynamic",)
    dynamic = Hyperparameter(check_bool)
    statistic_buffers = ("scale",)
    scale: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float | None = None,
        dynamic: bool = True,
        **kwargs: Any,
    ) -> None:
        num_classes = check_count(num_classes, "num_classes")
        initial = check_optional_logit_scale(scale, "scale")
        initial = adacos_fixed_scale(num_classes) if initial is None else initial
        self.dynamic = dynamic
        super().__init__(num_classes, embedding_size, **kwargs)
        # float64 until the module is cast: sqrt(2) log(C - 1) is kept exactly
        self.register_buffer("scale", torch.tensor(initial, dtype=torch.float64))
        self._initial_scale = initial
        self._deferred: StepStatistics | None = None  # a step whose update the core makes

    def initial_statistics(self) -> dict[str, float]:
        """The constructor's scale (given, or the paper's fixed one); none for a loss
        pickled before it was kept (its scale is then left as it is: a shard's or a given
        one cannot be told from the loss)."""
        initial = self.__dict__.get("_initial_scale")
        return {} if initial is None else {"scale": initial}

    def check_statistic(self, name: str, value: torch.Tensor) -> None:
        """A loaded ``scale``: one value, checked as the constructor checks it (a NaN, 0 or
        negative scale loaded: NaN, constant or inverted losses)."""
        if name == "scale":
            _check_scale_tensor(value)
            check_optional_logit_scale(value.double().item(), "scale")
        super().check_statistic(name, value)

    @classmethod
    def shard_kwargs(cls, num_classes: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A shard's loss starts from the scale of all ``num_classes`` (when not given)."""
        if kwargs.get("scale") is None:
            kwargs = {**kwargs, "scale": adacos_fixed_scale(num_classes)}
        return kwargs

    def logit_scale(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The current scale, once per row (no host synchronisation). Within a step whose
        update was deferred to the core, a path that asks here instead makes the update
        first (from the step's statistics): the step's loss has the step's scale
        whichever path forms it."""
        if self._deferred is not None:
            self._update_scale(self._deferred)
        return self.scale.detach().clone().expand(embeddings.shape[0])

    def fused_logits(self, embeddings: torch.Tensor) -> FusedLogits | None:
        """The default form; within a step that defers the update, the scale is a callable
        (:meth:`_scale_from_cosines`) that the fused core calls with its cosines."""
        deferred, self._deferred = self._deferred, None  # (the default form's scale: not
        try:  # the update, which the callable makes)
            form = super().fused_logits(embeddings)
        finally:
            self._deferred = deferred
        if form is None or deferred is None:
            return form
        return replace(form, scale=self._scale_from_cosines)

    def _update_scale(self, statistics: StepStatistics) -> None:
        """The step's update from ``statistics``, once (the deferral ends)."""
        self._set_scale(adacos_scale_from_statistics(statistics, self.scale))
        self._deferred = None

    def _set_scale(self, value: torch.Tensor) -> None:
        """Write the step's scale into the buffer through a ``(1,)`` view: torch.compile's
        graphs (aot_eager, inductor; torch 2.13) drop an in-place write into a 0-dim
        float64 buffer, and the compiled loss kept its first scale for good."""
        self.scale.view(1).copy_(value.reshape(1))

    @contextmanager
    def prepare_step(
        self, embeddings: torch.Tensor, labels: torch.Tensor, statistics: StepStatistics
    ) -> Iterator[None]:
        """In training with ``dynamic``: set the scale from the batch before it is used.

        On the fused core in default mode in one process (``statistics.from_core``), the
        update is deferred to the core, which forms the cosines once for both (no
        product of its own); else it is made here, from ``statistics``.
        """
        if not (self.dynamic and self.training):
            yield
            return
        refuse_update_in_function_transform(self, "its scale")
        defer = (
            statistics.from_core
            and self.non_target_logit_fn() is None
            and (form := self._fused_form(embeddings)) is not None
            and form.sub_centers == 1
        )
        if not defer:
            self._set_scale(adacos_scale_from_statistics(statistics, self.scale))
            yield
            return
        self._deferred = statistics
        try:
            yield
            if self._deferred is statistics:  # no path asked for the scale (a subclass's own)
                self._update_scale(statistics)
        finally:
            self._deferred = None

    def _scale_from_cosines(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """The deferred update, from the fused core's cosines: the step's scale, once per row."""
        statistics = self._deferred
        if statistics is None:
            raise RuntimeError("AdaCos's deferred scale was called outside its step")
        statistics.set_class_cosines(blocks)
        self._update_scale(statistics)  # once per step
        return self.scale.detach().clone().expand(blocks[0].shape[0])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.statistics_repr('scale')}"
