"""``load_state_dict`` all or nothing: a state dict that does not fit changes nothing."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["AtomicLoadMixin", "fits_state_dict", "load_all_or_nothing", "restored_on_error"]


def _loaded_entries(module: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, tensor)`` of what torch's load reads: parameters, persistent buffers and
    extra state (tensor ``None``) of ``module`` and its submodules (not ``state_dict()``,
    which a user's hook may change)."""
    for name, value in module._parameters.items():
        if value is not None:
            yield prefix + name, value
    for name, value in module._buffers.items():
        if value is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, value
    if type(module).get_extra_state is not torch.nn.Module.get_extra_state:
        yield prefix + "_extra_state", None
    for name, child in module._modules.items():
        if child is not None:
            yield from _loaded_entries(child, f"{prefix}{name}.")


def _atomic(function: object) -> bool:
    """Whether ``function`` is marked ``keeps_load_atomic``: it raises, if at all, before
    the load changes anything (a check), or only adds a default entry."""
    return bool(getattr(function, "keeps_load_atomic", False))


def _load_code_of_its_own(module: torch.nn.Module) -> bool:
    """Whether a module in ``module`` runs load code that may fail after tensors were
    copied: a load hook, a ``_load_from_state_dict`` override or extra state (its
    ``set_extra_state``), unless marked ``keeps_load_atomic``."""
    own_load = torch.nn.Module._load_from_state_dict
    for m in module.modules():
        hooks = (*m._load_state_dict_pre_hooks.values(), *m._load_state_dict_post_hooks.values())
        if not all(_atomic(getattr(hook, "hook", hook)) for hook in hooks):
            return True
        load = type(m)._load_from_state_dict
        if load is not own_load and not _atomic(load):
            return True
        extra = type(m).get_extra_state is not torch.nn.Module.get_extra_state
        if extra and not _atomic(type(m).set_extra_state):
            return True
    return False


#: dtypes a copy into a floating tensor takes without a warning or an error
_REAL_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
)


def _copies_cleanly(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether ``copy_`` from ``source`` into ``target`` neither warns (complex into
    real) nor fails (bit and quantized dtypes): real dtypes into a floating one."""
    return source in _REAL_DTYPES and target.is_floating_point


def fits_state_dict(
    module: torch.nn.Module, state_dict: object, strict: bool, assign: bool = False
) -> bool:
    """Whether ``module.load_state_dict(state_dict, strict, assign)`` is sure to pass
    torch's own checks, with no load code of a module's own that may fail after tensors
    were copied (:func:`_load_code_of_its_own`): a mapping whose entries for the
    module's parameters and persistent buffers are plain strided tensors of their shapes
    (a ``(1,)`` one for a 0-dim entry too, as torch takes it), not on the meta device
    unless the module's is (and the module's not inference tensors), floating and not
    inference tensors where ``assign`` makes them parameters that need gradients, and,
    if ``strict``, exactly their keys (extra state: see above). ``False`` where in
    doubt: the load then runs with a snapshot to restore."""
    if not isinstance(state_dict, Mapping):
        return False
    if _load_code_of_its_own(module):
        return False
    own = dict(_loaded_entries(module))
    if strict and own.keys() != state_dict.keys():
        return False
    for key, current in own.items():
        if key not in state_dict or current is None:
            continue  # (extra state: the module's set_extra_state judges it)
        value = state_dict[key]
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            return False
        if value.is_nested or value.layout != torch.strided or value.is_quantized:
            return False
        if value.is_meta != current.is_meta or current.is_inference():
            return False
        if value.dtype != current.dtype and not _copies_cleanly(value.dtype, current.dtype):
            return False
        if (
            assign
            and current.requires_grad
            and (not value.is_floating_point() or value.is_inference())
        ):
            return False
        shape = value.shape
        if current.ndim == 0 and shape == (1,):  # (torch's compatibility with 0.3)
            shape = torch.Size([])
        if not torch.nn.parameter.is_lazy(current) and shape != current.shape:
            return False
    return True


def _copied(state: Any) -> Any:
    """A deep copy of extra state (a live object would change with the load), or the
    object itself where it cannot be copied (a lock)."""
    try:
        return copy.deepcopy(state)
    except Exception:
        return state


@contextlib.contextmanager
def restored_on_error(module: torch.nn.Module) -> Iterator[None]:
    """Within: an exception puts back every parameter and buffer of ``module`` and its
    submodules, the same objects (``assign=True`` replaces them) with their values, and
    the extra state of those that keep one (``get_extra_state``)."""
    held = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    extra = [
        (m, _copied(m.get_extra_state()))
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
    except BaseException as error:
        try:
            with torch.no_grad():
                for m, params, buffers in held:
                    m._parameters.clear()
                    m._parameters.update(params)
                    m._buffers.clear()
                    m._buffers.update(buffers)
                for key, t in tensors.items():
                    inference = torch.inference_mode() if t.is_inference() else None
                    with inference or contextlib.nullcontext():  # (an inference tensor takes
                        t.copy_(values[key])  # it in inference mode)
            for m, state in extra:
                if type(m).set_extra_state is not torch.nn.Module.set_extra_state:
                    m.set_extra_state(state)
        except Exception as failed:  # the load's error stays the one raised
            note = getattr(error, "add_note", None)  # (Python >= 3.11)
            if note is not None:
                note(f"(restoring the module after it also failed: {failed!r})")
        raise


class AtomicLoadMixin:
    """A loss's ``load_state_dict`` that changes nothing when it fails.

    torch copies each entry that fits before it raises for those that do not (a size
    mismatch, a missing or unexpected key): a loss kept the failed checkpoint's running
    statistics (CurricularFace's ``t`` 0 -> 0.75, AdaCos's scale 3.1 -> 7) or ``W``.
    Here a state dict that :func:`fits_state_dict` does not vouch for (or a loss with load
    hooks of the user's, which may rename keys or raise) loads with a snapshot of the
    loss's tensors (:func:`restored_on_error`), put back if the load raises (torch's own
    error); one that fits loads as in torch, with no copy. Within a larger model's
    ``load_state_dict`` the loss is one module of torch's load.
    """

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        return load_all_or_nothing(self, super().load_state_dict, state_dict, strict, assign)  # type: ignore[misc]


def load_all_or_nothing(
    module: Any, load: Callable[..., Any], state_dict: Any, strict: bool, assign: bool
) -> Any:
    """``load(state_dict, strict=, assign=)`` of ``module``: directly where the state dict
    fits (:func:`fits_state_dict`), else within :func:`restored_on_error`."""
    if fits_state_dict(module, state_dict, strict, assign):
        return load(state_dict, strict=strict, assign=assign)
    with restored_on_error(module):
        return load(state_dict, strict=strict, assign=assign)
