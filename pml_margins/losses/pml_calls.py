"""What PML's own calls of a loss's distance and reducer do, where a loss skips the call."""

from __future__ import annotations

import torch
from torch.nn.modules import module as torch_module

__all__ = ["record_distance_stats", "runs_as_its_class"]


#: per class, the names of its callable attributes (a dict: ``torch.compile`` traces it)
_CLASS_CALLABLES: dict[type, frozenset[str]] = {}


def _class_callables(cls: type) -> frozenset[str]:
    """The names of ``cls``'s callable attributes (its methods)."""
    names = _CLASS_CALLABLES.get(cls)
    if names is None:
        names = frozenset(name for name in dir(cls) if callable(getattr(cls, name, None)))
        _CLASS_CALLABLES[cls] = names
    return names


def runs_as_its_class(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs only its class's code: no hook of its own nor a
    global one (which PML's call of it would fire) and no method replaced on the
    instance. Only then may a loss compute what the module's class computes instead of
    calling it (a distance's cosines in the fused core, a ``MeanReducer``'s mean)."""
    if (  # (spelled out: a step of a small problem calls this twice)
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    ):
        return False
    state = vars(module)
    if (
        state.get("_forward_hooks")
        or state.get("_forward_pre_hooks")
        or state.get("_backward_hooks")
        or state.get("_backward_pre_hooks")
    ):
        return False
    return _class_callables(type(module)).isdisjoint(state)


def record_distance_stats(distance: object, query: torch.Tensor, ref: torch.Tensor) -> None:
    """The statistics PML's ``distance(query, ref)`` records when it collects them (the
    query and reference norms before and after its normalization), without computing the
    distances: for a loss that forms them its own way."""
    if not getattr(distance, "collect_stats", False):
        return
    with torch.no_grad():
        query, ref = query.detach(), ref.detach()
        distance.reset_stats()
        distance.set_default_stats(
            query, ref, distance.maybe_normalize(query), distance.maybe_normalize(ref)
        )
