r"""ElasticFace: ArcFace or CosFace with a margin drawn per sample from a normal distribution."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pml_margins.function_transforms import values_under_transforms
from pml_margins.functional.margin_softmax import TargetLogitFn
from pml_margins.functional.target_logits import (
    TargetWithSlope,
    _within_margin,
    angle_cosine,
    arcface_target,
    arcface_value_and_slope,
    cosface_target,
    cosface_value_and_slope,
    safe_sine,
)
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.validation import (
    check_angle_margin,
    check_choice,
    check_logit_offset,
    check_logit_scale,
)

__all__ = ["ElasticFaceLoss", "elastic_arc_target", "elastic_cos_target"]

#: the paper's mean margin per variant (ElasticFace-Arc: radians, ElasticFace-Cos: a cosine)
PAPER_MARGINS = {"arc": 0.5, "cos": 0.35}


def elastic_arc_target(cosine: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    r"""ElasticFace-Arc: :math:`\cos(\theta_i + m_i)` with a margin per row (radians).

    .. math::
        \cos(\theta_i + m_i) = \cos\theta_i\cos m_i - \sin\theta_i\sin m_i

    Where :math:`\theta_i + m_i > \pi` for a margin in :math:`[0, \pi]`, the logit is
    :math:`\cos\theta_i - m_i\sin m_i`, ArcFace's rule
    (:func:`~pml_margins.functional.arcface_target`) per row. A draw outside
    :math:`[0, \pi]` (the normal is not clipped) takes the paper's
    :math:`\cos(\theta_i + m_i)` everywhere: the fallback, made for margins in
    :math:`[0, \pi]`, would turn a margin above :math:`\pi` into a bonus
    (:math:`\sin m_i < 0`).
    """
    given, margins = margins, margins.to(cosine.dtype)
    cos_m, sin_m = torch.cos(margins), torch.sin(margins)
    cosine = angle_cosine(cosine)
    with_margin = cosine * cos_m - safe_sine(cosine) * sin_m
    # theta + m <= pi (the test on cosines holds for m in [0, pi]), or a margin outside it
    outside = (margins < 0) | (margins > math.pi)
    inside = _within_margin(cosine, given)
    return torch.where(inside | outside, with_margin, cosine - margins * sin_m)


def elastic_cos_target(cosine: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    r"""ElasticFace-Cos: :math:`\cos\theta_i - m_i` with a margin per row (a cosine)."""
    return cosine - margins.to(cosine.dtype)


def _margin_check(variant: str) -> Callable[[object, str], float]:
    """The check of a margin in ``variant``'s unit: radians in ``[0, pi)`` for arc, a
    cosine ``>= 0`` for cos."""
    return check_angle_margin if variant == "arc" else check_logit_offset


class ElasticFaceLoss(ClassWeightLoss):
    r"""ElasticFace (Boutros et al., CVPRW 2022, arXiv:2109.09416): a random margin per sample.

    Each step draws, for every sample :math:`i`, a margin
    :math:`m_i \sim \mathcal N(m, \sigma^2)` (from torch's global generator, so
    reproducible under ``torch.manual_seed``) and applies it as ArcFace or CosFace does:

    .. math::
        \text{arc:}\; L_i = -\log\frac{e^{s\cos(\theta_{y_i} + m_i)}}
            {e^{s\cos(\theta_{y_i} + m_i)} + \sum_{j\ne y_i} e^{s\cos\theta_j}},
        \qquad
        \text{cos:}\; \cos(\theta_{y_i} + m_i) \to \cos\theta_{y_i} - m_i

    In evaluation mode (``loss.eval()``) nothing is drawn: the mean margin ``m`` applies
    to every sample (a repeatable validation loss that leaves torch's generator where it
    was; the authors' code, which never evaluates the loss, draws on every call).
    The margins are not clipped (as in the paper). ``sigma = 0`` is exactly
    :class:`ArcFaceLoss` (including its :math:`\theta + m > \pi` fallback, applied per
    sample here) or :class:`CosFaceLoss`. The fallback is ArcFace's, not the authors'
    ElasticFace code's, which takes :math:`\cos(\theta + m)` there too (a target logit
    that rises again past :math:`\pi`); they differ only on such targets. The margins of
    the last forward are kept in ``last_margins`` (``(B,)``, for logging; not in the state
    dict; under ``torch.func.vmap`` with the mapped dimensions in front).

    **Units:** ``variant="arc"``: ``margin`` and ``sigma`` in radians;
    ``variant="cos"``: a cosine. Recommended (paper, faces, ``s = 64``):
    ElasticFace-Arc ``m = 0.5`` rad, ``sigma = 0.05`` rad; ElasticFace-Cos ``m = 0.35``,
    ``sigma = 0.05`` (``margin=None`` picks these per variant). For CUB/SOP retrieval,
    the ArcFace/CosFace ranges (``s`` 16-32) with ``sigma`` about a tenth of ``m``.

    The margin changes only the target logit, so the loss runs on the fused core
    (``chunk_size``, ``sample_rate``) and sharded (every rank uses the margins its
    group's first rank draws, whatever the ranks' seeds: the single-process loss on the
    gathered batch under that rank's seed).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        margin: mean margin ``m`` (``None``: the paper's, 0.5 rad for arc, 0.35 for cos);
            ``[0, pi)`` for arc, ``>= 0`` for cos.
        sigma: standard deviation ``>= 0`` of the margin, in the margin's unit.
        scale: ``s > 0``.
        variant: ``"arc"`` (ElasticFace-Arc) or ``"cos"`` (ElasticFace-Cos).
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``) and the core's
            ``chunk_size`` / ``sample_rate``.
    """

    hyperparameter_names = ("margin", "sigma", "scale", "variant")
    sigma = Hyperparameter(check_logit_offset)
    scale = Hyperparameter(check_logit_scale)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float | None = None,
        sigma: float = 0.05,
        scale: float = 64.0,
        variant: str = "arc",
        **kwargs: Any,
    ) -> None:
        self.variant = variant
        self.margin = margin
        self.sigma, self.scale = sigma, scale
        self.last_margins: torch.Tensor | None = None
        #: what the drawn noise passes through before use (``None``: as drawn); a sharded
        #: loss sets a broadcast from its first rank, so that every rank uses its margins
        self.share_draws: Callable[[torch.Tensor], torch.Tensor] | None = None
        super().__init__(num_classes, embedding_size, **kwargs)

    @property
    def variant(self) -> str:
        """``"arc"`` or ``"cos"``; checked when set, with the current margin in its unit."""
        return self._variant

    @variant.setter
    def variant(self, value: str) -> None:
        value = check_choice(value, "variant", tuple(PAPER_MARGINS))
        margin = self.__dict__.get("_margin")
        if margin is not None:  # the margin in the new variant's unit (radians / a cosine)
            try:
                _margin_check(value)(margin, "margin")
            except ValueError as err:
                raise ValueError(
                    f"variant {value!r} does not take the margin {margin}: {err}"
                ) from None
        self._variant = value

    @property
    def margin(self) -> float:
        """The mean margin ``m`` (radians for arc, a cosine for cos); checked when set."""
        return self._margin

    @margin.setter
    def margin(self, value: float | None) -> None:
        """``None``: the paper's margin for the current variant, as in the constructor."""
        value = PAPER_MARGINS[self.variant] if value is None else value
        self._margin = _margin_check(self.variant)(value, "margin")

    def target_logit_fn(self) -> TargetLogitFn:
        if self.sigma == 0 or not self.training:  # ArcFace's / CosFace's function exactly
            self.last_margins = None
            if self.variant == "arc":
                return TargetWithSlope(arcface_target, arcface_value_and_slope, margin=self.margin)
            return TargetWithSlope(cosface_target, cosface_value_and_slope, margin=self.margin)
        return self._draw_and_apply

    def _draw_and_apply(self, cosine: torch.Tensor) -> torch.Tensor:
        """Draw the ``(B,)`` margins for this step and apply them to the target cosines."""
        noise = torch.randn(cosine.shape, dtype=cosine.dtype, device=cosine.device)
        share = getattr(self, "share_draws", None)  # (absent from older pickles)
        if share is not None:  # a sharded loss: its first rank's draws
            noise = share(noise)
        margins = self.margin + self.sigma * noise
        self.last_margins = values_under_transforms(margins.detach())  # no functorch wrapper
        apply = elastic_arc_target if self.variant == "arc" else elastic_cos_target
        return apply(cosine, margins)
