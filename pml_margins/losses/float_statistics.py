"""Running statistics that stay float32 when a loss is cast to half precision."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FloatStatisticsMixin"]


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
