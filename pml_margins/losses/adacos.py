r"""AdaCos: normalized softmax with the scale set automatically, no margin."""

from __future__ import annotations

import math
from typing import Any

import torch

from pml_margins.functional.margin_softmax import compute_dtype
from pml_margins.losses.class_weight_loss import ClassWeightLoss
from pml_margins.validation import check_count, check_optional_positive

__all__ = ["AdaCosLoss", "adacos_dynamic_scale", "adacos_fixed_scale"]


def adacos_fixed_scale(num_classes: int) -> float:
    r"""AdaCos's fixed scale (Zhang et al., 2019, Eq. 13): :math:`\tilde s_f = \sqrt2\,\log(C-1)`.

    Raises:
        ValueError: ``num_classes < 3`` (the scale would be 0 or undefined).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 3:
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
    :math:`\log B_{avg}` is formed as a log-sum-exp, so it cannot overflow.

    Args:
        cosine: ``(N, C)`` cosines, ``C >= 2``.
        labels: ``(N,)`` target classes.
        scale: the current scale :math:`s`.

    Returns:
        The new scale, a 0-dim tensor in the cosines' dtype (at least float32); no gradient.
    """
    with torch.no_grad():
        cosine = cosine.detach().to(compute_dtype(cosine.dtype))
        index = labels.long().unsqueeze(1)
        logits = (cosine * scale).scatter(1, index, -math.inf)  # non-target logits only
        log_b_avg = torch.logsumexp(logits.flatten(), 0) - math.log(cosine.shape[0])
        theta_med = torch.acos(cosine.gather(1, index).clamp(-1, 1)).median()
        return log_b_avg / torch.cos(theta_med.clamp(max=math.pi / 4))


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

    Single-process it runs on the fused core (``chunk_size``, ``sample_rate``); the
    dynamic scale costs one more ``B x D x C`` product (without gradient) per training
    step. Sharded: ``dynamic=False`` only (the dynamic statistics would need the whole
    batch's logits).

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
        initial = check_optional_positive(scale, "scale")
        initial = adacos_fixed_scale(num_classes) if initial is None else initial
        if not isinstance(dynamic, bool):
            raise TypeError(f"dynamic must be a bool, got {type(dynamic).__name__}")
        self.dynamic = dynamic
        super().__init__(num_classes, embedding_size, **kwargs)
        # float64 until the module is cast: sqrt(2) log(C - 1) is kept exactly
        self.register_buffer("scale", torch.tensor(initial, dtype=torch.float64))

    def logit_scale(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The current scale, once per row (no host synchronisation)."""
        return self.scale.detach().expand(embeddings.shape[0])

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> dict[str, dict[str, Any]]:
        if self.dynamic and self.training:
            with torch.no_grad():
                new = adacos_dynamic_scale(self.cosine(embeddings), labels, self.scale)
                self.scale.copy_(new)
        return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def sharding_unsupported(self) -> str | None:
        """Why this loss cannot be sharded, or ``None`` (read by ShardedMarginSoftmaxLoss)."""
        if self.dynamic:
            return (
                "AdaCosLoss with dynamic=True cannot be sharded: its scale comes from "
                "statistics of the whole batch's logits; use dynamic=False (the fixed scale)"
            )
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={float(self.scale):.4g}"
