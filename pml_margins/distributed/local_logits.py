r"""Cosine logits of the gathered batch against a weight shard, with an analytic backward.

.. math::
    z_{ij} = \hat x_i^\top w_j \,/\, \|w_j\|, \qquad \hat x_i = x_i / \|x_i\|

PML's ``CosineSimilarity`` normalizes ``W`` into a copy that autograd keeps for
the backward, and differentiating that normalization makes more ``W``-sized
temporaries: on a shard of a million-class head these, not the logits, set
the peak memory. Here nothing ``W``-sized is saved or built besides the
gradient itself: with :math:`G = \partial L/\partial z` and
:math:`r_j = 1/\|w_j\|`,

.. math::
    \frac{\partial L}{\partial \hat x_i} = \sum_j G_{ij} r_j w_j, \qquad
    \frac{\partial L}{\partial w_j} = r_j \sum_i G_{ij}\hat x_i
        - r_j^2 \Big(\sum_i G_{ij} z_{ij}\Big) w_j

(``z`` is recomputed in the backward, one extra ``N x D x C`` product). A column of norm
below ``F.normalize``'s ``eps`` is divided by ``eps`` instead, with no radial term, as there.
"""

from __future__ import annotations

import torch

from pml_margins.functional.autograd_switch import SHARDED_REMEDY, backward_once
from pml_margins.functional.margin_softmax import (
    compute_dtype,
    products_dtype,
    takes_unit_columns,
)
from pml_margins.functional.saved_inputs import save_inputs

__all__ = ["cosine_logits"]

_EPS = 1e-12  # torch.nn.functional.normalize's, which PML's distances use


class _CosineLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        device_type = x_hat.device.type
        with torch.autocast(device_type, enabled=False):
            norms = torch.linalg.vector_norm(weight, dim=0)
            inv_norm = norms.clamp_min(_EPS).reciprocal_()
            # r_j^2 where |w_j| >= eps, else 0: F.normalize's clamp passes the gradient at
            # equality and stops the norm's (the radial term) below it
            radial_scale = (inv_norm * inv_norm).masked_fill_(norms < _EPS, 0.0)
        save_inputs(ctx, x_hat, weight, inv_norm, radial_scale)
        if takes_unit_columns(products_dtype(compute_dtype(x_hat.dtype), device_type)):
            return x_hat @ (weight * inv_norm)  # float16 products: raw columns may leave its range
        return (x_hat @ weight).mul_(inv_norm)

    @staticmethod
    @backward_once("the sharded cosine logits", SHARDED_REMEDY)
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x_hat, weight, inv_norm, radial_scale = ctx.saved_tensors
        scaled_grad = grad * inv_norm
        grad_x = scaled_grad @ weight.t() if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            z = (x_hat @ weight).mul_(inv_norm)
            coef = (z.mul_(grad)).sum(dim=0).mul_(radial_scale)
            grad_w = (x_hat.t() @ scaled_grad).addcmul_(weight, coef, value=-1)
        return grad_x, grad_w


def cosine_logits(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos(theta_ij)`` of ``embeddings`` ``(N, D)`` and the columns of ``weight`` ``(D, C)``.

    Equal to PML's ``CosineSimilarity()(embeddings, weight.t())`` (up to rounding),
    with less memory; both arguments get gradients.

    Example:
        >>> from pytorch_metric_learning.distances import CosineSimilarity
        >>> x, w = torch.randn(3, 4), torch.randn(4, 5)
        >>> torch.allclose(cosine_logits(x, w), CosineSimilarity()(x, w.t()), atol=1e-6)
        True
    """
    x_hat = torch.nn.functional.normalize(embeddings.to(weight.dtype), dim=1)
    return _CosineLogits.apply(x_hat, weight)
