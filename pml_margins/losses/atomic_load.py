"""``load_state_dict`` all or nothing: a state dict that does not fit changes nothing."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["AtomicLoadMixin", "fits_state_dict"]


def fits_state_dict(module: torch.nn.Module, state_dict: object, strict: bool) -> bool:
    """Whether ``module.load_state_dict(state_dict, strict)`` passes torch's own checks:
    a mapping whose entries for the module's parameters and persistent buffers are
    tensors of their shapes (a ``(1,)`` one for a 0-dim entry too, as torch takes it)
    and, if ``strict``, exactly their keys."""
    if not isinstance(state_dict, Mapping):
        return False
    own = module.state_dict(keep_vars=True)
    if strict and own.keys() != state_dict.keys():
        return False
    for key, current in own.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if not torch.overrides.is_tensor_like(value):
            return False
        shape = value.shape
        if current.ndim == 0 and shape == (1,):  # (torch's compatibility with 0.3)
            shape = torch.Size([])
        if not torch.nn.parameter.is_lazy(current) and shape != current.shape:
            return False
    return True


class AtomicLoadMixin:
    """A loss's ``load_state_dict`` that changes nothing when it fails.

    torch copies each entry that fits before it raises for those that do not (a size
    mismatch, a missing or unexpected key): a loss kept the failed checkpoint's running
    statistics (CurricularFace's ``t`` 0 -> 0.75, AdaCos's scale 3.1 -> 7) or ``W``.
    Here a state dict that :func:`fits_state_dict` judges unfit is loaded into a copy of
    the loss, which raises torch's own error, and the loss is left as it was. (Within a
    larger model's ``load_state_dict`` the loss is one module of torch's load.)
    """

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        if not fits_state_dict(self, state_dict, strict):  # type: ignore[arg-type]
            spare: Any = copy.deepcopy(self)  # torch's error, raised by the copy
            torch.nn.Module.load_state_dict(spare, state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
