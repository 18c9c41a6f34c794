"""What the losses need to know about ``torch.func`` transforms and ``torch.compile``.

Inside a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) tensors are
functorch's wrappers: the hand-written backwards cannot take them (the losses then run
their plain autograd paths, see :mod:`pml_margins.functional.autograd_switch`) and their
values cannot be read back (the value checks read the plain tensor under the wrappers,
:func:`values_under_transforms`). While ``torch.compile`` traces, neither applies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "in_function_transform",
    "is_batched",
    "is_batched_gradient",
    "is_compiling",
    "values_under_transforms",
]

_FUNCTORCH = getattr(torch._C, "_functorch", None)
_PEEK: Callable[[], object] | None = getattr(_FUNCTORCH, "peek_interpreter_stack", None)
# torch.compiler.is_compiling from torch 2.3; torch._dynamo's before
_COMPILING: Callable[[], bool] = getattr(
    getattr(torch, "compiler", None), "is_compiling", None
) or getattr(getattr(torch, "_dynamo", None), "is_compiling", lambda: False)


def is_compiling() -> bool:
    """Whether ``torch.compile`` (Dynamo) is tracing this call."""
    return bool(_COMPILING())


def in_function_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform (functorch's interpreter stack;
    never while ``torch.compile`` traces, which handles transforms itself)."""
    if _PEEK is None or is_compiling():
        return False
    return _PEEK() is not None


def is_batched(values: torch.Tensor) -> bool:
    """Whether ``torch.func.vmap`` batches ``values`` (at any of its wrappers' levels)."""
    if _FUNCTORCH is None or is_compiling():
        return False
    while _FUNCTORCH.is_functorch_wrapped_tensor(values):
        if _FUNCTORCH.is_batchedtensor(values):
            return True
        values = _FUNCTORCH.get_unwrapped(values)
    return False


def is_batched_gradient(values: torch.Tensor) -> bool:
    """Whether ``values`` (a gradient handed to a custom backward) is batched: by the
    engine's vmap of ``torch.autograd.grad(..., is_grads_batched=True)`` (a legacy
    batched tensor, also under ``jacobian``/``hessian`` with ``vectorize=True``) or by
    ``torch.func.vmap``."""
    if _FUNCTORCH is None or is_compiling():
        return False
    legacy = getattr(_FUNCTORCH, "is_legacy_batchedtensor", None)
    return bool(legacy is not None and legacy(values)) or is_batched(values)


def values_under_transforms(values: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding ``values`` inside ``torch.func`` transforms (else
    ``values``): every wrapper peeled, each ``vmap`` batch dimension moved to the front,
    so that a check reads every lane's values at once (a wrapped tensor cannot be read
    back). Its last dimension is the one of ``values``."""
    if _FUNCTORCH is None or is_compiling():  # dynamo: no eager wrappers
        return values
    while _FUNCTORCH.is_functorch_wrapped_tensor(values):
        if _FUNCTORCH.is_batchedtensor(values):
            level = _FUNCTORCH.maybe_get_level(values)
            inner, batch_dim = _FUNCTORCH._unwrap_batched(values, level)
            values = inner.movedim(batch_dim, 0)
        else:
            values = _FUNCTORCH.get_unwrapped(values)
    return values
