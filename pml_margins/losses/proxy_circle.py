r"""Circle loss with class-level labels: class weights as the positive/negative proxies."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from pml_margins.functional.circle import circle_negative_logits, circle_positive_logits
from pml_margins.functional.margin_softmax import TargetLogitFn
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.losses.hyperparameter import Hyperparameter
from pml_margins.validation import check_circle_margin, check_logit_scale

__all__ = ["ProxyCircleLoss"]


class ProxyCircleLoss(ClassWeightLoss):
    r"""Circle loss, class-level form (Sun et al., CVPR 2020, arXiv:2002.10857, Eq. 6 with
    class weights as in AM-Softmax).

    With :math:`s_p = \cos(x, w_y)` and :math:`s_n^j = \cos(x, w_j)`, :math:`j \ne y`:

    .. math::
        L = \log\Big(1 + \sum_{j\ne y} e^{\gamma\alpha_n^j(s_n^j - \Delta_n)}
                         \, e^{-\gamma\alpha_p(s_p - \Delta_p)}\Big)
          = -\log\frac{e^{z_y}}{e^{z_y} + \sum_{j\ne y} e^{z_j}},

    :math:`z_y = \gamma\alpha_p(s_p - \Delta_p)`, :math:`z_j = \gamma\alpha_n^j(s_n^j -
    \Delta_n)`, :math:`\alpha_p = [1 + m - s_p]_+` and :math:`\alpha_n^j = [s_n^j + m]_+`
    detached, :math:`\Delta_p = 1 - m`, :math:`\Delta_n = m`. The right-hand side is a
    softmax cross-entropy with these logits, so the loss runs on the shared fused core
    (target logit :math:`z_y`, every other logit :math:`z_j` through the core's
    non-target function; both are :math:`\gamma` times a function of the cosine, so
    ``get_logits`` gives :math:`\gamma\cos\theta_j`), with ``chunk_size`` and
    ``sample_rate`` like the other class-weight losses.

    Recommended (paper): face recognition ``m = 0.25, gamma = 256``; person re-id
    ``m = 0.25, gamma = 128`` (``m`` is a cosine, unitless, usually in [0, 0.5]; ``gamma`` a
    unitless scale > 0). ``W`` has PML's layout ``(embedding_size, num_classes)``;
    validation, miner weights, reducers and regularizers are those of every
    class-weight loss (:class:`~pml_margins.losses.ClassWeightLoss`).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding width ``D``.
        m: relaxation margin, a real number (as PML; recommended 0.25-0.4).
        gamma: scale, > 0.
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``embedding_regularizer``,
            ``weight_init_func``, ``distance`` -- a ``CosineSimilarity``) and the core's
            ``chunk_size`` / ``sample_rate``.
    """

    hyperparameter_names = ("m", "gamma")
    m = Hyperparameter(check_circle_margin)
    gamma = Hyperparameter(check_logit_scale)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        m: float = 0.25,
        gamma: float = 256.0,
        **kwargs: Any,
    ) -> None:
        self.m, self.gamma = m, gamma
        super().__init__(num_classes, embedding_size, **kwargs)

    def logit_scale(self, embeddings: torch.Tensor) -> float:
        """``gamma``: both logit functions are evaluated unscaled and then scaled by it."""
        return self.gamma

    def target_logit_fn(self) -> TargetLogitFn:
        return partial(circle_positive_logits_as_target, m=self.m, gamma=1.0)

    def non_target_logit_fn(self) -> TargetLogitFn:
        return partial(circle_negative_logits, m=self.m, gamma=1.0)


def circle_positive_logits_as_target(s_p: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    r"""The target logit :math:`z_y = \gamma\alpha_p(s_p - \Delta_p) = -\ell_p`."""
    return -circle_positive_logits(s_p, m, gamma)
