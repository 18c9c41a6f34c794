"""Running statistics that stay float32 when a loss is cast to half precision."""

from __future__ import annotations

from numbers import Real
from typing import Any

import torch

__all__ = ["FloatStatisticsMixin", "as_statistic"]


class FloatStatisticsMixin:
    """Keeps the buffers named in :attr:`statistic_buffers` float32 through
    ``nn.Module._apply`` (``.to``, ``.half``, ``.bfloat16``, ...).

    A moving average in float16/bfloat16 stalls: an update ``alpha (r - t)`` below half
    a unit in the last place of ``t`` rounds away (a bfloat16 Center-loss centre moving
    from 0 to the batch mean 10 stops at 9.25 with ``alpha = 0.05``). A buffer the cast
    would make half precision becomes float32 from its value before the cast (not
    rounded to half first).
    """

    #: names of the running-statistic buffers (absent or non-buffer names are skipped)
    statistic_buffers: tuple[str, ...] = ()

    def initial_statistics(self) -> dict[str, float]:
        """Each running statistic's value at construction (every element of it), which
        :meth:`reset_running_stats` restores."""
        return {}

    def statistics_repr(self, *names: str) -> str:
        """``name=value`` of each one-value running statistic in ``names``, for
        ``extra_repr``: ``4.5`` (4 significant digits), or ``meta`` where the buffer is on
        the meta device (a loss built there has no values yet, and printing a model that
        holds it must not fail)."""
        shown = []
        for name in names:
            value = getattr(self, name)
            shown.append(f"{name}={'meta' if value.is_meta else format(float(value), '.4g')}")
        return ", ".join(shown)

    def reset_running_stats(self) -> None:
        """Every running statistic back to its value at construction, in place (dtype,
        device and shape kept), as ``BatchNorm``'s method of that name: after ``to_empty``
        (a loss built on the meta device) the buffers hold whatever memory they got."""
        buffers = self._buffers  # type: ignore[attr-defined]
        with torch.no_grad():
            for name, value in self.initial_statistics().items():
                buffer = buffers.get(name)
                if buffer is not None:
                    buffer.fill_(value)

    def statistics_kept(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        """The running statistics (:attr:`statistic_buffers`) that a training step may move,
        each with a copy and its version counter, for :meth:`restore_statistics` if the step
        fails; empty in eval mode, where none moves."""
        kept: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        if not self.training:  # type: ignore[attr-defined]
            return kept
        buffers = self._buffers  # type: ignore[attr-defined]
        for name in self.statistic_buffers:  # (a loop: dynamo broke the graph on a
            value = buffers.get(name)  # comprehension with an assignment expression)
            # an inference tensor has no version counter (and is updated in inference
            # mode only, where no copy can be put back either): not kept
            if isinstance(value, torch.Tensor) and not value.is_inference():
                kept[name] = (value, value.detach().clone(), value._version)
        return kept

    def restore_statistics(self, saved: dict[str, tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """Put back the running statistics :meth:`statistics_kept` kept, those the step
        changed in place (a statistic left alone is not written: under a ``torch.func``
        transform, which refuses the update, a copy into it would fail in turn)."""
        with torch.no_grad():
            for held, value, version in saved.values():
                if held._version != version:
                    held.copy_(value)

    def __setattr__(self, name: str, value: Any) -> None:
        """``loss.<statistic> = value`` is checked as a loaded statistic is
        (:meth:`check_statistic`: a NaN ``t`` gave NaN losses, a negative ``batch_std``
        was taken) and held as one (no graph, float32 at least); a number goes into the
        buffer's dtype and device where the statistic is one value, and a one-element
        tensor takes its shape; a tensor is copied (the steps update the statistic in
        place: an assigned tensor, a buffer of another loss, moved with it), except the
        state dict's own under ``load_state_dict(assign=True)``. ``None``
        (which would remove the statistic from the state dict and fail at the next step)
        and another shape are refused."""
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and name in self.statistic_buffers and name in buffers:
            value = self._checked_statistic(name, value, buffers[name])
        super().__setattr__(name, value)

    def _checked_statistic(self, name: str, value: Any, current: Any) -> Any:
        """``value`` as :meth:`__setattr__` holds the statistic ``name`` (now ``current``)."""
        if value is None:
            raise TypeError(
                f"{name} is {type(self).__name__}'s running statistic: give a tensor or "
                "a number (reset_running_stats() restores its initial value)"
            )
        if not isinstance(current, torch.Tensor):
            return value
        if not isinstance(value, torch.Tensor):
            if current.numel() != 1 or isinstance(value, bool) or not isinstance(value, Real):
                return value  # (nn.Module's own TypeError names it)
            value = torch.tensor(float(value), dtype=torch.float64).to(current)
        _check_real(name, value)
        if value.is_meta and not current.is_meta:
            raise ValueError(
                f"{name}: a tensor on the meta device, which holds no value for "
                f"{type(self).__name__}'s running statistic on {current.device}"
            )
        if not value.is_meta:
            self.check_statistic(name, value)  # (as given: a subclass may refuse a graph)
        if value.shape != current.shape:
            if value.numel() != 1 or current.numel() != 1:
                raise ValueError(
                    f"{name} must have the shape {tuple(current.shape)} of "
                    f"{type(self).__name__}'s running statistic, got {tuple(value.shape)}"
                )
            value = value.reshape(current.shape)
        held = as_statistic(value)
        loading = self.__dict__.get("_assigning_loaded", False)  # (load_state_dict's assign)
        shares = held.untyped_storage().data_ptr() == value.untyped_storage().data_ptr()
        if shares and not loading:
            held = held.clone()  # its own copy: the steps update it in place
        if not held.is_meta:
            self.check_statistic(name, held)  # as held (1e-300 in float32 is 0)
        return held

    def check_statistic(self, name: str, value: torch.Tensor) -> None:
        """``ValueError`` for a value of the statistic ``name`` that a state dict may not
        load (default: NaN or Inf); a subclass adds its own bounds."""
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{type(self).__name__} got a non-finite {name} "
                f"({value.flatten()[:4].tolist()}...): it would give NaN losses"
            )

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        """The statistics checked (:meth:`check_statistic`) before anything loads: a copy
        into the buffer (``load_state_dict``'s default) took any value."""
        self.check_statistics(state_dict, prefix)
        self.__dict__["_assigning_loaded"] = True  # assign=True: the state dict's tensors
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
        finally:
            self.__dict__.pop("_assigning_loaded", None)
        buffers = self._buffers  # type: ignore[attr-defined]
        for name in self.statistic_buffers:  # assign=True takes the state dict's tensor:
            value = buffers.get(name)  # an integer or half one would stall (see above),
            if value is not None and not value.is_meta:  # one with a graph fail in place
                buffers[name] = as_statistic(value)

    # it checks before torch's load and only casts after: a load stays all or nothing
    _load_from_state_dict.keeps_load_atomic = True  # type: ignore[attr-defined]

    def check_statistics(self, state_dict: Any, prefix: str = "") -> None:
        """:meth:`check_statistic` of each statistic in ``state_dict`` (keys ``prefix +
        name``; any real dtype, which the load makes float; complex: ``ValueError``)."""
        for name in self.statistic_buffers:
            value = state_dict.get(prefix + name)
            if not isinstance(value, torch.Tensor) or value.is_meta:
                continue
            _check_real(name, value)  # (a copy would drop the imaginary part, unchecked)
            self.check_statistic(name, value)  # (as given: a subclass may refuse a graph)
            value = value.detach()
            # as it will be held: copied into the buffer's dtype (1e300 into float32 is
            # inf, 1e-300 is 0), or, assigned, float32 at least
            current = self._buffers.get(name)  # type: ignore[attr-defined]
            held = {as_statistic(value).dtype}
            if current is not None and current.is_floating_point():
                held.add(current.dtype)
            for dtype in held - {value.dtype}:
                self.check_statistic(name, value.to(dtype))

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        buffers = self._buffers  # type: ignore[attr-defined]
        kept = {
            name: value
            for name in self.statistic_buffers
            if (value := buffers.get(name)) is not None and value.is_floating_point()
        }
        super()._apply(fn, recurse)  # type: ignore[misc]
        for name, before in kept.items():
            value = buffers.get(name)
            if value is not None and value.dtype in (torch.float16, torch.bfloat16):
                buffers[name] = before.to(device=value.device, dtype=torch.float32)
        return self


def _check_real(name: str, value: torch.Tensor) -> None:
    """``ValueError`` for a complex or boolean tensor given as the statistic ``name``,
    ``TypeError`` for a sparse (or other non-strided) one, which the steps cannot update."""
    if value.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense tensor (a running statistic), got layout {value.layout}"
        )
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be real (a statistic), got a {value.dtype} tensor")


def as_statistic(value: torch.Tensor) -> torch.Tensor:
    """``value`` as a running statistic is held: no graph, float32 at least."""
    value = value.detach() if value.requires_grad else value
    if not value.is_floating_point() or value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value
