r"""AdaFace: a margin that adapts to image quality, read from the feature norm."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from pml_margins.functional.autograd_switch import refuse_update_in_function_transform
from pml_margins.functional.margin_softmax import TargetLogitFn
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.losses.step_statistics import StepStatistics
from pml_margins.validation import (
    check_angle_margin,
    check_in_interval,
    check_logit_scale,
)

__all__ = [
    "NORM_RANGE",
    "AdaFaceLoss",
    "adaface_norm_scaler",
    "adaface_target",
    "adaface_update_statistics",
]

#: the largest float32
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: the feature norms are clipped to this range before any statistic (the authors' code)
NORM_RANGE = (0.001, 100.0)


def adaface_update_statistics(
    norms: torch.Tensor, batch_mean: torch.Tensor, batch_std: torch.Tensor, t_alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The running norm statistics after one batch (AdaFace, Eq. 8), without gradient.

    .. math::
        \mu \leftarrow \alpha\,\bar a + (1 - \alpha)\,\mu, \qquad
        \sigma \leftarrow \alpha\,s_a + (1 - \alpha)\,\sigma

    with :math:`\bar a` the mean and :math:`s_a` the unbiased (``N - 1``) standard
    deviation of the batch's ``N`` norms. A batch of one row has no spread: both
    statistics are returned unchanged.

    Returns:
        The new ``(batch_mean, batch_std)``, in the dtype of the norms.
    """
    with torch.no_grad():
        mean, std = batch_mean.to(norms.dtype), batch_std.to(norms.dtype)
        if norms.shape[0] < 2:
            return mean, std
        return (
            norms.mean() * t_alpha + (1 - t_alpha) * mean,
            norms.std() * t_alpha + (1 - t_alpha) * std,
        )


def adaface_norm_scaler(
    norms: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, h: float, eps: float
) -> torch.Tensor:
    r"""The normalized norm of each row (AdaFace, Eq. 7, with the authors' :math:`\epsilon`).

    .. math::
        \hat z_i = \mathrm{clip}\Big(h\,\frac{a_i - \mu}{\sigma + \epsilon}, -1, 1\Big)
    """
    return ((norms - mean) / (std + eps) * h).clamp(-1, 1)


def adaface_target(
    cosine: torch.Tensor, scaler: torch.Tensor, margin: float, eps: float
) -> torch.Tensor:
    r"""AdaFace's target logit (Eq. 10) with a normalized norm :math:`\hat z_i` per row.

    .. math::
        \psi_i(\cos\theta) = \cos\big(\mathrm{clip}(\theta + g_{angle}, \epsilon,
            \pi - \epsilon)\big) - g_{add},\qquad
        g_{angle} = -m\hat z_i,\quad g_{add} = m\hat z_i + m

    with :math:`\theta = \arccos(\mathrm{clip}(\cos\theta, -1 + \epsilon, 1 - \epsilon))`
    (finite gradients at :math:`\cos\theta = \pm1`, where the slope is 0). An
    :math:`\epsilon` below half the unit roundoff of ``cosine``'s dtype (``2^-25`` for
    float32), where :math:`1 - \epsilon` would round to 1 and the clip hold nothing
    (``acos``'s gradient at 1 is infinite: NaN gradients), clips at the dtype's largest
    value below 1 instead.
    """
    scaler = scaler.to(cosine.dtype)
    bound = min(1.0 - eps, 1.0 - torch.finfo(cosine.dtype).eps / 2)  # < 1 in the dtype
    theta = torch.acos(cosine.clamp(-bound, bound))
    angle = (theta - margin * scaler).clamp(eps, math.pi - eps)
    return torch.cos(angle) - margin * (scaler + 1)


def _check_eps(value: object, name: str) -> float:
    return check_in_interval(value, name, 0.0, 1.0, low_inclusive=False, high_inclusive=False)


