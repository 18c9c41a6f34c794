"""Hand-written backward passes, and the switch for gradients of gradients.

The fast paths (the fused and dense margin softmax, the dense Circle loss, the
sharded softmax) are autograd functions whose backward is written by hand from
values the forward saved without a graph: their gradients are exact, but not
differentiable again. A backward run with ``create_graph=True`` (a gradient
penalty, meta-learning, Hessian-vector products) would differentiate only the part
of the graph around them -- a silently wrong second derivative. So they refuse
``create_graph=True`` with a ``RuntimeError`` that names the switch, and
:class:`autograd_only` routes every loss to its plain path, differentiated by
torch's autograd alone (slower, more memory; twice differentiable)::

    import pml_margins

    with pml_margins.autograd_only():
        loss = loss_fn(embeddings, labels)
        (grad,) = torch.autograd.grad(loss, embeddings, create_graph=True)
        (loss + grad.square().sum()).backward()

Inside a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``hessian``, per-sample
gradients by ``vmap(grad(...))``) the losses take the plain paths by themselves.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import forward_ad

from pml_margins.function_transforms import in_function_transform, is_batched_gradient
from pml_margins.thread_switch import ThreadSwitch

__all__ = [
    "SHARDED_REMEDY",
    "SOFTMAX_REMEDY",
    "autograd_only",
    "autograd_only_enabled",
    "backward_once",
    "has_forward_tangent",
    "plain_autograd_needed",
    "refuse_update_in_function_transform",
]

#: what the margin softmax's hand-written backwards suggest under ``create_graph=True``
SOFTMAX_REMEDY = (
    "run the loss (or fused_margin_softmax_cross_entropy) under pml_margins.autograd_only(), "
    "or call margin_softmax_cross_entropy on the logits directly"
)
#: what a sharded loss's hand-written backward suggests under ``create_graph=True``
SHARDED_REMEDY = "sharded losses have no autograd-only path: compute the loss in one process"


def autograd_only_enabled() -> bool:
    """Whether losses in this thread run on their plain autograd paths: under
    :class:`autograd_only`, and inside a ``torch.func`` transform (``grad``, ``vmap``,
    ``jvp``, ``hessian``, ...), whose tensors the hand-written backwards cannot take."""
    return autograd_only.current() or in_function_transform()


def plain_autograd_needed() -> bool:
    """Whether a hand-written backward cannot give the derivatives asked for:
    :func:`autograd_only_enabled`, or a forward-mode dual level entered
    (``torch.autograd.forward_ad``: custom backwards without a ``jvp`` drop tangents, and
    one may ride on the inputs or on anything a margin or scale function closes over)."""
    return autograd_only_enabled() or _dual_level_entered()


def _dual_level_entered() -> bool:
    """Whether a ``forward_ad.dual_level`` is entered (a torch without the attribute: yes)."""
    return getattr(forward_ad, "_current_level", 0) >= 0


def has_forward_tangent(value: object) -> bool:
    """Whether ``value`` is a tensor carrying a forward-mode tangent
    (``torch.autograd.forward_ad``)."""
    if not _dual_level_entered():  # no tangent anywhere
        return False
    return isinstance(value, torch.Tensor) and forward_ad.unpack_dual(value).tangent is not None


def refuse_update_in_function_transform(owner: object, statistics: str) -> None:
    """``RuntimeError`` inside a ``torch.func`` transform, where ``owner`` would update its
    running ``statistics`` in place (a tensor the transform captured: not allowed)."""
    if in_function_transform():
        raise RuntimeError(
            f"{type(owner).__name__} updates {statistics} in training mode, which a "
            "torch.func transform cannot do (it changes a tensor the transform captured): "
            "put the loss in eval mode for the transform (loss.eval(): the statistics stay "
            "as they are), as for BatchNorm"
        )


class autograd_only(ThreadSwitch):
    """Run every loss on its plain, autograd-only path: from now on, or inside a block
    (``with``), or around a function (as a decorator).

    On: the class-weight losses form their ``(B, C)`` logits and differentiate them
    with autograd (a loss's ``chunk_size`` and ``sample_rate`` are then refused: they
    exist only on the fused core; the function
    :func:`~pml_margins.functional.fused_margin_softmax_cross_entropy` samples its
    classes first and refuses ``chunk_size``), :class:`~pml_margins.losses.CircleLoss`
    gathers its pairs; the
    values and gradients are those of the fast paths (to rounding; one exception: a
    ``NormSoftmaxLoss`` column of ``W`` with norm below ``1e-12``, which the plain path
    normalizes twice, as PML does, and the fast path once), and the gradients can be
    differentiated again. The setting is per thread, like autograd's
    (:class:`~pml_margins.thread_switch.ThreadSwitch`).

    Args:
        enabled: ``True`` (default) for the autograd paths, ``False`` for the fast ones.
    """

    _state = threading.local()
    default = False

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled)


def backward_once(
    what: str, remedy: str = "run the forward under pml_margins.autograd_only()"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a hand-written ``backward``: run it without a graph, and refuse
    ``create_graph=True`` (grad mode on during the backward) with a ``RuntimeError`` that
    names ``what`` and the ``remedy`` (default: :class:`autograd_only`). Batched incoming
    gradients (``torch.autograd.grad(..., is_grads_batched=True)``, a
    ``jacobian``/``hessian`` with ``vectorize=True``) run it under vmap: where one of its
    ops cannot be batched (an in-place op on an unbatched buffer, an ``out=`` product),
    vmap's error is re-raised as one that names ``what`` and the ``remedy``.

    ``torch.autograd.function.once_differentiable`` raises only when the incoming
    gradient itself requires grad, which it does not under a loss's mean; its gradients
    then carry no graph, and a second differentiation silently drops this function's
    part (or, with explicit inputs, fails with autograd's "not used in the graph").
    """
    message = (
        f"{what} has a hand-written backward that cannot be differentiated again "
        f"(create_graph=True); {remedy} for gradients of gradients"
    )
    batched = (
        f"{what} has a hand-written backward that cannot take batched gradients "
        "(is_grads_batched=True, jacobian or hessian with vectorize=True: vmap cannot batch "
        "its in-place ops); "
        f"{remedy} for them"
    )

    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Any) -> Any:
            if torch.is_grad_enabled():
                raise RuntimeError(message)
            if not any(isinstance(g, torch.Tensor) and is_batched_gradient(g) for g in grads):
                return backward(ctx, *grads)
            try:  # (some backwards batch: the dense Circle loss's)
                return backward(ctx, *grads)
            except RuntimeError as error:  # vmap's, about an op of the backward
                raise RuntimeError(batched) from error

        return wrapper

    return decorate
