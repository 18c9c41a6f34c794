"""``load_state_dict`` all or nothing: a state dict that does not fit changes nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["AtomicLoadMixin", "fits_state_dict", "restored_on_error"]


def fits_state_dict(
    module: torch.nn.Module, state_dict: object, strict: bool, assign: bool = False
) -> bool:
    """Whether ``module.load_state_dict(state_dict, strict, assign)`` is sure to pass
    torch's own checks: a mapping whose entries for the module's parameters and persistent
    buffers are strided tensors of their shapes (a ``(1,)`` one for a 0-dim entry too, as
    torch takes it), not on the meta device unless the module's is, floating where
    ``assign`` makes them parameters that need gradients, and, if ``strict``, exactly their
    keys (extra state is the module's ``set_extra_state``'s to judge). ``False`` where in
    doubt: the load then runs with a snapshot to restore."""
    if not isinstance(state_dict, Mapping):
        return False
    own = module.state_dict(keep_vars=True)
    if strict and own.keys() != state_dict.keys():
        return False
    for key, current in own.items():
        if key not in state_dict or key.rpartition(".")[2] == "_extra_state":
            continue  # (extra state: the module's set_extra_state judges it)
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            return False
        if value.is_meta and not current.is_meta:
            return False
        if assign and current.requires_grad and not value.is_floating_point():
            return False
        shape = value.shape
        if current.ndim == 0 and shape == (1,):  # (torch's compatibility with 0.3)
            shape = torch.Size([])
        if not torch.nn.parameter.is_lazy(current) and shape != current.shape:
            return False
    return True


@contextlib.contextmanager
def restored_on_error(module: torch.nn.Module) -> Iterator[None]:
    """Within: an exception puts back every parameter and buffer of ``module`` and its
    submodules, the same objects (``assign=True`` replaces them) with their values, and
    the extra state of those that keep one (``get_extra_state``)."""
    held = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    extra = [
        (m, m.get_extra_state())
        for m in module.modules()
        if type(m).get_extra_state is not torch.nn.Module.get_extra_state
    ]
    tensors = {
        id(t): t for _, params, buffers in held for t in (*params.values(), *buffers.values())
    }
    tensors.pop(id(None), None)
    values = {key: t.detach().clone() for key, t in tensors.items()}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, params, buffers in held:
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
            for key, t in tensors.items():
                t.copy_(values[key])
        for m, state in extra:
            m.set_extra_state(state)
        raise


class AtomicLoadMixin:
    """A loss's ``load_state_dict`` that changes nothing when it fails.

    torch copies each entry that fits before it raises for those that do not (a size
    mismatch, a missing or unexpected key): a loss kept the failed checkpoint's running
    statistics (CurricularFace's ``t`` 0 -> 0.75, AdaCos's scale 3.1 -> 7) or ``W``.
    Here a state dict that :func:`fits_state_dict` does not vouch for loads with a
    snapshot of the loss's tensors (:func:`restored_on_error`), put back if torch raises
    (its own error); one that fits loads as in torch, with no copy. With a
    ``load_state_dict`` pre-hook of the user's (which may rename keys) it is torch's load.
    Within a larger model's ``load_state_dict`` the loss is one module of torch's load.
    """

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        module: Any = self
        hooked = any(m._load_state_dict_pre_hooks for m in module.modules())
        if hooked or fits_state_dict(module, state_dict, strict, assign):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        with restored_on_error(module):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