class AdaFaceLoss(ClassWeightLoss):
    r"""AdaFace (Kim et al., CVPR 2022, arXiv:2204.00964): the margin follows image quality.

    The feature norm :math:`a_i = \mathrm{clip}(\|x_i\|, 0.001, 100)` is the quality
    proxy (no gradient flows through it). Normalized by running batch statistics
    (:func:`adaface_update_statistics`, :func:`adaface_norm_scaler`),
    :math:`\hat z_i \in [-1, 1]` moves the target logit from ArcFace's
    :math:`\cos(\theta + m)` (low norm, :math:`\hat z = -1`: easy samples emphasized)
    through CosFace's :math:`\cos\theta - m` (:math:`\hat z = 0`) to
    :math:`\cos(\theta - m) - 2m` (high norm, :math:`\hat z = 1`: hard samples
    emphasized):

    .. math::
        L_i = -\log\frac{e^{s\,\psi_i(\cos\theta_{y_i})}}
              {e^{s\,\psi_i(\cos\theta_{y_i})} + \sum_{j\ne y_i} e^{s\cos\theta_j}}

    with :math:`\psi_i` from :func:`adaface_target`. :math:`\hat z = 0` (``h = 0``, or
    a norm equal to :math:`\mu`) is CosFace with margin ``m``, except for target cosines
    beyond :math:`\pm(1 - \epsilon)` (``eps``), which the code's clip holds at
    :math:`\pm(1 - \epsilon) - m` (with a zero slope).

    **Statistics.** The buffers ``batch_mean`` (start 20) and ``batch_std`` (start 100)
    are the running mean and unbiased standard deviation of the norms, moved with
    momentum ``t_alpha`` at each **training** step, before the step's
    :math:`\hat z` is formed from them (the authors' order); in eval mode they are
    only read. They are in the state dict, so a checkpoint resumes with them.

    **Where the paper's text and its code differ**, this follows the code: the
    :math:`\epsilon` added to :math:`\sigma`; the norm clipped to ``NORM_RANGE`` and
    detached; :math:`\theta + g_{angle}` clipped to :math:`[\epsilon, \pi-\epsilon]`;
    the initial buffers 20 and 100; the unbiased standard deviation (``torch.std``'s,
    which the code uses; the paper does not say). Unlike the code: the cosines are
    clipped to :math:`[-1+\epsilon, 1-\epsilon]` for the target only (the code also
    clips the non-target logits, which differs only where a non-target
    :math:`|\cos| > 1 - \epsilon`); the statistics move in training mode only (the
    code moves them whenever its head runs, which is in training); a batch of one row
    leaves them unchanged (its unbiased spread is undefined; the code would store NaN).
    ``t_alpha`` defaults to the paper's and training scripts' 0.01.

    **Units:** ``margin`` is both an angle (radians) and a cosine offset; ``h`` is a
    fraction of a standard deviation; the norms are the backbone's. Recommended
    (paper, faces): ``m = 0.4``, ``h = 0.333`` (about 68 % of the rows get
    :math:`|\hat z| < 0.333`), ``s = 64``, ``t_alpha = 0.01``. The statistics
    normalize the norms, so no norm range is tuned for a small retrieval backbone;
    take ``s`` 16-32 there, as for ArcFace/CosFace.

    The margin changes only the target logit, so the loss runs on the fused core
    (``chunk_size``, ``sample_rate``) and sharded
    (:class:`~pml_margins.distributed.ShardedMarginSoftmaxLoss`: the statistics come
    from the gathered batch, the same on every rank, so the buffers are equal on every
    rank and to the single-process loss's on that batch).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        margin: ``m`` in ``[0, pi)``.
        h: ``h >= 0``, how far the margin moves with the normalized norm.
        scale: ``s > 0``.
        t_alpha: momentum of the running statistics, in ``[0, 1]`` (1: this batch only).
        eps: ``epsilon`` in ``(0, 1)``.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``) and the core's
            ``chunk_size`` / ``sample_rate``.
    """

    hyperparameter_names = ("margin", "h", "scale", "t_alpha", "eps")
    statistic_buffers = ("batch_mean", "batch_std")
    margin = Hyperparameter(check_angle_margin)
    # h only scales a clipped ratio: any value float32 holds (beyond, inf: 0 * inf = NaN)
    h = Hyperparameter(partial(check_in_interval, low=0.0, high=FLOAT32_MAX))
    scale = Hyperparameter(check_logit_scale)
    t_alpha = Hyperparameter(partial(check_in_interval, low=0.0, high=1.0))
    eps = Hyperparameter(_check_eps)
    batch_mean: torch.Tensor
    batch_std: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.4,
        h: float = 0.333,
        scale: float = 64.0,
        t_alpha: float = 0.01,
        eps: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        self.margin, self.h, self.scale, self.t_alpha, self.eps = margin, h, scale, t_alpha, eps
        self._scaler: torch.Tensor | None = None
        super().__init__(num_classes, embedding_size, **kwargs)
        for name, value in self.initial_statistics().items():
            self.register_buffer(name, torch.tensor(value))

    def initial_statistics(self) -> dict[str, float]:
        """The authors' starting norm statistics: mean 20, standard deviation 100."""
        return {"batch_mean": 20.0, "batch_std": 100.0}

    def check_statistic(self, name: str, value: torch.Tensor) -> None:
        """A loaded ``batch_std`` must be finite and ``>= 0`` (the norms' spread)."""
        super().check_statistic(name, value)
        if name == "batch_std" and bool((value < 0).any()):
            raise ValueError(f"batch_std must be >= 0 (a standard deviation), got {value}")

    @contextmanager
    def prepare_step(
        self, embeddings: torch.Tensor, labels: torch.Tensor, statistics: StepStatistics
    ) -> Iterator[None]:
        """Update the running statistics (training only), then the step's normalized norms."""
        norms = self.feature_norms(embeddings).detach().clamp(*NORM_RANGE)
        if self.training:
            refuse_update_in_function_transform(self, "its norm statistics")
            mean, std = adaface_update_statistics(
                norms, self.batch_mean, self.batch_std, self.t_alpha
            )
            self.batch_mean.copy_(mean)
            self.batch_std.copy_(std)
        mean, std = self.batch_mean.to(norms.dtype), self.batch_std.to(norms.dtype)
        self._scaler = adaface_norm_scaler(norms, mean, std, self.h, self.eps)
        try:
            yield
        finally:
            self._scaler = None

    def target_logit_fn(self) -> TargetLogitFn:
        if self._scaler is None:
            raise RuntimeError(
                "AdaFaceLoss's target logits depend on the embeddings' norms: call the loss "
                "(its forward), not target_logit_fn on its own"
            )
        return partial(adaface_target, scaler=self._scaler, margin=self.margin, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.statistics_repr('batch_mean', 'batch_std')}"
